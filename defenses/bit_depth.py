"""Bit-depth reduction (Xu et al. 2018, "Feature Squeezing").

Rounding has zero gradient almost everywhere, so attacking it naively *masks* gradients: the
textbook case BPDA was invented for (Athalye et al. 2018). ``differentiable = False`` makes the
adaptive threat model route gradients through ``attacks.wrappers.BPDA``; the audit's planted
masked-defense test relies on this class being attacked without it.
"""
from __future__ import annotations

import torch

from defenses.base import Purifier


class BitDepthReduction(Purifier):
    differentiable = False

    def __init__(self, bits: int = 1) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        self.levels = 2**bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels
