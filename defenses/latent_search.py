"""Batched latent search ẑ = argmin_z ‖G(z) − x*‖² with random restarts (DiffDefense Eq. 1 / Alg. 1,
Defense-GAN Alg. 1): the inner optimisation shared by every reconstruction defense.

All N images × R restarts are optimised as ONE batch of latents ``z`` of shape ``(N·R, *latent_shape)``,
laid out image-major (row ``n·R + r`` is restart ``r`` of image ``n``). The loss is the **sum over the
batch of the per-sample MSE** (mean over pixels of one restart), so each restart's gradient is exactly
the gradient of its own MSE and does not depend on how many other images or restarts share the batch;
with Adam/SGD (element-wise updates) every restart of every image is therefore optimised independently.

Learning-rate rules (``lr_schedule``), for the update made after generation ``i = 1 … L`` (k = ⌈0.8 L⌉):

* ``"authors"`` — the DiffDefense authors' released code (``reconstructphase.py``): the optimiser is built
  with ``lr`` (0.02) and, after every step, ``schedulerLR`` sets ``cur_lr ← cur_lr · Δ^(1/k)`` starting
  from ``cur_lr = 25`` (the ``lr=25`` default of ``reconstruction_module``). Hence
  η_1 = ``lr`` and η_i = ``lr_decay_start`` · Δ^((i−1)/k) for i ≥ 2 (L = 5: 0.02, 14.06, 7.91, 4.45, 2.5).
* ``"decay"`` — Alg. 1 line 8 as printed: η_i = η_{i−1} · Δ^(1/k) with η_0 = ``lr``, computed *before*
  the update of line 10, so η_i = ``lr`` · Δ^(i/k).
* ``"constant"`` — η_i = ``lr`` (Defense-GAN with a fixed step, ablations).

Iteration count: by default (``extra_generation=False``, DiffDefense Alg. 1 and the authors' loop) there
are L generations G(z); z is updated between them and the reconstruction is the L-th generation, so the
L-th learning rate is never used (the authors' code takes that last optimiser step, but never renders
its result). ``extra_generation=True`` (Defense-GAN: "L steps of gradient descent", then G(z_L)) makes L
updates followed by one more generation.

Runs under ``torch.no_grad()`` / ``torch.inference_mode()`` (scoring, BPDA's forward): gradients are
re-enabled inside, inputs are cloned out of inference mode, and only ``z`` is differentiated
(``torch.autograd.grad``), so a generator's parameters never accumulate ``.grad``. Returned tensors
are detached.

Exact mode (``differentiable=True``, used when an attack differentiates the purifier end to end, Lee &
Kim 2023): the returned reconstruction is a differentiable function of ``target`` x* through the whole
search. Each update z_{i+1} = z_i − u_i(∇_z MSE(G(z_i), x*)) is unrolled, the inner gradient is taken
with ``create_graph=True`` (so ∂z_{i+1}/∂x* includes the second derivatives of G), and the optimiser is
written out in torch ops — Adam exactly as ``torch.optim.Adam`` computes it (``lerp`` of the first
moment, ``addcmul`` of the second, bias corrections 1 − β^k, ε = 1e-8 added to √v̂, ``addcdiv``), plain
SGD as ``z − η g`` — so the forward values equal the ``torch.optim`` path of the default mode (same
seeds, same learning-rate schedule): bit for bit when the inner gradient's backward is computed by the
same kernels (MLP/conv generators, DiffDefense without ``grad_through_denoiser``); through a U-Net,
``create_graph=True`` makes GroupNorm and SiLU use their twice-differentiable backward formulas, which
round differently in float32 (≈1e-7 per gradient, up to 4e-5 in a reconstruction after Adam steps at
the DiffDefense authors' learning rates; ≈1e-15 in float64). The restart is picked by argmin of the
final MSE; the index is piecewise constant in x*, so the gradient flows through the selected restart
only (indexing). √v of Adam is evaluated with a zero gradient where v = 0 exactly (a restart whose
gradient entry is exactly 0), where the true derivative of √v is infinite and would turn 0·∞ into NaN.
The result is also a function of ``generate``'s parameters: a generator that is not frozen (the
purifiers freeze theirs) would receive ``.grad`` from an outer ``backward()``.

Memory: every unrolled step (generation, inner gradient, optimiser update) runs inside
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (``checkpoint_steps=True``, default), so
between forward and backward only each step's inputs (z_i and Adam's moments: O(L · N·R · |z|)) are
kept, and one step's graph at a time is rebuilt during backward — instead of the activations and
double-backward graph of all L generations (with DiffDefense's ``grad_through_denoiser``, T*·L U-Net
passes). Non-reentrant checkpointing supports the ``torch.autograd.grad(create_graph=True)`` inside each
step (tested: identical gradients with and without it). Recomputation replays the randomness of the
step: the global RNGs via ``preserve_rng_state`` and ``generator`` by saving and restoring its state, so
``generate`` must draw its noise from one of those (DiffDefense draws its σ_t noise from the same
``generator`` as the initial latents, or from the global RNG). ``checkpoint_steps=False`` keeps the whole
graph (faster, memory ∝ L).

Exact mode is only entered when a gradient can be asked for: ``differentiable=True``, grad mode
enabled, not in inference mode, and ``target.requires_grad``. Otherwise (scoring under ``no_grad``,
BPDA's forward, detection) the search is the default path above, with its cost and its values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LR_SCHEDULES = ("authors", "decay", "constant")
OPTIMIZERS = ("adam", "sgd")
ADAM_EPS = 1e-8  # torch.optim.Adam's default, used by both paths
#: How an adaptive attack differentiates a latent-search purifier: ``"exact"`` = through the unrolled
#: search (``latent_search(differentiable=True)``), ``"bpda"`` = identity backward (Athalye et al. 2018).
GRADIENT_MODES = ("exact", "bpda")


@dataclass
class LatentSearchResult:
    reconstruction: Tensor  # (N, C, H, W) in [0,1]: per image, the restart with the lowest final MSE
    mse_best: Tensor  # (N,) MSE of that restart
    mse_mean: Tensor  # (N,) mean final MSE over restarts (DiffDefense's detection score)
    latent: Tensor | None = None  # (N, *latent_shape): the latent that produced ``reconstruction``
    mse_all: Tensor | None = None  # (N, R): final MSE of every restart


def check_gradient_mode(gradient: str) -> str:
    """``gradient`` if it is one of :data:`GRADIENT_MODES`, else one ValueError naming the valid values."""
    if gradient not in GRADIENT_MODES:
        raise ValueError(f"unknown gradient {gradient!r}: use one of {GRADIENT_MODES}")
    return gradient


def decay_steps(iterations: int) -> int:
    """k = ⌈0.8 L⌉ of Alg. 1 line 8 (integer arithmetic; equals the authors' ``math.ceil(L * 0.8)``)."""
    return -(-4 * int(iterations) // 5)


def learning_rates(
    iterations: int,
    rule: str = "authors",
    lr: float = 0.02,
    decay: float = 0.1,
    lr_decay_start: float = 25.0,
) -> list[float]:
    """The L learning rates η_1 … η_L of the updates after generations 1 … L (see the module docstring)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    k = decay_steps(iterations)
    if rule == "authors":
        return [float(lr)] + [float(lr_decay_start) * decay ** (i / k) for i in range(1, iterations)]
    if rule == "decay":
        return [float(lr) * decay ** (i / k) for i in range(1, iterations + 1)]
    if rule == "constant":
        return [float(lr)] * iterations
    raise ValueError(f"unknown lr_schedule {rule!r}: use one of {LR_SCHEDULES}")


def latent_search(
    generate: Callable[[Tensor], Tensor],
    target: Tensor,
    latent_shape: tuple[int, ...],
    iterations: int,
    restarts: int,
    optimizer: str = "adam",
    lr: float = 0.02,
    lr_schedule: str = "authors",
    decay: float = 0.1,
    init: Callable[[tuple[int, ...]], Tensor] | None = None,
    generator: torch.Generator | None = None,
    *,
    lr_decay_start: float = 25.0,
    betas: tuple[float, float] = (0.5, 0.999),
    extra_generation: bool = False,
    differentiable: bool = False,
    checkpoint_steps: bool = True,
) -> LatentSearchResult:
    """Find, for every image of ``target``, the latent whose generation is closest in MSE.

    Args:
        generate: ``z (N·R, *latent_shape) -> images (N·R, C, H, W)`` in [0, 1], differentiable in ``z``.
        target: ``(N, C, H, W)`` images to reconstruct (differentiated only in exact mode).
        latent_shape: shape of one latent.
        iterations: L (see the module docstring for what one iteration is).
        restarts: R random initial latents per image, optimised in parallel.
        optimizer: ``"adam"`` (the DiffDefense authors' code: Adam, ``betas`` (0.5, 0.999)) or ``"sgd"``
            (plain gradient descent z ← z − η ∇_z MSE, DiffDefense Alg. 1 line 10 / Defense-GAN).
        lr / lr_schedule / decay / lr_decay_start: the learning-rate rule (module docstring).
        init: ``init(shape) -> z`` for the ``(N·R, *latent_shape)`` initial latents; default N(0, I)
            drawn from ``generator`` (if given) or the global RNG.
        generator: RNG of the default initialisation; in exact mode with ``checkpoint_steps`` its state
            is also replayed when a step is recomputed (``generate`` may draw from it).
        betas: Adam's (β1, β2).
        extra_generation: ``False`` = L generations, L − 1 effective updates (DiffDefense); ``True`` = L
            updates then a final generation (Defense-GAN).
        differentiable: allow exact mode (module docstring): when a gradient can be asked for
            (grad mode on, not inference mode, ``target.requires_grad``), the result is a differentiable
            function of ``target`` through the unrolled search; otherwise this flag changes nothing.
        checkpoint_steps: in exact mode, recompute each unrolled step during backward
            (``torch.utils.checkpoint``, non-reentrant) instead of keeping its graph.

    Returns:
        :class:`LatentSearchResult`: the lowest-MSE restart per image, its MSE, the mean MSE over
        restarts, the winning latents and all final MSEs — detached, except in exact mode, where every
        field carries the graph back to ``target``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {OPTIMIZERS}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if target.dim() < 2:
        raise ValueError(f"target must be a batch (N, …), got shape {tuple(target.shape)}")
    lrs = learning_rates(iterations, lr_schedule, lr, decay, lr_decay_start)
    n, r = target.shape[0], int(restarts)
    shape = (n * r, *tuple(int(s) for s in latent_shape))
    generations = iterations + 1 if extra_generation else iterations
    exact = (
        bool(differentiable)
        and torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
        and target.requires_grad
    )

    with torch.inference_mode(False), torch.enable_grad():
        # Default path: clone out of inference mode (inference tensors cannot take part in autograd).
        # Exact mode: keep the target's graph (repeat_interleave is differentiable).
        tgt = target.repeat_interleave(r, dim=0) if exact else target.detach().clone().repeat_interleave(r, dim=0)
        if init is not None:
            z0 = init(shape)
        else:
            device = generator.device if generator is not None else tgt.device
            z0 = torch.randn(shape, generator=generator, device=device, dtype=tgt.dtype)
        if tuple(z0.shape) != shape:
            raise ValueError(f"init returned latents of shape {tuple(z0.shape)}, expected {shape}")
        z0 = z0.detach().clone().to(device=tgt.device, dtype=tgt.dtype)

        if exact:
            z, images, per_sample = _unrolled_search(
                generate, z0, tgt, lrs, generations, optimizer, betas, generator, checkpoint_steps
            )
        else:
            z, images, per_sample = _optim_search(generate, z0, tgt, lrs, generations, optimizer, betas)

        mse = per_sample.view(n, r)
        # A diverged restart (NaN) never wins unless every restart diverged. The index is piecewise
        # constant in the target: in exact mode the gradient flows through the selected restart only.
        best = torch.nan_to_num(mse.detach(), nan=float("inf")).argmin(dim=1)
        rows = torch.arange(n, device=mse.device)
        images = images.view(n, r, *images.shape[1:])
        latents = z.view(n, r, *shape[1:])
        return LatentSearchResult(
            reconstruction=images[rows, best].clone(),
            mse_best=mse[rows, best].clone(),
            mse_mean=mse.mean(dim=1),
            latent=latents[rows, best].clone(),
            mse_all=mse.clone(),
        )


def _optim_search(
    generate: Callable[[Tensor], Tensor],
    z0: Tensor,
    tgt: Tensor,
    lrs: list[float],
    generations: int,
    optimizer: str,
    betas: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor]:
    """The default path: ``torch.optim`` on a leaf ``z``; returns detached (z, images, per-sample MSE)."""
    z = z0.requires_grad_(True)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([z], lr=lrs[0], betas=tuple(betas), eps=ADAM_EPS)
    else:
        opt = torch.optim.SGD([z], lr=lrs[0])
    for g in range(generations):
        if g == generations - 1:
            with torch.no_grad():
                images = generate(z)
                per_sample = _per_sample_mse(images, tgt)
            break
        images = generate(z)
        per_sample = _per_sample_mse(images, tgt)
        (grad,) = torch.autograd.grad(per_sample.sum(), z)
        for group in opt.param_groups:
            group["lr"] = lrs[g]
        z.grad = grad
        opt.step()
        z.grad = None
    return z.detach(), images.detach(), per_sample.detach()


def _unrolled_search(
    generate: Callable[[Tensor], Tensor],
    z0: Tensor,
    tgt: Tensor,
    lrs: list[float],
    generations: int,
    optimizer: str,
    betas: tuple[float, float],
    generator: torch.Generator | None,
    checkpoint_steps: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact mode: the same search as ``_optim_search`` with every update a differentiable torch op."""
    beta1, beta2 = float(betas[0]), float(betas[1])
    adam = optimizer == "adam"

    def step(z: Tensor, m: Tensor | None, v: Tensor | None, target: Tensor, lr: float, k: int):
        if not z.requires_grad:  # z_0: a constant latent, differentiated only for its own update
            z = z.detach().requires_grad_(True)
        per_sample = _per_sample_mse(generate(z), target)
        (grad,) = torch.autograd.grad(per_sample.sum(), z, create_graph=True)
        if not adam:
            return torch.add(z, grad, alpha=-lr), m, v
        # torch.optim.Adam (single-tensor, non-capturable) op for op; k = the 1-based step count.
        m = torch.lerp(m, grad, 1 - beta1)
        v = torch.addcmul(v.mul(beta2), grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** float(k)
        bias_correction2_sqrt = (1 - beta2 ** float(k)) ** 0.5
        denom = (_sqrt_zero_grad_at_zero(v) / bias_correction2_sqrt).add(ADAM_EPS)
        return torch.addcdiv(z, m, denom, value=-lr / bias_correction1), m, v

    def final(z: Tensor) -> Tensor:
        return generate(z)

    m = torch.zeros_like(z0) if adam else None
    v = torch.zeros_like(z0) if adam else None
    z = z0
    for g in range(generations - 1):
        if checkpoint_steps:
            z, m, v = checkpoint(_replaying(step, generator), z, m, v, tgt, lrs[g], g + 1, use_reentrant=False)
        else:
            z, m, v = step(z, m, v, tgt, lrs[g], g + 1)
    images = checkpoint(_replaying(final, generator), z, use_reentrant=False) if checkpoint_steps else final(z)
    return z, images, _per_sample_mse(images, tgt)


def _replaying(fn: Callable, generator: torch.Generator | None) -> Callable:
    """``fn`` whose recomputations (checkpoint's backward) replay ``generator`` from its state now.

    ``checkpoint(preserve_rng_state=True)`` replays the global RNGs only. The first call runs ``fn``
    and leaves ``generator`` advanced, as an un-checkpointed call would; every later call (a
    recomputation) starts from the saved state and restores the generator's state afterwards, so a
    backward pass neither changes the noise of the step nor the caller's generator.
    """
    if generator is None:
        return fn
    state = generator.get_state()
    calls = [0]

    def run(*args):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*args)
        outer = generator.get_state()
        generator.set_state(state)
        try:
            return fn(*args)
        finally:
            generator.set_state(outer)

    return run


def _sqrt_zero_grad_at_zero(v: Tensor) -> Tensor:
    """√v with the value of ``torch.sqrt`` and derivative 0 where v = 0 (∞ there; 0·∞ would be NaN)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _per_sample_mse(images: Tensor, target: Tensor) -> Tensor:
    if images.shape != target.shape:
        raise ValueError(
            f"generate returned images of shape {tuple(images.shape)}, expected {tuple(target.shape)} "
            "(one per latent, same size as the target)"
        )
    return (images - target).pow(2).flatten(1).mean(dim=1)
