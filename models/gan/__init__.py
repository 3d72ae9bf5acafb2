"""The Defense-GAN WGAN (generator + critic) and its WGAN-GP LightningModule."""
from models.gan.module import WGANModule, gradient_penalty
from models.gan.networks import DefenseGANCritic, DefenseGANGenerator

__all__ = ["DefenseGANCritic", "DefenseGANGenerator", "WGANModule", "gradient_penalty"]
