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

By default the adversaries are crafted afresh for every batch, with a fresh random start: for ``full`` this is
required (P changes); for ``oblivious`` it draws a new PGD example per visit where the original methods attack a
fixed training set once. ``AdversaryCache`` (config ``reuse_adversaries: true``) is that fixed set: each distinct
training image is attacked on its first visit and its example reused on every later one, so only the first epoch
pays for the attack (session 8: ≈ 30 s per APE-GAN training step of 128 on this project's 2-core CPU, each step
running PGD-5, i.e. 5 forward-backward passes of the ResNet-18 target). Images are recognised by their content, so
it works with any datamodule; a random augmentation makes every view a new image, so with ``augment`` on the cache
is dropped at fit start, with a warning (``usable_cache``). The trainer logs ``train/adv_reused``, the fraction of each batch reused.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
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


class AdversaryCache:
    """The original methods' fixed adversarial training set, built lazily: ``cache(x, make) -> x_adv``.

    ``make(index)`` crafts the adversaries of ``x[index]`` (the images not seen before); every image seen before gets
    its stored example back. Stored as the perturbation δ = x̃ − x in float16 on the CPU (|δ| ≤ ε, where float16's
    spacing is < 3e-5): 6 KiB per 3×32×32 image, 300 MiB for CIFAR-10's 50,000. On the way back δ is clipped to the
    ε-box and x + δ to [0, 1], so a reused example is as valid as a fresh one.

    Only for adversaries that depend on the image alone (PGD on the frozen target, NRP's SSP on the frozen feature
    network), never for ones crafted through the pre-processor being trained.

    Args:
        eps: the L∞ radius of the stored examples.
        limit: at most this many images are stored (later new images are crafted every time, never stored).
    """

    def __init__(self, eps: float, limit: int = 200_000) -> None:
        if not eps > 0 or int(limit) < 1:
            raise ValueError(f"AdversaryCache: eps must be > 0 and limit >= 1, got eps={eps}, limit={limit}")
        self.eps, self.limit = float(eps), int(limit)
        self._deltas: dict[bytes, Tensor] = {}
        #: The fraction of the last batch whose examples were reused.
        self.last_reused = 0.0

    def __len__(self) -> int:
        return len(self._deltas)

    @staticmethod
    def keys(x: Tensor) -> list[bytes]:
        """One 128-bit digest of each image's float32 bytes."""
        rows = x.detach().to("cpu", torch.float32).flatten(1).contiguous().numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]

    def __call__(self, x: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
        keys = self.keys(x)
        missing = [i for i, key in enumerate(keys) if key not in self._deltas]
        hits = [i for i, key in enumerate(keys) if key in self._deltas]
        out = torch.empty_like(x)
        if hits:
            index = torch.tensor(hits, device=x.device)
            delta = torch.stack([self._deltas[keys[i]] for i in hits]).to(x.device, x.dtype)
            out[index] = (x[index] + delta.clamp(-self.eps, self.eps)).clamp(0.0, 1.0)
        if missing:
            index = torch.tensor(missing, device=x.device)
            fresh = make(index).detach()
            out[index] = fresh
            delta = (fresh - x[index]).to("cpu", torch.float16)
            for row, i in enumerate(missing):
                if len(self._deltas) >= self.limit:
                    break
                self._deltas[keys[i]] = delta[row]
        self.last_reused = len(hits) / max(1, len(keys))
        return out


def adversary_cache(reuse: bool, kind: str, eps: float) -> AdversaryCache | None:
    """The cache a training module keeps when ``reuse_adversaries`` is on and the adversaries allow it.

    ``full`` adversaries are crafted through the pre-processor's current weights, so they are never reused: one
    config (``reuse_adversaries: true``) serves both arms of JATP's proof of concept (``model.adversaries=full``).
    """
    return AdversaryCache(eps) if reuse and check_adversaries(kind, "adversary_cache") == "oblivious" else None


def cached_adversaries(cache: AdversaryCache | None, active: bool, x: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(index)`` for every image of x, or through ``cache`` when there is one and ``active`` (a training step:
    validation always crafts afresh)."""
    if cache is None or not active:
        return make(torch.arange(x.shape[0], device=x.device))
    return cache(x, make)


def usable_cache(cache: AdversaryCache | None, trainer: Any) -> AdversaryCache | None:
    """``cache``, or ``None`` with one warning when the trainer's datamodule augments at random (every view is a new
    image: nothing would be reused and the store would only grow). Called by the modules at fit start."""
    datamodule = getattr(trainer, "datamodule", None)
    if cache is not None and getattr(datamodule, "augment", False):
        warnings.warn("reuse_adversaries=true has no effect with dataset.datamodule.augment=true (every augmented view "
                      "is a new image): adversaries are crafted afresh for every batch. For the original methods' "
                      "fixed adversarial set, set dataset.datamodule.augment=false.", stacklevel=2)
        return None
    return cache
