"""Diffuse-then-denoise: the purification chain DiffPure, DensePure and distribution transfer share.

x (image in [0, 1]) → x_0 = 2x − 1 → x_{t*} ~ q(x_{t*} | x_0) → reverse process back to step 0 → (x̂ + 1)/2.

One function, so that the three defenses differ only in their arguments:

* **t\\***: the number of forward steps of the *trained* schedule: the image is diffused to step index
  ``t_star − 1`` (``t_star = 100`` of T = 1000 is DiffPure's t* = 0.1, as in its ``diffpure_ddpm.py``, which
  diffuses with ᾱ[t*−1] and runs ``reversed(range(t*))``); ``t_star = 0`` returns the input unchanged.
* **sampler**: ``"ddpm"`` — ancestral posterior steps with the schedule's variance (σ² = β or β̃);
  ``"ddim"`` — deterministic DDIM steps (η = 0; the forward noise is the only randomness); ``"one_shot"`` —
  a single ε_θ call returning the predicted x̂_0 from x_{t*} (what distribution transfer's public code runs).
* **reverse_steps**: ``None`` runs all ``t_star`` trained steps; ``k < t_star`` respaces [0, t* − 1] to k
  evenly spaced steps (both ends kept, so the chain starts exactly at the diffused level) — the CPU-cost
  knob; it changes the sampler, and tables say when it was used.
* **guidance**: a ``Guidance`` term added to every reverse step's mean (``DiffusionSchedule.p_sample``).
* **checkpoint**: recompute each step on the backward pass, so an attack's exact gradient through a long
  chain costs the memory of one step (the gradient is the same: tests compare both).

Every op is differentiable (the final clamp to [0, 1] has the clamp's own gradient), so an attack through
``Defended`` follows the exact gradient of the computed function.
"""
from __future__ import annotations

import torch

from models.diffusion.schedule import DiffusionSchedule, EpsModel, Guidance, to_image_space, to_model_space

SAMPLERS = ("ddpm", "ddim", "one_shot")


def respaced_steps(t_star: int, reverse_steps: int) -> list[int]:
    """``reverse_steps`` evenly spaced step indices in [0, t_star − 1], both ends included, strictly increasing."""
    if not 1 <= reverse_steps <= t_star:
        raise ValueError(f"reverse_steps must be in [1, t_star={t_star}], got {reverse_steps}")
    if reverse_steps == 1:
        return [t_star - 1]
    steps = torch.linspace(0, t_star - 1, reverse_steps, dtype=torch.float64).round().long().unique()
    return steps.tolist()


def check_chain_args(schedule: DiffusionSchedule, t_star: int, sampler: str, reverse_steps: int | None) -> None:
    """One clear error for a chain the schedule cannot run (called by the defenses at construction)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
    if not 0 <= int(t_star) <= schedule.num_steps:
        raise ValueError(f"t_star must be in [0, {schedule.num_steps}] (the trained schedule's T), got {t_star}")
    if reverse_steps is not None and t_star > 0:
        respaced_steps(int(t_star), int(reverse_steps))


def diffuse_and_denoise(
    schedule: DiffusionSchedule,
    eps_model: EpsModel,
    x: torch.Tensor,
    t_star: int,
    *,
    sampler: str = "ddpm",
    reverse_steps: int | None = None,
    guidance: Guidance | None = None,
    clip_x0: bool = False,
    checkpoint: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Purify images ``x`` in [0, 1] (N, C, H, W): diffuse to ``t_star`` and run the reverse process back.

    ``generator`` (optional) draws the forward noise and every step's noise, for reproducible purifications.
    Returns images in [0, 1] of ``x``'s shape and dtype.
    """
    check_chain_args(schedule, t_star, sampler, reverse_steps)
    t_star = int(t_star)
    if t_star == 0:
        return x

    def randn(like: torch.Tensor) -> torch.Tensor:
        if generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)

    x0 = to_model_space(x)
    x_t = schedule.q_sample(x0, t_star - 1, noise=randn(x0))
    if sampler == "one_shot":
        out = schedule.predict_x0(x_t, t_star - 1, schedule.eps(eps_model, x_t, t_star - 1))
        return to_image_space(out).clamp(0.0, 1.0)
    chain = schedule
    steps = t_star
    if reverse_steps is not None and int(reverse_steps) < t_star:
        chain = schedule.respace(respaced_steps(t_star, int(reverse_steps)))
        steps = chain.num_steps
    if sampler == "ddim":
        out = _ddim_loop(chain, eps_model, x_t, steps, clip_x0=clip_x0, checkpoint=checkpoint)
    else:
        out = chain.sample_loop(
            eps_model, x_t, t_start=steps, noise_fn=lambda z, i: randn(z), clip_x0=clip_x0, guidance=guidance,
            checkpoint=checkpoint,
        )
    return to_image_space(out).clamp(0.0, 1.0)


def _ddim_loop(chain: DiffusionSchedule, eps_model: EpsModel, x: torch.Tensor, steps: int, clip_x0: bool, checkpoint: bool) -> torch.Tensor:
    """Deterministic DDIM (η = 0) over the chain's steps ``steps − 1 … 0`` (the last one to the data)."""
    for i in reversed(range(steps)):
        if checkpoint and torch.is_grad_enabled() and x.requires_grad:
            x = torch.utils.checkpoint.checkpoint(chain.ddim_step, eps_model, x, i, i - 1, 0.0, None, clip_x0, use_reentrant=False)
        else:
            x = chain.ddim_step(eps_model, x, i, i - 1, eta=0.0, clip_x0=clip_x0)
    return x
