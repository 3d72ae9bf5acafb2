"""DiffDefense (Silva, Seidenari & Del Bimbo 2023): reconstruct the input with the reverse process of a DDPM.

G(z_T) runs the reverse process from a latent z_T through the diffusion steps T*−1, …, 0; the defense
searches ẑ = argmin_z MSE(G(z), x*) from R random N(0, I) latents for L iterations (Alg. 1) and returns,
per image, the reconstruction of the restart with the lowest final MSE.

Our readings (docs/decisions.md), with their sources:

* **Reverse step**: Eq. 2 has typos (a stray "−", √(1−α_t) for √(1−ᾱ_t)); we use the standard DDPM step
  ``DiffusionSchedule.p_sample`` (Ho et al. Eq. 11, σ_t = √β_t as the paper states), with fresh noise
  n ~ N(0, I) at every step of every iteration (Alg. 1 line 5).
* **T\*** and the chain (``chain``): ``"trained"`` (default, ours) is a truncated start of the *trained*
  schedule: z_T is treated as x_{T*} and the reverse process runs the trained steps T*−1, …, 0
  (``sample_loop(…, t_start=T*)``) with the trained coefficients and σ_t² = β_t, so the U-Net sees exactly
  the time indices the authors' code feeds it (14 … 0 for T* = 15). ``"respaced"`` is the authors' chain:
  ``getGenerator`` builds a *fresh* linear schedule of T* steps, ``DDPM(network, diffusion_step,
  beta_start=1e-4, beta_end=0.02)`` (``chain_betas``; their DDPM itself was trained with β 1e-5 → 0.02 over
  T = 100, ``DDPM.py``'s defaults), and ``DDPM.sample`` runs ``stepDDIM`` over t = T*−1, …, 0 of it:
  DDIM with η = 1, i.e. √ᾱ_{t−1}·x̂_0 + √(1 − ᾱ_{t−1} − β̃_t)·ε_θ + √β̃_t·n, which equals the DDPM posterior
  step with σ_t² = β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t (``variance="posterior"``), and at t = 0 their ``step``
  (Eq. 11 mean, no noise) — all with ᾱ of the fresh T*-step schedule. The U-Net is called with the same
  integers t = T*−1, …, 0 (``time_tensor = ones(N, 1) * t``, ``ddpm.reverse(z_t, time_tensor)``): the
  trained network's time indices 0 … T*−1, whose noise levels are those of the trained T = 100 schedule,
  not of the fresh one (for T* = 15 the fresh β_14 is 0.02, the trained β_14 ≈ 0.0028).
* **Data space** (``data_space``): the space the denoiser was trained in and the chain runs in. ``[-1, 1]``
  (default, ours: ``DenoiserModule`` trains on 2x − 1) or ``[0, 1]`` (the authors' ``DDPM.py`` trains on raw
  ``ToTensor()`` images). It is recorded with the denoiser's weights (``models.weights.DATA_RANGE_KEY``) and
  checked when they are loaded: weights of the other space fail in one line.
* **Optimiser / learning rate**: the authors' code (Adam β = (0.5, 0.999), 0.02 for the first step then
  25·0.1^((i−1)/⌈0.8L⌉)), selectable to Alg. 1's plain gradient descent with η_i = η_{i−1}·Δ^(1/⌈0.8L⌉);
  see ``defenses.latent_search``.
* **Gradient through the U-Net**: the authors evaluate ε_θ under ``no_grad``; then ∂z_{t−1}/∂z_t =
  1/√α_t · I (only the linear terms of the step carry gradient) and ∇_{z_T} MSE = Π_t 1/√α_t · ∇_{z_0} MSE.
  ``grad_through_denoiser=True`` backpropagates through ε_θ as well (the exact gradient of Eq. 1).
* **Output space**: z lives in the denoiser's data space (where the reverse chain starts from N(0, I)).
  ``output="sigmoid"`` is the authors' x_r = sigmoid(z_0), whatever the data space (with their [0, 1]
  DDPM, too, sigmoid is a bounded squashing, not the inverse of the data map: with the authors' large
  learning rates the optimisation drives z_0 into the saturated range). ``output="clamp"`` is the exact
  inverse of the training map (``to_image_space(z_0)`` for [−1, 1], z_0 itself for [0, 1]) clamped to
  [0, 1], with a straight-through gradient (the clamp's zero gradient would freeze every pixel that starts
  outside the range). Either way the MSE is between x_r and x* in image space [0, 1].
* **Restarts**: per image, the restart with the lowest final MSE (the authors' ``findBestReconstruction``);
  ``reconstruct(x).mse_mean`` (final MSE averaged over restarts) is the authors' detection score (§4.4).

Flags for the evaluation:

* ``stochastic = True``: random z_T and σ_t·n noise → adaptive attacks use EOT and scores are over draws.
* ``differentiable`` (``gradient="exact"``, default → ``True``): the output is the result of an inner
  search over z (L optimiser steps, then the restart with the lowest final MSE), and that search is
  itself a chain of differentiable torch ops in x*: each update z_{i+1} = z_i − u(∇_z MSE(G(z_i), x*)) is
  unrolled with the inner gradient kept in the graph (``create_graph``), Adam's update is written out op
  for op, and the restart choice is an argmin index (piecewise constant) through which the selected
  reconstruction is gathered (``latent_search(differentiable=True)``).
  Lee & Kim (ICCV 2023) showed that such exact gradients through the purification chain are what breaks
  diffusion-based defenses, so the adaptive attack uses them by default (plus EOT). With the authors'
  ``grad_through_denoiser=False`` the attack's Jacobian, like the search's own ∇_z, passes through the
  linear terms of every reverse step, the step updates and the sigmoid, with ε_θ a constant (its
  dependence on x_t is the one term left out: 0.2–0.3 % of a directional derivative on a tiny untrained
  U-Net); with ``grad_through_denoiser=True`` it passes through ε_θ too and is the exact gradient of the
  computed function (finite-difference tested), and per-step activation checkpointing keeps memory at one
  step's graph. The gradient may be small where the sigmoid saturates or Adam's normalisation flattens
  the update; that is the function, not masking by the implementation. ``gradient="bpda"`` is the
  comparison, the previous protocol: ``differentiable = False``, so the adaptive attack uses BPDA with the
  identity (the reconstruction is meant to be close to its input, Athalye et al. 2018 §4.1) combined with
  EOT, as for Defense-GAN.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from defenses.base import Purifier
from defenses.latent_search import LR_SCHEDULES, OPTIMIZERS, LatentSearchResult, check_gradient_mode, latent_search
from models.diffusion.module import check_data_space, data_space_to_images
from models.diffusion.schedule import DiffusionSchedule
from models.weights import DEFAULT_DATA_RANGE, load_weights, train_hint

OUTPUTS = ("sigmoid", "clamp")
CHAINS = ("trained", "respaced")
#: The authors' fresh T*-step schedule (diffDefence.py: ``beta_start: 0.0001, beta_end: 0.02``).
AUTHORS_CHAIN_BETAS = (1e-4, 0.02)
#: The denoiser config the authors' recipe trains (``model=denoiser_authors``), for the "train it first" hint.
AUTHORS_DENOISER = "diffdefense_unet_authors"
DEFAULT_DENOISER = "diffdefense_unet"  # conf/train.yaml's default denoiser


class DiffDefense(Purifier):
    """DiffDefense reconstruction purifier (see the module docstring for every reading).

    Args:
        denoiser: the noise-prediction network ε_θ(x_t, t) (frozen here: eval mode, no gradients).
        schedule: the DDPM schedule the denoiser was trained with.
        weights: path of the denoiser's weights (``None``: use ``denoiser`` as given).
        t_star: T*, the number of reverse steps; the chain runs steps T*−1, …, 0 and the U-Net sees those time
            indices (at most the trained T).
        chain: ``"trained"`` (the trained schedule's steps T*−1 … 0, σ_t² = β_t) or ``"respaced"`` (the authors'
            fresh T*-step linear schedule ``chain_betas``, σ_t² = β̃_t); see the module docstring.
        chain_betas: (β_1, β_T*) of the ``"respaced"`` chain (authors: 1e-4 → 0.02); unused by ``"trained"``.
        data_space: the denoiser's data space, ``[-1, 1]`` (ours) or ``[0, 1]`` (authors); checked against the
            space recorded with ``weights``.
        iterations: L, generations of the latent search (authors' code default 4; the paper's Table 3: 5).
        restarts: R, random initial latents per image (paper: 5).
        optimizer / lr / lr_schedule / decay / lr_decay_start / betas: the latent optimiser
            (``defenses.latent_search``); defaults = the authors' code.
        grad_through_denoiser: ``False`` (authors) = ε_θ under ``no_grad``; ``True`` = full backprop — for
            the search's own ∇_z and, with ``gradient="exact"``, for the attack's gradient in x as well.
        output: ``"sigmoid"`` (authors: x_r = sigmoid(z_0)) or ``"clamp"`` (to_image_space(z_0) in [0, 1]).
        clip_x0: use the clipped-x̂_0 posterior mean in the reverse step (default ``False``: Eq. 11 exactly);
            it clips to [−1, 1], so only for ``data_space`` [−1, 1].
        gradient: ``"exact"`` (default: the instance is ``differentiable`` and its forward is a
            differentiable function of x through the unrolled search) or ``"bpda"`` (not
            differentiable: adaptive attacks use BPDA with the identity). Values are identical either way.
        checkpoint: with ``gradient="exact"``, recompute each unrolled step on the backward pass instead
            of storing its graph (``torch.utils.checkpoint``; same gradient, memory of one step). ``None``
            (default) = ``grad_through_denoiser``: only then does a step's graph hold U-Net activations;
            without it the graph is a few latent-sized tensors per reverse step, and recomputation would
            only repeat the ε_θ passes (measured: 3× the time for no memory saving).
    """

    stochastic = True
    # Class default = what the search is without the exact mode; __init__ sets the instance's from ``gradient``.
    differentiable = False

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: DiffusionSchedule,
        weights: str | None = None,
        t_star: int = 15,
        iterations: int = 5,
        restarts: int = 5,
        optimizer: str = "adam",
        lr: float = 0.02,
        lr_schedule: str = "authors",
        decay: float = 0.1,
        lr_decay_start: float = 25.0,
        betas: tuple[float, float] = (0.5, 0.999),
        grad_through_denoiser: bool = False,
        output: str = "sigmoid",
        clip_x0: bool = False,
        gradient: str = "exact",
        checkpoint: bool | None = None,
        chain: str = "trained",
        chain_betas: tuple[float, float] = AUTHORS_CHAIN_BETAS,
        data_space: tuple[float, float] = DEFAULT_DATA_RANGE,
    ) -> None:
        super().__init__()
        check_gradient_mode(gradient)
        if not 1 <= int(t_star) <= schedule.num_steps:
            raise ValueError(f"t_star must be in [1, {schedule.num_steps}] (the trained schedule's T), got {t_star}")
        if chain not in CHAINS:
            raise ValueError(f"unknown chain {chain!r}: use one of {CHAINS}")
        data_space = check_data_space(data_space, "DiffDefense data_space")
        if clip_x0 and data_space != DEFAULT_DATA_RANGE:
            raise ValueError("clip_x0 clamps x̂_0 to [-1, 1]: it is only for data_space [-1, 1]")
        if iterations < 1 or restarts < 1:
            raise ValueError(f"iterations and restarts must be >= 1, got {iterations} and {restarts}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}: use one of {OPTIMIZERS}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}: use one of {LR_SCHEDULES}")
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}: use one of {OUTPUTS}")
        if weights is not None:
            path = Path(weights)
            hint = train_hint(path, "denoiser", DEFAULT_DENOISER)
            if data_space != DEFAULT_DATA_RANGE:  # the authors' recipe (raw [0, 1] data)
                hint = f"train it first with `python train.py model=denoiser_authors dataset={path.parent.name}` (see conf/model/denoiser_authors.yaml)"
            load_weights(denoiser, path, missing_hint=hint, data_range=data_space)
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.schedule = schedule
        self.chain = chain
        self.chain_betas = (float(chain_betas[0]), float(chain_betas[1]))
        self.data_space = data_space
        # The schedule G(z) runs: the trained one (truncated at T*), or the authors' fresh T*-step one with β̃.
        self.chain_schedule = schedule if chain == "trained" else DiffusionSchedule(
            int(t_star), self.chain_betas[0], self.chain_betas[1], kind="linear", variance="posterior"
        )
        self.weights = None if weights is None else str(weights)
        self.t_star = int(t_star)
        self.iterations = int(iterations)
        self.restarts = int(restarts)
        self.optimizer = optimizer
        self.lr = float(lr)
        self.lr_schedule = lr_schedule
        self.decay = float(decay)
        self.lr_decay_start = float(lr_decay_start)
        self.betas = (float(betas[0]), float(betas[1]))
        self.grad_through_denoiser = bool(grad_through_denoiser)
        self.output = output
        self.clip_x0 = bool(clip_x0)
        self.gradient = gradient
        self.differentiable = gradient == "exact"  # instance attribute: Defended/WhiteBoxAdaptive read it
        # Exact gradients through the unrolled search can be shattered (docs/results/…-cpu.md): attack along BPDA too.
        self.also_bpda = self.differentiable
        self.checkpoint = self.grad_through_denoiser if checkpoint is None else bool(checkpoint)

    def extra_repr(self) -> str:
        return (
            f"t_star={self.t_star}, iterations={self.iterations}, restarts={self.restarts}, optimizer={self.optimizer}, "
            f"lr={self.lr:g}, lr_schedule={self.lr_schedule}, grad_through_denoiser={self.grad_through_denoiser}, "
            f"output={self.output}, gradient={self.gradient}, chain={self.chain}, data_space=[{self.data_space[0]:g}, {self.data_space[1]:g}]"
        )

    def train(self, mode: bool = True) -> "DiffDefense":
        """The denoiser stays in eval mode whatever the wrappers around the purifier do."""
        super().train(mode)
        self.denoiser.eval()
        return self

    # -- G(z) ----------------------------------------------------------------------------------
    def _eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        if self.grad_through_denoiser:
            return self.denoiser(x_t, t)
        with torch.no_grad():
            return self.denoiser(x_t, t)

    def generate(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """G(z): the reverse process from z = x_{T*} (data space) over steps T*−1 … 0 of the ``chain``, mapped to [0, 1].

        Differentiable in ``z`` (through the linear terms of each step only, unless
        ``grad_through_denoiser``); fresh step noise on every call, from ``generator`` if given. Either chain
        calls ε_θ with time indices T*−1, …, 0 (the respaced schedule's ``timestep_map`` is the identity).
        """
        noise_fn = None
        if generator is not None:
            noise_fn = lambda x, i: torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)  # noqa: E731
        z0 = self.chain_schedule.sample_loop(self._eps, z, t_start=self.t_star, noise_fn=noise_fn, clip_x0=self.clip_x0)
        if self.output == "sigmoid":
            return torch.sigmoid(z0)
        # Straight-through clamp: the value is clamped, the gradient is that of the unclamped image, so
        # pixels outside [0, 1] are pulled back instead of being frozen by a zero gradient.
        u = data_space_to_images(z0, self.data_space)
        return u + (u.clamp(0.0, 1.0) - u).detach()

    # -- the defense ---------------------------------------------------------------------------
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> LatentSearchResult:
        """Alg. 1 on a batch ``x`` (N, C, H, W) in [0, 1]: every image × restart in one batch.

        Returns the best reconstruction per image with its MSE and the mean MSE over restarts (the
        detection score). ``generator`` seeds the initial latents and the step noise. Detached, unless
        ``gradient="exact"`` and ``x`` requires grad (an attack's forward): then every field is a
        differentiable function of ``x`` through the unrolled search.
        """
        if x.dim() != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got a tensor of shape {tuple(x.shape)}")
        param = next(self.denoiser.parameters(), None)
        if param is not None and param.device != x.device:
            with torch.inference_mode(False):  # moved weights must not become inference tensors
                self.denoiser.to(x.device)
        dtype = param.dtype if param is not None else x.dtype
        target = x.to(dtype) if self.differentiable else x.detach().to(dtype)
        return latent_search(
            lambda z: self.generate(z, generator),
            target,
            latent_shape=tuple(x.shape[1:]),
            iterations=self.iterations,
            restarts=self.restarts,
            optimizer=self.optimizer,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            decay=self.decay,
            generator=generator,
            lr_decay_start=self.lr_decay_start,
            betas=self.betas,
            differentiable=self.differentiable,
            checkpoint_steps=self.checkpoint,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x).reconstruction.to(x.dtype)
