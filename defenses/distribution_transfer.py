"""Distribution transfer (Chen, Yan & Dong 2023, "Adversarial defense based on distribution transfer").

Forward-diffuse the input x_adv to t*, then run the reverse process guided by the protected model (§3.3):

    p(x_{t−1} | x_t, x_adv) = N(μ − s Σ ∇_{x_t} D, Σ)                                            (Eq. 10)
    D = ‖f(x̂_0(x_t)) − f(x_adv)‖_2 + φ · (1 − SSIM(x̂_0(x_t), x_adv))                           (Eq. 11, our sign)

Symbols as in the code (``ClassifierGuidance``):

* x_t — the current sample of the reverse chain (model space [−1, 1]); μ, Σ = σ_t² I — the DDPM step's mean
  and variance (``DiffusionSchedule.p_sample``, σ_t² = β_t); s — ``scale``; φ — ``phi``.
* x̂_0(x_t) — the denoiser's prediction of the clean image from x_t, mapped to [0, 1]: the paper's x′ (its x′_t,
  x′_0): the classifier f is trained on clean images, so it is shown the predicted clean image, not the noisy x_t.
* f — the protected model (the victim, given to the defense as ``classifier``), logits on [0, 1] images (the
  authors' code feeds it [−1, 1] inside the guidance and [0, 1] elsewhere; we use [0, 1] throughout).
* x_adv — the defense's input. The first term is the authors' ``loss1`` (their code uses a squared error of
  logits; Eq. 11 the L2 norm — we use the norm as printed).
* **Sign of the SSIM term**: the paper prints "+ φ·SSIM", which as a distance to be *decreased* would push the
  sample away from the input; we use φ·(1 − SSIM), which pulls it towards the input's structure ("ensures
  controlled sample generation"). SSIM from torchmetrics (Gaussian 11×11 window, σ 1.5, data range 1).

Two named variants (docs/decisions.md):

* ``paper`` (``defense=disttrans``): the guided multi-step reverse process above, t* steps, DDPM sampler.
* ``authors_code`` (``defense=disttrans_authors``): what ``xaddwell/adversarial_robustness``
  (``diffusion_defense/cifar10/DRM.py``) runs by default — one ε_θ call at t* returning the clipped x̂_0
  (``multistep = False``). Its guidance (``use_cond``) is added to the *sample*, never to the returned x̂_0, so
  it cannot change the output; this variant therefore has none.
* **t\\***: the authors' "470 iterations" is t = 470 of improved-diffusion's 4000-step cosine schedule
  (ᾱ ≈ 0.962); on another schedule the defense uses the step with the same ᾱ (``match_t`` →
  ``DiffusionSchedule.match_step``): step 57 of the 1000-step linear DDPM.

Attacks differentiate through every step, the guidance's own gradient included (double backprop), with
activation checkpointing; ``stochastic = True``. With the guidance on, that exact gradient is shattered (∇D carries
f's ReLU masks, piecewise constant in x: the audit's finite differences fail), so the guided purifier also offers
``smooth_surrogate()`` — the same chain with f's ReLUs as softplus(β·)/β inside the guidance only — along which the
adaptive attack runs a third path (forward the real chain, backward the surrogate, same noise).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from defenses.diffpure import DiffPure
from models.diffusion.schedule import DiffusionSchedule, Guidance, to_image_space
from models.smooth_relu import softplus_relus

VARIANTS = ("paper", "authors_code")
#: How D compares the logits: ``norm`` = ‖f(x̂_0) − f(x_adv)‖₂ as Eq. 11 prints it; ``squared`` = its square, the
#: authors' ``loss1`` (smooth where f(x̂_0) = f(x_adv), unlike the norm). Neither makes a guided chain smooth when f
#: has ReLUs: ∇D carries f's ReLU masks, piecewise constant in x, and the audit's finite-difference check fails
#: both (0.38 / 0.28 on the stand-in, 0.0000 with softplus; docs/results/disttrans-fashion-mnist-rgb32-cpu.md).
DISTANCES = ("norm", "squared")


def checked_distance(distance: str) -> str:
    """``distance`` if it is one of ``DISTANCES``; else one error that lists them."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}: use one of {DISTANCES}")
    return distance


def ssim_per_image(x: Tensor, y: Tensor) -> Tensor:
    """SSIM of each image pair (N,), images in [0, 1] (torchmetrics' Gaussian-window SSIM, differentiable)."""
    return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")


class ClassifierGuidance:
    """−s ∇_{x_t} D for one batch of inputs ``x_ref`` (see the module docstring for D).

    ``distance(x_t, pred_x0)`` is D per image; ``__call__`` is the ``Guidance`` hook of ``p_sample``.
    """

    def __init__(
        self, classifier: nn.Module, x_ref: Tensor, scale: float, phi: float, create_graph_ref: bool, distance: str = "norm",
        softplus_beta: float | None = None,
    ) -> None:
        self.classifier = classifier
        self.softplus_beta = softplus_beta
        self.distance_kind = checked_distance(distance)
        self.scale = float(scale)
        self.phi = float(phi)
        # The reference f(x_adv) stays in the attack's graph when the attack differentiates through the defense.
        with torch.set_grad_enabled(create_graph_ref):
            self.x_ref = x_ref if create_graph_ref else x_ref.detach()
            self.f_ref = self.f(self.x_ref)

    def f(self, image: Tensor) -> Tensor:
        """The classifier's logits; with ``softplus_beta`` set, its ReLUs are softplus (the smooth surrogate)."""
        if self.softplus_beta is None:
            return self.classifier(image)
        with softplus_relus(self.softplus_beta):
            return self.classifier(image)

    def distance(self, pred_x0: Tensor) -> Tensor:
        image = to_image_space(pred_x0)
        diff = (self.f(image) - self.f_ref).flatten(1)
        d = diff.norm(dim=1) if self.distance_kind == "norm" else diff.pow(2).sum(1)
        if self.phi:
            d = d + self.phi * (1.0 - ssim_per_image(image, self.x_ref.to(image.dtype)))
        return d

    def __call__(self, x_t: Tensor, pred_x0: Tensor, t_model: Tensor, create_graph: bool) -> Tensor:
        d = self.distance(pred_x0).sum()
        (grad,) = torch.autograd.grad(d, x_t, create_graph=create_graph)
        return -self.scale * grad


class DistributionTransfer(DiffPure):
    """Distribution-transfer purifier (see the module docstring).

    Args (besides DiffPure's):
        classifier: the protected model f (the victim), used by the guidance only (frozen).
        variant: ``"paper"`` (guided multi-step) or ``"authors_code"`` (one-shot x̂_0, no guidance).
        scale: s of Eq. 10 (0 disables the guidance); phi: φ of Eq. 11.
        distance: ``"norm"`` (Eq. 11 as printed) or ``"squared"`` (the authors' code), see ``DISTANCES``.
        surrogate_beta: β of the softplus that replaces f's ReLUs inside the guidance of ``smooth_surrogate()``.
        t_star: forward steps on the denoiser's schedule; ``None`` → the step matching ``match_t``.
        match_t: ``{t, num_steps, kind}`` — the reference noise level (the authors' t = 470 of 4000 cosine).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: DiffusionSchedule,
        classifier: nn.Module | None = None,
        weights: str | None = None,
        variant: str = "paper",
        scale: float = 1.0,
        phi: float = 1.0,
        distance: str = "norm",
        surrogate_beta: float = 10.0,
        t_star: int | None = None,
        match_t: Mapping[str, Any] | None = None,
        **kwargs,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")
        if t_star is None:
            t_star = matched_t_star(schedule, match_t or {"t": 470, "num_steps": 4000, "kind": "cosine"})
        if variant == "authors_code":
            kwargs.setdefault("sampler", "one_shot")
            kwargs.setdefault("clip_x0", True)
        super().__init__(denoiser, schedule, weights=weights, t_star=t_star, **kwargs)
        self.variant = variant
        self.scale = float(scale) if variant == "paper" else 0.0
        self.phi = float(phi)
        self.distance = checked_distance(distance)
        if not surrogate_beta > 0:
            raise ValueError(f"surrogate_beta (the softplus β of the smooth surrogate) must be > 0, got {surrogate_beta}")
        self.surrogate_beta = float(surrogate_beta)
        #: None: the real guidance; a β: this is the smooth surrogate (``smooth_surrogate``).
        self.guidance_softplus_beta: float | None = None
        if self.scale and classifier is None:
            raise ValueError("distribution transfer's guidance needs the protected model: set classifier (e.g. ${victim})")
        if self.scale and self.sampler == "one_shot":
            raise ValueError("the one-shot sampler returns x̂_0 before any guided step: use sampler=ddpm or scale=0")
        self.classifier = None if classifier is None else classifier.eval().requires_grad_(False)
        if self.scale and hasattr(self.denoiser, "double_backward"):
            self.denoiser.double_backward = True  # the attack's gradient runs through the guidance's gradient

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, scale={self.scale:g}, phi={self.phi:g}, distance={self.distance}"

    def train(self, mode: bool = True) -> "DistributionTransfer":
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()
        return self

    def guidance(self, x: Tensor) -> Guidance | None:
        if not self.scale:
            return None
        return ClassifierGuidance(self.classifier, x, self.scale, self.phi,
                                  create_graph_ref=torch.is_grad_enabled() and x.requires_grad, distance=self.distance,
                                  softplus_beta=self.guidance_softplus_beta)

    def smooth_surrogate(self) -> "DistributionTransfer | None":
        """The same chain with the guidance classifier's ReLUs as softplus(``surrogate_beta``·)/β (None when unguided:
        the unguided chain is smooth already). Shares the denoiser and classifier; same noise under the same seed."""
        if not self.scale or self.guidance_softplus_beta is not None:
            return None
        return self.variant_copy(guidance_softplus_beta=self.surrogate_beta)


def matched_t_star(schedule: DiffusionSchedule, match_t: Mapping[str, Any]) -> int:
    """Forward steps on ``schedule`` with the noise level of step ``match_t['t']`` of a reference schedule."""
    reference = DiffusionSchedule(int(match_t.get("num_steps", 4000)), kind=str(match_t.get("kind", "cosine")),
                                  beta_start=float(match_t.get("beta_start", 1e-4)), beta_end=float(match_t.get("beta_end", 0.02)))
    t = int(match_t["t"])
    if not 0 <= t < reference.num_steps:
        raise ValueError(f"match_t.t must be in [0, {reference.num_steps - 1}], got {t}")
    return schedule.match_step(float(reference._alphas_cumprod64[t])) + 1
