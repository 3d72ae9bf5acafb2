"""DiffPure (Nie et al., ICML 2022, "Diffusion Models for Adversarial Purification"): diffuse, then denoise.

x → x_0 = 2x − 1 → x_{t*} = √ᾱ_{t*} x_0 + √(1 − ᾱ_{t*}) ε → reverse process to step 0 → (x̂ + 1)/2, with the
one chain of ``models.diffusion.chain``. The field's reference diffusion purifier, and the base class of
DensePure (several reverse passes, majority vote) and distribution transfer (a guided reverse process).

Readings (docs/decisions.md):

* **t\\* = 0.1** for L∞ (DiffPure's CIFAR-10 scripts, ``--t 100``), **0.075** for L2 (``--t 75``): on a
  T = 1000 schedule ``t_star = 100`` / ``75`` forward steps (diffused with ᾱ[t* − 1], as its code).
* **Sampler**: the DDPM ancestral sampler over all t* trained steps, σ_t² = β_t (DiffPure's
  ``diffpure_ddpm.py``, "fixedlarge"). DiffPure's CIFAR-10 results use its VP-SDE solved with
  ``torchsde.sdeint_adjoint`` (Euler, dt = 1e-3 ≈ the same 100 steps); the SDE/adjoint solver is a documented
  omission: the discrete chain is the same process discretised on the trained steps, and its exact gradient
  (through every step, with activation checkpointing) is what the adjoint method computes.
* **Gradient**: ``gradient="exact"`` (default) — the adaptive attack backpropagates through the whole chain
  (Lee & Kim, ICCV 2023: exact gradients are what breaks diffusion purification); ``"bpda"`` — the identity
  BPDA comparison (DiffPure's own BPDA+EOT evaluation). ``also_bpda=True`` attacks along both paths and keeps
  each image's worse candidate.
* ``reverse_steps`` respaces the chain to fewer steps (CPU runs); results say when it was used.

``stochastic = True``: fresh forward and reverse noise on every call → EOT in adaptive attacks, N-draw scores.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from defenses.base import Purifier
from defenses.latent_search import check_gradient_mode
from models.diffusion.chain import check_chain_args, diffuse_and_denoise
from models.diffusion.schedule import DiffusionSchedule, Guidance
from models.weights import load_weights, train_hint


class DiffPure(Purifier):
    """Diffuse to ``t_star`` and denoise with the reverse process (see the module docstring).

    Args:
        denoiser: ε_θ(x_t, t) (frozen: eval mode, no parameter gradients).
        schedule: the schedule ``denoiser`` was trained with.
        weights: the denoiser's weights file (``None``: ``denoiser`` is already trained, e.g. a pretrained one).
        t_star: forward steps of the trained schedule (0 = no purification: the identity).
        sampler: ``"ddpm"`` (default), ``"ddim"`` (deterministic reverse) or ``"one_shot"`` (x̂_0 from x_{t*}).
        reverse_steps: ``None`` = all ``t_star`` steps; fewer = a respaced chain.
        clip_x0: clamp x̂_0 to [−1, 1] inside every step (Ho et al.'s sampler); default off (Eq. 11).
        checkpoint: recompute each reverse step on the backward pass (same gradient, one step's memory).
        gradient: ``"exact"`` or ``"bpda"`` (values are identical either way).
        also_bpda: with exact gradients, also attack along identity BPDA and keep the worse candidate.
    """

    stochastic = True
    differentiable = True

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: DiffusionSchedule,
        weights: str | None = None,
        t_star: int = 100,
        sampler: str = "ddpm",
        reverse_steps: int | None = None,
        clip_x0: bool = False,
        checkpoint: bool = True,
        gradient: str = "exact",
        also_bpda: bool = False,
        denoiser_name: str = "ddpm_cifar10",
    ) -> None:
        super().__init__()
        check_gradient_mode(gradient)
        check_chain_args(schedule, int(t_star), sampler, reverse_steps)
        if weights is not None:
            path = Path(weights)
            load_weights(denoiser, path, missing_hint=train_hint(path, "denoiser", denoiser_name) + f" (denoiser={denoiser_name})")
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.schedule = schedule
        self.weights = None if weights is None else str(weights)
        self.t_star = int(t_star)
        self.sampler = sampler
        self.reverse_steps = None if reverse_steps is None else int(reverse_steps)
        self.clip_x0 = bool(clip_x0)
        self.checkpoint = bool(checkpoint)
        self.gradient = gradient
        self.differentiable = gradient == "exact"  # instance attribute: Defended / the threat models read it
        self.also_bpda = bool(also_bpda) and self.differentiable
        # t* = 0 is the identity: deterministic, so the evaluation need not spend draws on it.
        self.stochastic = self.t_star > 0

    def extra_repr(self) -> str:
        return (
            f"t_star={self.t_star}/{self.schedule.num_steps}, sampler={self.sampler}, reverse_steps={self.reverse_steps}, "
            f"gradient={self.gradient}, checkpoint={self.checkpoint}"
        )

    def train(self, mode: bool = True) -> "DiffPure":
        """The denoiser stays in eval mode (dropout off) whatever the wrappers around the purifier do."""
        super().train(mode)
        self.denoiser.eval()
        return self

    def guidance(self, x: Tensor) -> Guidance | None:
        """The reverse process's guidance for input ``x`` (none for DiffPure; distribution transfer's D)."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        param = next(self.denoiser.parameters(), None)
        dtype = x.dtype if param is None else param.dtype
        xin = x.to(dtype)
        out = diffuse_and_denoise(
            self.schedule, self.denoiser, xin, self.t_star, sampler=self.sampler, reverse_steps=self.reverse_steps,
            guidance=self.guidance(xin), clip_x0=self.clip_x0, checkpoint=self.checkpoint,
        )
        return out.to(x.dtype)

    def weakened(self) -> "DiffPure":
        """The same defense with t* = 0 (no diffusion): the audit's "a weakened defense must be weaker" check
        compares it with the undefended model, to which it must fall."""
        return self.variant_copy(t_star=0, stochastic=False)

