"""APGD (Croce & Hein, ICML 2020) from ``pyautoattack``, sound against stochastic defenses.

On a deterministic model this is pyautoattack's ``APGDAttack.perturb``: images no restart fools keep
their clean input, which is correct there (the model classifies them correctly, every time). On a
stochastic model that rule is a coin flip — "not fooled" is the verdict of one noisy forward pass — and
scoring the clean images it hands back overstates robustness (issue: APGD-CE scored above plain PGD
of the same budget). There every image gets its highest-loss iterate instead (``perturb(best_loss=True)``),
an adversarial candidate, never a silent fallback to x; with restarts, per image the restart of highest
loss. Gradients of a stochastic model are averaged by the threat model's loss-EOT (tied replicas, see
``attacks.wrappers.EOT``) or by ``eot_iter`` here.
"""
from __future__ import annotations

import torch
from pyautoattack.autopgd_base import APGDAttack
from torch import nn

from attacks.wrappers import is_stochastic

LOSSES = ("ce", "dlr")


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class APGD:
    """``model -> callable(x, y)``: APGD that returns an adversarial candidate for every image of a stochastic model.

    Args:
        model: classifier returning logits of images in [0, 1] (``stochastic`` read off it).
        norm: ``Linf``, ``L2`` or ``L1``.
        eps: radius of the ε-ball.
        steps: iterations per restart (AutoAttack: 100).
        n_restarts: random restarts.
        loss: ``ce`` or ``dlr``.
        rho: step-size decrease threshold (0.75).
        seed: pyautoattack reseeds the global generator with it on deterministic models.
        eot_iter: gradient draws per step inside APGD (1: leave EOT to the threat model).

    Examples::
        >>> x_adv = APGD(defended, norm="Linf", eps=8 / 255, steps=100)(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 8 / 255,
        steps: int = 100,
        n_restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        seed: int = 0,
        eot_iter: int = 1,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown APGD loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.stochastic = is_stochastic(model)
        self.apgd = APGDAttack(
            model, n_iter=int(steps), norm=norm, n_restarts=int(n_restarts), eps=float(eps), seed=seed, loss=loss,
            eot_iter=int(eot_iter), rho=float(rho), device=model_device(model),
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.apgd.perturb(x, y, best_loss=self.stochastic)
