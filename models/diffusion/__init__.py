"""The diffusion denoiser and DDPM schedule/sampler shared by every diffusion defense
(DiffDefense, DiffPure, DensePure, distribution transfer; RAP later)."""
from models.diffusion.schedule import DiffusionSchedule, to_image_space, to_model_space
from models.diffusion.unet import DDPMUNet, DiffDefenseUNet, sinusoidal_embedding

__all__ = ["DiffusionSchedule", "DDPMUNet", "DiffDefenseUNet", "sinusoidal_embedding", "to_image_space", "to_model_space"]
