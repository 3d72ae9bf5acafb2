"""Input normalisation as the victim's first layer.

Every victim takes images in [0, 1], so an ε-ball (8/255, 0.3, …) is always in pixel units, whatever
normalisation the classifier was trained with, and attacks/defenses never need to know about it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for ``x`` in [0, 1].

    ``mean``/``std`` are buffers of shape (1, C, 1, 1): they move with ``.to(device)`` and are saved in
    the state dict, so a checkpoint records the normalisation it was trained with (``build_victim``
    refuses a checkpoint whose normalisation differs from the config's).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.net = net
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
