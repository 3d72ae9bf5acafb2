"""Pick each image's final adversarial example by its accuracy over N draws of a stochastic model.

An attack that keeps "the first candidate that fooled one forward pass", or hands back the clean image
when one noisy pass said "not fooled", scores a coin flip: against a stochastic defense the judgement
of a single pass is a random variable. Scoring every candidate over ``draws`` independent passes and
keeping, per image, the one with the lowest accuracy (ties: the earlier candidate) is the choice the
final N-draw scoring will agree with. Ties in accuracy (typically: fooled on every selection draw) are
broken by the mean probability of the true class over the same draws, so a candidate that fools the
defense by a wider margin wins; only exact ties keep the earlier candidate.
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
def _true_class_score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Accuracy over ``draws`` passes plus 1e-3 × the mean probability of the true class (the tie-breaker), (N,)."""
    logits = model(x.repeat(draws, *([1] * (x.dim() - 1)))).view(draws, x.shape[0], -1)
    acc = (logits.argmax(-1) == y).float().mean(0)
    p_true = logits.softmax(-1).gather(2, y.view(1, -1, 1).expand(draws, -1, 1)).squeeze(2).mean(0)
    return acc + 1e-3 * p_true  # accuracy steps are ≥ 1/draws ≫ 1e-3: the probability only breaks ties


@torch.no_grad()
def pick_worst(model: nn.Module, candidates: Sequence[torch.Tensor], y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per image, the candidate with the lowest accuracy over ``draws`` passes of ``model`` (ties: lower p(y))."""
    if not candidates:
        raise ValueError("pick_worst needs at least one candidate")
    if len(candidates) == 1:
        return candidates[0]
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    score = torch.stack([_true_class_score(model, c, y, draws) for c in candidates])  # (C, N)
    best = score.argmin(0)  # argmin returns the first minimum: exact ties keep the earlier candidate
    stacked = torch.stack(list(candidates))
    return stacked[best, torch.arange(y.shape[0], device=y.device)]
