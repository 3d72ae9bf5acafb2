"""Generic wrappers that make attacks sound against randomised and non-differentiable defenses.

- ``EOT`` (Athalye et al. 2018, Expectation over Transformation): the attacked model becomes the
  mean over ``samples`` independent draws of a stochastic model, computed in one batched pass
  (images × samples). Its gradient is therefore exactly the mean of the per-draw gradients of the
  logits. Attacks that average *loss* gradients themselves (EOT-PGD) declare ``handles_eot``.
- ``BPDA`` (Backward Pass Differentiable Approximation): forward through the real module, backward
  through a differentiable approximation (identity by default, i.e. straight-through).

Neither knows anything about defenses: both wrap any ``nn.Module``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class EOT(nn.Module):
    """Average the outputs of ``samples`` random draws of ``model``.

    ``reduction='logits'`` averages logits (gradient = mean of per-draw logit gradients);
    ``'probs'`` returns ``log(mean softmax)``, the log-probabilities of the ensemble.
    """

    def __init__(self, model: nn.Module, samples: int = 10, reduction: str = "logits") -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"EOT needs samples >= 1, got {samples}")
        if reduction not in ("logits", "probs"):
            raise ValueError(f"EOT reduction must be 'logits' or 'probs', got {reduction!r}")
        self.model = model
        self.samples = int(samples)
        self.reduction = reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # (samples * n, ...): draw k purifications of every image in one batched forward pass.
        out = self.model(x.repeat(self.samples, *([1] * (x.dim() - 1))))
        out = out.view(self.samples, n, *out.shape[1:])
        if self.reduction == "logits":
            return out.mean(0)
        return torch.log(out.softmax(-1).mean(0).clamp_min(1e-12))


class BPDA(nn.Module):
    """Forward ``module(x)``; backward as if the output were ``approximation(x)``.

    ``approximation`` defaults to the identity (straight-through estimator), which is the right
    choice for purifiers whose output stays close to their input (Athalye et al. 2018, §4.1).
    """

    def __init__(self, module: nn.Module, approximation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.module = module
        self.approximation = approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approx = x if self.approximation is None else self.approximation(x)
        with torch.no_grad():
            exact = self.module(x)
        return approx + (exact - approx).detach()
