"""The purifier interface and ``Defended``, the classifier every attack sees.

Why one wrapper: an attack handed ``Defended(purifier, victim)`` differentiates through the
purifier as a matter of course, so every evaluation is adaptive unless a threat model
deliberately hands the attack something weaker (``oblivious``/``transfer``).
"""
from __future__ import annotations

import copy

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

    One optional method, ``smooth_surrogate()``, names a smooth stand-in for a purifier whose exact gradient is
    correct but describes a discontinuous function (see its docstring).
    """

    stochastic: bool = False
    differentiable: bool = True
    also_bpda: bool = False
    votes: int = 1

    def bpda_approximation(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable stand-in used by BPDA on the backward pass (identity by default)."""
        return x

    def smooth_surrogate(self) -> nn.Module | None:
        """A smooth purifier that computes (nearly) the same function, or ``None`` (the default: none needed).

        For purifiers whose forward pass is discontinuous in x although every op has a gradient (distribution
        transfer's guidance ∇ₓD carries a ReLU classifier's masks): the exact gradient then holds only inside one
        activation region. ``WhiteBoxAdaptive`` adds an attack path that forwards the real purifier and backpropagates
        through this one (BPDA with a differentiable approximation, same random draws), and the audit checks that
        gradient against the surrogate's own function and the surrogate's predictions against the real purifier's.
        """
        return None

    def variant_copy(self, **settings) -> "Purifier":
        """This purifier with some attributes changed, sharing its (frozen) submodules: a surrogate or weakened twin
        without a second copy of the networks."""
        other = copy.copy(self)
        other._modules = dict(self._modules)
        for name, value in settings.items():
            setattr(other, name, value)
        return other


class Identity(Purifier):
    """No defense: ``Defended(Identity(), victim)`` is the undefended row of every table."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FrozenPreprocessor(Purifier):
    """``x ↦ net(x)`` with a trained, frozen feed-forward pre-processor (JATP, NRP, APE-GAN, HGD): eval mode whatever
    the wrappers around it do, no parameter gradients, deterministic and differentiable — one short pass, nothing to
    shatter, so the adaptive attack takes its exact gradient. ``weakened()`` is the identity: without its network the
    defense is the undefended victim (audit check (i)).

    Args:
        net: the network (an instance of the subclass's ``network``).
        weights: its weights file, loaded with ``weights_only``; ``None`` keeps ``net`` as given.
        missing_hint: the "train it first with `python train.py …`" text of a missing file.
    """

    stochastic = False
    differentiable = True
    network: type[nn.Module] = nn.Module

    def __init__(self, net: nn.Module, weights: str | None = None, missing_hint: str = "") -> None:
        super().__init__()
        if not isinstance(net, self.network):
            expected = f"{self.network.__module__}.{self.network.__name__}"
            raise TypeError(f"{type(self).__name__}: net must be a {expected}, got {type(net).__name__}")
        if weights is not None:
            from models.weights import load_weights  # models is upstream of defenses; imported where it is used

            load_weights(net, weights, missing_hint=missing_hint)
        self.net = net.eval().requires_grad_(False)
        self.weights = None if weights is None else str(weights)

    def train(self, mode: bool = True) -> "FrozenPreprocessor":
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.net.parameters(), None)
        xin = x if param is None else x.to(param.dtype)
        return self.net(xin).to(x.dtype)

    def weakened(self) -> Purifier:
        return Identity()


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
