"""Random Gaussian noise of a fixed ℓ2 norm per image (the "ℓ2 Gaussian noise" row of RAP, Table 3).

torchattacks' ``GN`` adds per-pixel noise of standard deviation ``std``; its ℓ2 norm is random
(≈ std·√d). Here the direction is an isotropic Gaussian draw (uniform on the sphere) scaled to
exactly ``eps`` in ℓ2 per image; the result is then clipped to [0, 1], which can only shorten it.
No model access: it is the "is the defense robust to plain noise of the attack's size" baseline.
"""
from __future__ import annotations

import torch
from torch import nn


class GaussianNoiseL2:
    """``model -> callable(x, y)``: ``clip(x + eps · g/‖g‖₂)`` with ``g ~ N(0, I)`` per image.

    Args:
        model: ignored (kept for the uniform builder signature).
        eps: ℓ2 norm of the noise before clipping.
        seed: seed of a private generator (``None`` = the global generator).

    Examples::
        >>> x_noisy = GaussianNoiseL2(model, eps=1.5)(x, y)
    """

    def __init__(self, model: nn.Module | None = None, eps: float = 1.5, seed: int | None = None) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.seed = seed

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        norms = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        return (x + self.eps * g / norms).clamp(0, 1).detach()


class NoAttack:
    """``model -> callable(x, y)`` returning ``x`` unchanged: the "No attack" row (``conf/attack/none.yaml``).

    Scoring it gives clean accuracy through the same loop, threat and purifier as every attack.

    Examples::
        >>> NoAttack(model)(x, y) is not x and torch.equal(NoAttack(model)(x, y), x)
        True
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x.detach().clone()
