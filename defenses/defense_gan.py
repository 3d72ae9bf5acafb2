"""Defense-GAN (Samangouei et al. 2018): project the input onto the range of a WGAN generator G trained
on clean images, x̂ = G(ẑ) with ẑ ≈ argmin_z ‖G(z) − x‖², found by gradient descent from R random
latents (the restart with the lowest final MSE wins); the victim classifies x̂.

The baseline of DiffDefense Table 3 (same latent search as DiffDefense, ``defenses.latent_search``; only
the generator differs). It is stochastic (random initial latents → EOT).

``differentiable``: Athalye et al. (2018, §5.3) broke Defense-GAN with BPDA through the identity because
the L-step inner optimisation was unrolled by no one. It can be: every descent step
z_{i+1} = z_i − η_i ∇_z MSE(G(z_i), x) is a differentiable torch op in x once the inner gradient is kept
in the graph, and the restart choice is an argmin index through which the winning G(z_L) is gathered
(``latent_search(differentiable=True)``, with per-step activation checkpointing so memory does not grow
with the graph of L = 200 generations). Exact gradients through the purification are what breaks such
defenses (Lee & Kim, ICCV 2023), so ``gradient="exact"`` (default) makes the instance ``differentiable``
and the adaptive attack uses them (plus EOT); ``gradient="bpda"`` is the comparison — Athalye et al.'s
protocol: ``differentiable = False`` and the identity backward (``Purifier.bpda_approximation``) plus EOT.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from defenses.base import Purifier
from defenses.latent_search import LatentSearchResult, check_gradient_mode, latent_search
from models.weights import load_weights, train_hint

DEFAULT_GAN = "defensegan_wgan"  # conf/train.yaml's default gan


class DefenseGAN(Purifier):
    """``x ↦ G(ẑ)``, ẑ the best of ``restarts`` latents after ``iterations`` descent steps on MSE(G(z), x).

    Args:
        generator: ``z (N, latent_dim) -> images (N, C, H, W)`` in [0, 1] (e.g. ``DefenseGANGenerator``).
        weights: state dict of the generator written by ``python train.py model=gan``; ``None`` keeps the
            generator as given (tests, or weights loaded by the caller).
        latent_dim: size of z; default ``generator.latent_dim``.
        iterations: L; restarts: R (DiffDefense Table 3 rows (L, R) ∈ {(25,10), (100,1), (100,10), (200,10)}).
        optimizer / lr / lr_schedule / decay: the update rule (``defenses.latent_search.latent_search``).
        init_std: initial latents z₀ ~ N(0, init_std² I); ``None`` = 1/√latent_dim (Defense-GAN's release).
        extra_generation: ``True`` = ``iterations`` descent steps, then G(z_L) (Defense-GAN §3.3: "L steps
            of GD"); ``False`` = L generations with L − 1 updates (DiffDefense Alg. 1's count).
        gradient: ``"exact"`` (default: the instance is ``differentiable``, its forward differentiable in x
            through the unrolled search) or ``"bpda"`` (not differentiable: identity BPDA). Same values.
        checkpoint: with ``gradient="exact"``, recompute each unrolled step on the backward pass instead
            of storing its graph (``torch.utils.checkpoint``; same gradient, memory of one step).
    """

    stochastic = True
    # Class default = what the search is without the exact mode; __init__ sets the instance's from ``gradient``.
    differentiable = False

    def __init__(
        self,
        generator: nn.Module,
        weights: str | None = None,
        latent_dim: int | None = None,
        iterations: int = 200,
        restarts: int = 10,
        optimizer: str = "sgd",
        lr: float = 10.0,
        lr_schedule: str = "decay",
        decay: float = 0.1,
        init_std: float | None = None,
        extra_generation: bool = True,
        gradient: str = "exact",
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        check_gradient_mode(gradient)
        if weights is not None:
            load_weights(generator, weights, missing_hint=train_hint(weights, "gan", DEFAULT_GAN))
        self.generator = generator.eval().requires_grad_(False)
        self.latent_dim = int(latent_dim if latent_dim is not None else getattr(generator, "latent_dim"))
        if iterations < 1 or restarts < 1:
            raise ValueError(f"iterations and restarts must be >= 1, got L={iterations}, R={restarts}")
        self.iterations, self.restarts = int(iterations), int(restarts)
        self.optimizer, self.lr, self.lr_schedule, self.decay = optimizer, float(lr), lr_schedule, float(decay)
        self.init_std = float(init_std) if init_std is not None else 1.0 / math.sqrt(self.latent_dim)
        self.extra_generation = bool(extra_generation)
        self.gradient = gradient
        self.differentiable = gradient == "exact"  # instance attribute: Defended/WhiteBoxAdaptive read it
        # Exact gradients through the unrolled search can be shattered (docs/results/…-cpu.md): attack along BPDA too.
        self.also_bpda = self.differentiable
        self.checkpoint = bool(checkpoint)

    def train(self, mode: bool = True) -> "DefenseGAN":
        # The generator stays in eval mode (a purifier is never trained; no batch-norm updates).
        super().train(mode)
        self.generator.eval()
        return self

    def _init(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.init_std * torch.randn(shape, device=device, dtype=dtype)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> LatentSearchResult:
        """The full search result (reconstruction, best and mean MSE over restarts, winning latents).

        Detached, unless ``gradient="exact"`` and ``x`` requires grad (an attack's forward): then it is a
        differentiable function of ``x`` through the unrolled search.

        ``generator`` (optional) seeds the initial latents; by default the global RNG is used (so
        ``torch.manual_seed`` / ``fork_rng`` replay a draw, as the audit's frozen-randomness check does).
        """
        if x.dim() != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got a tensor of shape {tuple(x.shape)}")

        def init(shape: tuple[int, ...]) -> torch.Tensor:
            if generator is None:
                return self._init(shape, x.device, x.dtype)
            return self.init_std * torch.randn(shape, generator=generator, device=generator.device, dtype=x.dtype)

        return latent_search(
            self.generator, x, (self.latent_dim,), self.iterations, self.restarts,
            optimizer=self.optimizer, lr=self.lr, lr_schedule=self.lr_schedule, decay=self.decay,
            init=init, extra_generation=self.extra_generation,
            differentiable=self.differentiable, checkpoint_steps=self.checkpoint,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x).reconstruction

    def extra_repr(self) -> str:
        return (f"latent_dim={self.latent_dim}, L={self.iterations}, R={self.restarts}, optimizer={self.optimizer}, "
                f"lr={self.lr:g}, lr_schedule={self.lr_schedule}, decay={self.decay:g}, init_std={self.init_std:.4g}, "
                f"gradient={self.gradient}")
