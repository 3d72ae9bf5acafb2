"""The purifier interface and ``Defended``, the classifier every attack sees.

Why one wrapper: an attack handed ``Defended(purifier, victim)`` differentiates through the
purifier as a matter of course, so every evaluation is adaptive unless a threat model
deliberately hands the attack something weaker (``oblivious``/``transfer``).
"""
from __future__ import annotations

import torch
from torch import nn


class Purifier(nn.Module):
    """Base class of every defense.

    Subclasses implement ``forward(x) -> x_hat`` with ``x`` and ``x_hat`` in [0, 1] and of the same
    shape. Two class attributes tell the evaluation how to attack the defense soundly:

    - ``stochastic``: the output depends on fresh randomness → adaptive attacks use EOT and the
      score is taken over several purifications.
    - ``differentiable``: ``False`` when a step has zero/undefined gradients (rounding, JPEG, …) →
      adaptive attacks go through ``attacks.wrappers.BPDA``.
    - ``also_bpda``: the exact gradient runs through a long iterative chain (an unrolled optimisation,
      a reverse diffusion) that can be correct yet shattered at the attack's scale → adaptive attacks
      run along both paths, exact and identity BPDA, and keep each image's worse candidate.
    - ``votes``: > 1 → ``Defended`` classifies by majority vote over that many purifications
      (DensePure); see ``Defended.vote``.
    """

    stochastic: bool = False
    differentiable: bool = True
    also_bpda: bool = False
    votes: int = 1

    def bpda_approximation(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable stand-in used by BPDA on the backward pass (identity by default)."""
        return x


class Identity(Purifier):
    """No defense: ``Defended(Identity(), victim)`` is the undefended row of every table."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Defended(nn.Module):
    """``victim(purifier(x))`` as one classifier returning logits.

    Shape and range are checked here, once, so that a wrong input fails with one clear message
    instead of deep inside a convolution.
    """

    def __init__(self, purifier: nn.Module, victim: nn.Module, input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.purifier = purifier
        self.victim = victim
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        #: ``True`` makes ``vote`` return the soft vote (log mean softmax) as its value too: the function whose
        #: gradient the straight-through vote hands an attack. Only the audit's finite-difference check sets it.
        self.soft_vote = False

    @property
    def stochastic(self) -> bool:
        return bool(getattr(self.purifier, "stochastic", False))

    @property
    def differentiable(self) -> bool:
        return bool(getattr(self.purifier, "differentiable", True))

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected images of shape {self.input_shape} (C, H, W), got {tuple(x.shape[1:])}: "
                "check that dataset and victim match"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        votes = int(getattr(self.purifier, "votes", 1))
        if votes > 1:
            return self.vote(x, votes)
        return self.victim(self.purifier(x))

    def vote(self, x: torch.Tensor, votes: int) -> torch.Tensor:
        """Majority vote over ``votes`` purifications (DensePure), as logits an attack can use.

        Value: log of the vote shares (plus 1e-3 × the mean softmax, which only breaks ties), so argmax is the
        majority label. Gradient: that of the log mean softmax over the same passes (a straight-through
        estimator) — the hard vote's gradient is zero almost everywhere, and an attack must not be handed it.
        With ``soft_vote`` set the value is the log mean softmax as well, so finite differences can check that
        gradient against the function it belongs to.
        """
        probs = torch.stack([self.victim(self.purifier(x)).softmax(dim=1) for _ in range(votes)])
        soft = probs.mean(dim=0)
        shares = torch.nn.functional.one_hot(probs.argmax(dim=2), probs.shape[2]).to(soft.dtype).mean(dim=0)
        value = torch.log(shares + 1e-3 * soft.detach())
        smooth = torch.log(soft.clamp_min(1e-12))
        if self.soft_vote:
            return smooth
        return smooth + (value - smooth).detach()
