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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

LR_SCHEDULES = ("authors", "decay", "constant")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class LatentSearchResult:
    reconstruction: Tensor  # (N, C, H, W) in [0,1]: per image, the restart with the lowest final MSE
    mse_best: Tensor  # (N,) MSE of that restart
    mse_mean: Tensor  # (N,) mean final MSE over restarts (DiffDefense's detection score)
    latent: Tensor | None = None  # (N, *latent_shape): the latent that produced ``reconstruction``
    mse_all: Tensor | None = None  # (N, R): final MSE of every restart


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
) -> LatentSearchResult:
    """Find, for every image of ``target``, the latent whose generation is closest in MSE.

    Args:
        generate: ``z (N·R, *latent_shape) -> images (N·R, C, H, W)`` in [0, 1], differentiable in ``z``.
        target: ``(N, C, H, W)`` images to reconstruct (not differentiated).
        latent_shape: shape of one latent.
        iterations: L (see the module docstring for what one iteration is).
        restarts: R random initial latents per image, optimised in parallel.
        optimizer: ``"adam"`` (the DiffDefense authors' code: Adam, ``betas`` (0.5, 0.999)) or ``"sgd"``
            (plain gradient descent z ← z − η ∇_z MSE, DiffDefense Alg. 1 line 10 / Defense-GAN).
        lr / lr_schedule / decay / lr_decay_start: the learning-rate rule (module docstring).
        init: ``init(shape) -> z`` for the ``(N·R, *latent_shape)`` initial latents; default N(0, I)
            drawn from ``generator`` (if given) or the global RNG.
        generator: RNG of the default initialisation.
        betas: Adam's (β1, β2).
        extra_generation: ``False`` = L generations, L − 1 effective updates (DiffDefense); ``True`` = L
            updates then a final generation (Defense-GAN).

    Returns:
        :class:`LatentSearchResult` (detached): the lowest-MSE restart per image, its MSE, the mean MSE
        over restarts, the winning latents and all final MSEs.
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

    with torch.inference_mode(False), torch.enable_grad():
        # Clone out of inference mode (inference tensors cannot take part in autograd).
        tgt = target.detach().clone().repeat_interleave(r, dim=0)
        if init is not None:
            z0 = init(shape)
        else:
            device = generator.device if generator is not None else tgt.device
            z0 = torch.randn(shape, generator=generator, device=device, dtype=tgt.dtype)
        if tuple(z0.shape) != shape:
            raise ValueError(f"init returned latents of shape {tuple(z0.shape)}, expected {shape}")
        z = z0.detach().clone().to(device=tgt.device, dtype=tgt.dtype).requires_grad_(True)
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam([z], lr=lrs[0], betas=tuple(betas))
        else:
            opt = torch.optim.SGD([z], lr=lrs[0])

        for g in range(generations):
            last = g == generations - 1
            if last:
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

        mse = per_sample.detach().view(n, r)
        # A diverged restart (NaN) never wins unless every restart diverged.
        best = torch.nan_to_num(mse, nan=float("inf")).argmin(dim=1)
        rows = torch.arange(n, device=mse.device)
        images = images.detach().view(n, r, *images.shape[1:])
        latents = z.detach().view(n, r, *shape[1:])
        return LatentSearchResult(
            reconstruction=images[rows, best].clone(),
            mse_best=mse[rows, best].clone(),
            mse_mean=mse.mean(dim=1),
            latent=latents[rows, best].clone(),
            mse_all=mse.clone(),
        )


def _per_sample_mse(images: Tensor, target: Tensor) -> Tensor:
    if images.shape != target.shape:
        raise ValueError(
            f"generate returned images of shape {tuple(images.shape)}, expected {tuple(target.shape)} "
            "(one per latent, same size as the target)"
        )
    return (images - target).pow(2).flatten(1).mean(dim=1)
