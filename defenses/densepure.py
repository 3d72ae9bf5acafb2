"""DensePure (Xiao et al., ICLR 2023, "DensePure: Understanding Diffusion Models for Adversarial Robustness").

DiffPure's chain run ``votes`` times on the same input, the victim's label taken by majority vote over the
reverse passes (default 10, DensePure's ``--majority_vote_num``). The vote lives in ``Defended`` (it combines
the victim's outputs, which a purifier never sees): a purifier with ``votes > 1`` is classified by
``Defended.vote``.

Readings (docs/decisions.md):

* **Noise level**: DensePure picks t* so that the diffusion noise equals the smoothing noise σ:
  (1 − ᾱ_t)/ᾱ_t = (2σ)² (``DiffusionSchedule.step_for_sigma``; Carlini et al. 2022's search, DensePure's closed
  form on the cosine schedule give the same step). Default σ = 0.25 (DensePure's smallest CIFAR-10 σ): step
  145 of the 1000-step linear DDPM. ``t_star`` set explicitly overrides σ.
* **Reverse passes**: the DDPM ancestral sampler over all t* steps (DensePure's default without
  ``--use_t_steps``); ``reverse_steps`` is its fast respaced sampling. Each pass draws its own forward noise
  too (DensePure's runs share the randomized-smoothing noise, which certification supplies; an empirical
  attack has no smoothing noise to share).
* **Vote and gradient**: the value is the hard majority vote (ties broken by the mean softmax); its gradient
  is that of the log mean softmax over the passes — the vote's own gradient is zero almost everywhere, so an
  attack through it would be gradient masking by construction. Loss-EOT then averages this over draws.
"""
from __future__ import annotations

from torch import nn

from defenses.diffpure import DiffPure
from models.diffusion.schedule import DiffusionSchedule


class DensePure(DiffPure):
    """DiffPure's chain, ``votes`` reverse passes per input, majority vote (see the module docstring).

    Args (besides DiffPure's):
        votes: reverse passes per input (DensePure's default 10).
        sigma: smoothing noise level on [0, 1] images that fixes t* (used when ``t_star`` is ``None``).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: DiffusionSchedule,
        weights: str | None = None,
        t_star: int | None = None,
        sigma: float = 0.25,
        votes: int = 10,
        **kwargs,
    ) -> None:
        if int(votes) < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        if t_star is None:
            t_star = schedule.step_for_sigma(float(sigma)) + 1
        super().__init__(denoiser, schedule, weights=weights, t_star=t_star, **kwargs)
        self.sigma = float(sigma)
        self.votes = int(votes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, votes={self.votes}, sigma={self.sigma:g}"

    def weakened(self) -> "DensePure":
        weak = super().weakened()
        weak.votes = 1
        return weak
