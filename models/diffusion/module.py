"""Trains any noise-prediction denoiser (``models.diffusion.unet``) as a DDPM: ε-prediction MSE,
an optional EMA of the weights (used for validation, sample grids and export), and a PNG grid of
samples from pure noise every few epochs."""
from __future__ import annotations

import copy
import functools
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from models.diffusion.schedule import DiffusionSchedule, to_image_space, to_model_space
from models.lit_base import LitBase, OptimizerFactory, SchedulerFactory
from models.weights import DATA_RANGE_KEY, DEFAULT_DATA_RANGE

#: The data spaces a denoiser can be trained in: ``[−1, 1]`` (x → 2x − 1, the project's model space) or raw ``[0, 1]``
#: images (the DiffDefense authors' ``DDPM.py``, which feeds ``ToTensor()`` batches to ``add_noise`` unmapped).
DATA_SPACES = ((-1.0, 1.0), (0.0, 1.0))


def check_data_space(data_space: Sequence[float], who: str = "data_space") -> tuple[float, float]:
    """``data_space`` as a (lo, hi) tuple of floats, or one clear error unless it is [−1, 1] or [0, 1]."""
    try:
        lo, hi = (float(v) for v in data_space)
    except (TypeError, ValueError):
        raise ValueError(f"{who} must be [-1, 1] or [0, 1], got {data_space!r}") from None
    if (lo, hi) not in DATA_SPACES:
        raise ValueError(f"{who} must be [-1, 1] or [0, 1], got [{lo:g}, {hi:g}]")
    return (lo, hi)


def images_to_data_space(x: torch.Tensor, data_space: tuple[float, float]) -> torch.Tensor:
    """Images in [0, 1] → the denoiser's data space (identity for [0, 1], 2x − 1 for [−1, 1])."""
    return x if data_space == (0.0, 1.0) else to_model_space(x)


def data_space_to_images(x: torch.Tensor, data_space: tuple[float, float], clamp: bool = False) -> torch.Tensor:
    """The inverse of ``images_to_data_space`` (not clamped unless ``clamp``)."""
    if data_space == (0.0, 1.0):
        return x.clamp(0.0, 1.0) if clamp else x
    return to_image_space(x, clamp=clamp)


def warmup_ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor, decay: float) -> torch.Tensor:
    """EMA whose decay warms up as min(decay, (1 + n) / (10 + n)) (TensorFlow's ``num_updates`` rule).

    A fixed 0.999 would keep ~70 % of the random initial weights after 300 steps — short CPU runs
    would export a worse denoiser than the one they trained.
    """
    d = torch.clamp((1.0 + num_averaged) / (10.0 + num_averaged), max=decay).to(averaged.dtype)
    return d * averaged + (1.0 - d) * current


class DenoiserModule(LitBase):
    """DDPM training (Ho et al. 2020, Alg. 1) of ``denoiser(x_t, t) -> ε̂`` on images in [0, 1].

    Args:
        denoiser: the ε-prediction network (e.g. ``DiffDefenseUNet``).
        schedule: the ``DiffusionSchedule`` (its T, β) the denoiser is trained for.
        optimizer / scheduler: partial factories, as every ``LitBase``.
        ema_decay: decay of the exponential moving average of the denoiser's weights, updated after
            every training batch (``torch.optim.swa_utils.AveragedModel``); ``None`` disables it. The EMA
            (when on) is the model validated, sampled and exported.
        sample_every_n_epochs: save a grid of ``n_samples`` images generated from pure noise to
            ``<trainer.log_dir>/samples/epoch_<epoch>.png`` at the end of every such epoch (0/None: never).
        n_samples: images in that grid (fixed seed, so grids of successive epochs are comparable). With
            a short schedule (DiffDefense's T = 100, β ≤ 0.02: ᾱ_T ≈ 0.37) x_T ~ N(0, I) is off the training
            distribution, so these grids understate the model; they are a sanity check, not a metric.
        image_shape: (C, H, W) of generated samples; ``None`` = the shape of the last training batch.
        data_space: where the DDPM runs: ``[-1, 1]`` (default: x_0 = 2x − 1, the project's model space) or
            ``[0, 1]`` (x_0 = x, raw images, as the DiffDefense authors trained theirs). Recorded with the exported
            weights when it is not the default (``models.weights.DATA_RANGE_KEY``), so a consumer configured for the
            other space refuses them in one line; a file without the entry is a [−1, 1] denoiser.

    The loss: x_0 = 2x − 1 (or x, ``data_space=[0, 1]``), t ~ U{0, …, T−1}, ε ~ N(0, I),
    ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖².
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: DiffusionSchedule,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        ema_decay: float | None = 0.999,
        sample_every_n_epochs: int | None = 1,
        n_samples: int = 16,
        image_shape: Sequence[int] | None = None,
        export_path: str | None = None,
        data_space: Sequence[float] = DEFAULT_DATA_RANGE,
    ) -> None:
        super().__init__(optimizer, scheduler, export_path)
        self.data_space = check_data_space(data_space)
        self.denoiser = denoiser
        self.schedule = schedule
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
            self.ema = AveragedModel(denoiser, avg_fn=functools.partial(warmup_ema, decay=ema_decay), use_buffers=True)
            # The average is not trained: keep it out of autograd (the optimiser skips parameters without grads).
            self.ema.requires_grad_(False)
        self.ema_decay = ema_decay
        self.sample_every_n_epochs = sample_every_n_epochs or 0
        self.n_samples = n_samples
        self.image_shape = tuple(int(s) for s in image_shape) if image_shape is not None else None

    # -- the model used outside training -------------------------------------------------------
    @property
    def eval_denoiser(self) -> nn.Module:
        """The EMA denoiser when EMA is on, else the trained one."""
        return self.ema.module if self.ema is not None else self.denoiser

    def export_denoiser(self) -> nn.Module:
        """A copy of the (EMA) denoiser in eval mode, for ``torch.save(module.state_dict(), weights)``;
        its state dict loads into a freshly built denoiser of the same config (``models.weights.load_weights``).

        A denoiser trained in ``[0, 1]`` carries its data space as the buffer ``DATA_RANGE_KEY`` (``load_weights``
        checks and strips it); a ``[−1, 1]`` one is exported exactly as before the space was recorded."""
        exported = copy.deepcopy(self.eval_denoiser).eval()
        if self.data_space != DEFAULT_DATA_RANGE:
            exported.register_buffer(DATA_RANGE_KEY, torch.tensor(self.data_space, dtype=torch.float32))
        return exported

    def export(self) -> nn.Module:
        return self.export_denoiser()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eval_denoiser(x_t, t)

    # -- training ------------------------------------------------------------------------------
    def denoising_loss(
        self,
        x: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """ε-prediction MSE on images ``x`` in [0, 1] (mapped to ``data_space``); ``t``/``noise`` drawn
        uniformly/normally unless given."""
        x0 = images_to_data_space(x, self.data_space)
        if t is None:
            t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        net = self.denoiser if denoiser is None else denoiser
        return F.mse_loss(net(self.schedule.q_sample(x0, t, noise), t), noise)

    def step(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if stage == "train":
            self._batch_shape = tuple(x.shape[1:])
        net = self.denoiser if stage == "train" else self.eval_denoiser
        return self.denoising_loss(x, denoiser=net), {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.denoiser)

    # -- samples -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, image_shape: Sequence[int] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images in [0, 1] generated from pure noise with the (EMA) denoiser (T reverse steps)."""
        shape = tuple(image_shape or self.image_shape or getattr(self, "_batch_shape", ()) or ())
        if not shape:
            raise ValueError("sample() needs image_shape (none given and no training batch seen yet)")
        net = self.eval_denoiser
        was_training = net.training
        net.eval()
        try:
            # Noise drawn on the CPU from ``generator`` (if any), so a seed gives the same grid on any device.
            dtype = next(net.parameters()).dtype
            x_T = torch.randn((n, *shape), generator=generator).to(self.device, dtype)
            noise_fn = None
            if generator is not None:
                noise_fn = lambda x, i: torch.randn(x.shape, generator=generator).to(x.device, x.dtype)  # noqa: E731
            x0 = self.schedule.sample_loop(net, x_T, self.schedule.num_steps, noise_fn=noise_fn)
        finally:
            net.train(was_training)
        return data_space_to_images(x0, self.data_space, clamp=True)

    def on_train_epoch_end(self) -> None:
        every = self.sample_every_n_epochs
        if not every or (self.current_epoch + 1) % every or self._trainer is None:
            return
        if not self.trainer.log_dir:
            return
        self.save_sample_grid(self.sample(self.n_samples, generator=torch.Generator().manual_seed(0)))
