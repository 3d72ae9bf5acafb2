"""Generic wrappers that make attacks sound against randomised and non-differentiable defenses.

- ``EOT`` (Athalye et al. 2018, Expectation over Transformation). Default ``reduction='loss'``: every
  gradient attack follows the gradient of the *expected loss*, E_k[∇ℓ(f_k(x), y)], whatever its loss
  (CE, DLR, C&W's margin …), as AutoAttack's ``version='rand'`` does by averaging per-draw gradients.
  A model wrapper cannot do this by averaging outputs: ∇ℓ(mean logits) ≠ mean ∇ℓ(logits) for any
  non-linear ℓ, and the gap grows with the victim's confidence (a confident victim's CE on the mean
  logits saturates and hides the draws that are already wrong). So the attack itself runs on
  ``samples`` *tied replicas* of its batch: row ``k·N + i`` is replica k of image i; the model evaluates
  every replica at replica 0's point with its own fresh draw, and the backward pass hands every
  replica the sum of all replicas' gradients. Replica 0 therefore moves exactly as the attack would on
  N images with the loss gradient summed over k independent draws, and it is what the attack returns.
  This needs the attack to evaluate the model on its whole batch; one that evaluates subsets fails
  with a clear error (``TiedReplicaError``) — linearising attacks that do (DeepFool, FAB) use
  ``reduction='logits'``, which is exact for them: they follow ∇E[f] = E[∇f] of the logits.
  ``'logits'`` (mean logits) and ``'probs'`` (log of the mean softmax) remain as named options.
- ``BPDA`` (Backward Pass Differentiable Approximation): forward through the real module, backward
  through a differentiable approximation (identity by default, i.e. straight-through).

Neither knows anything about defenses: both wrap any ``nn.Module``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

REDUCTIONS = ("loss", "logits", "probs")


def is_stochastic(model: nn.Module) -> bool:
    """Whether ``model`` (a ``Defended``, a wrapper of one, or a plain classifier) draws fresh randomness."""
    return bool(getattr(model, "stochastic", False))


class TiedReplicaError(RuntimeError):
    """An attack evaluated the loss-EOT model on part of its replicated batch."""


class _ShareGradient(torch.autograd.Function):
    """Forward: replica 0 of every image, repeated k times. Backward: each replica gets the sum over replicas."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, samples: int) -> torch.Tensor:
        n = x.shape[0] // samples
        ctx.samples = samples
        return x[:n].repeat(samples, *([1] * (x.dim() - 1)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.samples
        total = grad.view(k, grad.shape[0] // k, *grad.shape[1:]).sum(0)
        return total.repeat(k, *([1] * (grad.dim() - 1))), None


class EOT(nn.Module):
    """Expectation over ``samples`` random draws of ``model`` (see the module docstring).

    Args:
        model: the (stochastic) classifier.
        samples: draws per gradient (k).
        reduction: ``'loss'`` (default: attacks follow E[∇ℓ]; needs ``run_attack``, which
            ``attacks.base.Attack`` calls), ``'logits'`` (mean logits) or ``'probs'`` (log mean softmax).

    Outside an attack (a plain ``forward`` of N images) every reduction returns the ensemble's output:
    mean logits for ``'loss'``/``'logits'``, log mean softmax for ``'probs'``, all draws in one batched pass.
    """

    def __init__(self, model: nn.Module, samples: int = 10, reduction: str = "loss") -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"EOT needs samples >= 1, got {samples}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"EOT reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
        self.model = model
        self.samples = int(samples)
        self.reduction = reduction
        self._tied_rows: int | None = None

    @property
    def stochastic(self) -> bool:
        return is_stochastic(self.model)

    @property
    def differentiable(self) -> bool:
        return bool(getattr(self.model, "differentiable", True))

    @property
    def replicates(self) -> bool:
        """True when attacks must run on tied replicas (loss averaging with more than one draw)."""
        return self.reduction == "loss" and self.samples > 1

    @contextmanager
    def tied(self, rows: int) -> Iterator[None]:
        """Inside: forward expects the replicated batch of ``rows`` = samples × N rows."""
        previous, self._tied_rows = self._tied_rows, int(rows)
        try:
            yield
        finally:
            self._tied_rows = previous

    def run_attack(
        self, attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``attack(self, x, y)`` on tied replicas; returns replica 0 (N rows). Without replication, plain."""
        if not self.replicates:
            return attack(self, x, y)
        k, n = self.samples, x.shape[0]
        xr = x.repeat(k, *([1] * (x.dim() - 1)))
        with self.tied(k * n):
            out = attack(self, xr, y.repeat(k))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tied_rows is not None:
            if x.shape[0] != self._tied_rows:
                raise TiedReplicaError(
                    f"loss-averaging EOT: the attack evaluated {x.shape[0]} rows of its {self._tied_rows}-row replicated "
                    "batch (it attacks subsets of images); give it eot: logits in its config, or use an attack with its "
                    "own EOT (handles_eot)"
                )
            return self.model(_ShareGradient.apply(x, self.samples))
        n = x.shape[0]
        # (samples * n, ...): draw k purifications of every image in one batched forward pass.
        out = self.model(x.repeat(self.samples, *([1] * (x.dim() - 1))))
        out = out.view(self.samples, n, *out.shape[1:])
        if self.reduction == "probs":
            return torch.log(out.softmax(-1).mean(0).clamp_min(1e-12))
        return out.mean(0)


class BPDA(nn.Module):
    """Forward ``module(x)``; backward as if the output were ``approximation(x)``.

    ``approximation`` defaults to the identity (straight-through estimator), which is the right
    choice for purifiers whose output stays close to their input (Athalye et al. 2018, §4.1).
    It keeps the wrapped module's ``stochastic`` flag, so EOT and scoring still see the randomness. A stochastic
    ``approximation`` (a smooth surrogate of a stochastic purifier) draws the same random numbers as ``module`` does
    right after it, so the gradient belongs to the very draw whose output the attack sees.
    """

    differentiable = True

    def __init__(self, module: nn.Module, approximation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.module = module
        self.approximation = approximation

    @property
    def stochastic(self) -> bool:
        return is_stochastic(self.module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximation is None:
            approx = x
        else:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                approx = self.approximation(x)  # replays the RNG state that module(x) starts from below
        with torch.no_grad():
            exact = self.module(x)
        return approx + (exact - approx).detach()
