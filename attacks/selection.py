"""Pick each image's final adversarial example by its accuracy over N draws of a stochastic model.

An attack that keeps "the first candidate that fooled one forward pass", or hands back the clean image
when one noisy pass said "not fooled", scores a coin flip: against a stochastic defense the judgement
of a single pass is a random variable. Scoring every candidate over ``draws`` independent passes and
keeping, per image, the one with the lowest accuracy (ties: the earlier candidate) is the choice the
final N-draw scoring will agree with.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def accuracy_over_draws(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Fraction of ``draws`` forward passes that classify each image correctly, shape (N,); one batched call."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    logits = model(x.repeat(draws, *([1] * (x.dim() - 1))))
    return (logits.argmax(-1).view(draws, x.shape[0]) == y).float().mean(0)


@torch.no_grad()
def pick_worst(model: nn.Module, candidates: Sequence[torch.Tensor], y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per image, the candidate with the lowest accuracy over ``draws`` passes of ``model``."""
    if not candidates:
        raise ValueError("pick_worst needs at least one candidate")
    if len(candidates) == 1:
        return candidates[0]
    acc = torch.stack([accuracy_over_draws(model, c, y, draws) for c in candidates])  # (C, N)
    best = acc.argmin(0)  # argmin returns the first minimum: ties keep the earlier candidate
    stacked = torch.stack(list(candidates))
    return stacked[best, torch.arange(y.shape[0], device=y.device)]
