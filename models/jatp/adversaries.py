"""Training adversaries of the pre-processor baselines (APE-GAN, HGD), from one of two sources (JATP §2.2, Figs. 1–2):

* ``oblivious`` — x̃′ = argmax_{x̃ ∈ B_ε(x)} CE(T(x̃), y): PGD on the bare, frozen target T. The pre-processor P is
  never called: these are the adversarial examples APE-GAN and HGD were originally trained on ("crafted only
  against the target model … static and independent to the pre-processing model").
* ``full`` — x̃* = argmax_{x̃ ∈ B_ε(x)} CE(T(P(x̃)), y): the same PGD through the full model T∘P with P's *current*
  weights, so the examples follow P as it trains (the paper's proof-of-concept retraining, "same L∞ PGD to craft
  full adversarial examples").

Both are L∞ PGD (Madry et al.) with a uniform random start in the ε-box: ``models.training_losses.PGDAT``'s inner
maximisation (torchattacks' ``PGD`` behind ``attacks.base.Attack``), reused rather than written again.
``sign_gradient_ascent`` is not used: its start is TRADES' / MART's x + 0.001·N(0, 1), not a random start in the
ball. Step size: the paper's "PGD-40 attack with step size 0.007" for the baselines (ε = 8/255) is the config
default; ``alpha=None`` gives ``madry_alpha``'s 2.5·ε/steps.

What ``PGDAT``/``Attack`` guarantee is kept here: inputs checked to be images in [0, 1] (``check_images``), every
submodule of P and T in eval mode during the attack and each one's own mode restored afterwards (``eval_mode``),
gradients w.r.t. the input only (parameter ``.grad`` never touched, so it is safe inside a training step), autograd
re-enabled under Lightning's inference-mode validation loop, a detached result in the ε-ball and in [0, 1].

The adversaries are crafted afresh for every batch, with a fresh random start: for ``full`` this is required (P
changes); for ``oblivious`` it draws a new PGD example per epoch where the original methods attack a fixed training
set once — the same distribution of examples, one per visit instead of one per image.
"""
from __future__ import annotations

from torch import Tensor, nn

from attacks.base import check_images, eval_mode
from models.training_losses import PGDAT, madry_alpha

#: The valid values of the ``adversaries`` config key (and of ``AdversarySource.kind``).
ADVERSARIES = ("oblivious", "full")


def check_adversaries(kind: str, owner: str) -> str:
    """``kind`` if it is a valid adversary source, else one ``ValueError`` line naming the valid ones."""
    if kind not in ADVERSARIES:
        raise ValueError(f"{owner}: unknown adversaries {kind!r}; valid: {', '.join(ADVERSARIES)}")
    return kind


class AdversarySource:
    """``source(preprocessor, target, x, y) -> x_adv``: L∞ PGD on T (``oblivious``) or on T∘P (``full``).

    Args:
        kind: ``"oblivious"`` or ``"full"`` (see the module docstring).
        eps: L∞ radius in pixel units (configs pass ``dataset.eps.linf``; the paper: 8/255).
        steps: PGD iterations (the paper, for APE-G and HGD: 40).
        alpha: step size (the paper: 0.007); ``None`` → 2.5·ε/steps (``madry_alpha``).
        random_start: uniform start in the ε-box (Madry et al.), ``False`` starts at x.

    Example:
        >>> source = AdversarySource("full", eps=8 / 255, steps=40, alpha=0.007)
        >>> x_adv = source(denoiser, target, x, y)   # PGD on target(denoiser(·)) with the denoiser's current weights
    """

    def __init__(self, kind: str = "oblivious", eps: float = 8 / 255, steps: int = 40, alpha: float | None = 0.007,
                 random_start: bool = True) -> None:
        self.kind = check_adversaries(kind, "AdversarySource")
        # PGDAT validates eps / steps / alpha and builds torchattacks' PGD behind attacks.base.Attack.
        self._pgd = PGDAT(eps=float(eps), alpha=alpha, steps=int(steps), random_start=bool(random_start))
        self.eps, self.steps, self.random_start = self._pgd.eps, self._pgd.steps, self._pgd.random_start
        self.alpha = madry_alpha(self.eps, self.steps, alpha)

    def __repr__(self) -> str:
        return (f"AdversarySource(kind={self.kind}, eps={self.eps:g}, steps={self.steps}, alpha={self.alpha:g}, "
                f"random_start={self.random_start})")

    def attacked_model(self, preprocessor: nn.Module, target: nn.Module) -> nn.Module:
        """The model PGD differentiates: T (``oblivious``) or T∘P as one module (``full``; P and T are not copied)."""
        return target if self.kind == "oblivious" else nn.Sequential(preprocessor, target)

    def __call__(self, preprocessor: nn.Module, target: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_images(x.detach())
        model = self.attacked_model(preprocessor, target)
        # eval_mode over P as well for ``oblivious`` (a no-op there: P is not run) keeps one code path.
        with eval_mode(preprocessor), eval_mode(target):
            return self._pgd.adversary(model, x, y)
