"""One DDPM noise schedule and sampler, shared by every diffusion defense.

DiffDefense, DiffPure, DensePure, distribution transfer and RAP all call this module, so the maths of
Ho et al. (2020, "Denoising Diffusion Probabilistic Models") lives here once:

* forward process  q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)                         (``q_sample``)
* posterior        q(x_{t−1} | x_t, x_0) = N(μ̃_t(x_t, x_0), β̃_t I)                   (``posterior_mean_variance``)
* reverse step     x_{t−1} = 1/√α_t (x_t − β_t/√(1 − ᾱ_t) ε_θ(x_t, t)) + σ_t z        (``p_sample``, Eq. 11 / Alg. 2)
* DDIM step        (Song et al. 2021, Eq. 12) for skipping steps                       (``ddim_step``)

Conventions
-----------
* **Time** ``t`` is a ``LongTensor`` of shape ``(N,)`` (a Python ``int`` is broadcast to the batch),
  0-indexed: ``t = 0`` is the paper's step 1 (least noise), ``t = T − 1`` the paper's step T. The
  reverse step at ``t = 0`` returns the mean and adds no noise.
* **Data space**: the model works in ``[−1, 1]``. Datamodules give images in ``[0, 1]``; map them with
  ``to_model_space(x) = 2x − 1`` before ``q_sample`` and back with ``to_image_space(x) = (x + 1)/2``.
* **Device and dtype** follow the input: buffers are kept in float32 (computed in float64) and each
  coefficient is gathered on ``x``'s device and cast to ``x``'s dtype, so the schedule never needs to
  be moved by hand and float64 inputs (gradcheck) stay float64.
* Everything is batched and differentiable: nothing here detaches or runs under ``no_grad``, so an
  attack (or DiffDefense's latent optimisation) can backpropagate through ``sample_loop``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

#: ``eps_model(x_t, t) -> ε̂`` with ``t`` a LongTensor (N,): any denoiser of ``models.diffusion``.
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``guidance(x_t, pred_x0, t_model, create_graph) -> g``: the guidance term of a reverse step (see ``p_sample``).
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
#: ``noise_fn(x_t, i) -> z`` gives the Gaussian noise of the reverse step from ``i`` (an int) to ``i − 1``.
NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` → the diffusion model's ``[−1, 1]`` (``2x − 1``)."""
    return x * 2.0 - 1.0


def to_image_space(x: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """Model space ``[−1, 1]`` → images in ``[0, 1]`` (``(x + 1) / 2``).

    Not clamped by default, so gradients pass everywhere; ``clamp=True`` for saving/displaying.
    """
    x = (x + 1.0) * 0.5
    return x.clamp(0.0, 1.0) if clamp else x


def linear_betas(num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Ho et al. (2020): β linearly spaced from ``beta_start`` to ``beta_end`` (float64)."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021, Eq. 17): ᾱ(t) = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)),
    β_t = min(1 − ᾱ_t/ᾱ_{t−1}, ``max_beta``) (float64)."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


class DiffusionSchedule(nn.Module):
    """DDPM schedule with the usual precomputed buffers and the reverse-process samplers.

    Args:
        num_steps: T, the number of diffusion steps (DiffDefense's authors: 100; DDPM/DiffPure: 1000).
        beta_start / beta_end: first and last β of the linear schedule (authors of DiffDefense: 1e-5 → 0.02;
            Ho et al.: 1e-4 → 0.02). Ignored by ``kind="cosine"``.
        kind: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021).
        variance: σ_t² of the reverse step: ``"beta"`` (σ_t² = β_t, Ho et al. Alg. 2 and DiffDefense Eq. 2,
            σ_t = √β_t) or ``"posterior"`` (σ_t² = β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t).

    Buffers (all shape ``(T,)``, non-persistent: they are a function of the arguments, so they stay out
    of ``state_dict`` and denoiser weight files): ``betas``, ``alphas``, ``alphas_cumprod`` (ᾱ_t),
    ``alphas_cumprod_prev`` (ᾱ_{t−1}, with ᾱ_{−1} = 1), ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``,
    ``posterior_variance`` (β̃_t), ``posterior_log_variance_clipped`` (log β̃_t with β̃_0 := β̃_1, as β̃_0 = 0),
    ``posterior_mean_coef1`` / ``posterior_mean_coef2`` (μ̃_t = coef1 · x_0 + coef2 · x_t).
    """

    def __init__(
        self,
        num_steps: int = 100,
        beta_start: float = 1e-5,
        beta_end: float = 0.02,
        kind: str = "linear",
        variance: str = "beta",
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if kind == "linear":
            if not 0 < beta_start <= beta_end < 1:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start} → {beta_end}")
            betas = linear_betas(num_steps, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(num_steps)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}: use 'linear' or 'cosine'")
        if variance not in ("beta", "posterior"):
            raise ValueError(f"unknown variance {variance!r}: use 'beta' (σ²=β_t) or 'posterior' (σ²=β̃_t)")
        self.kind = kind
        self.variance = variance
        self._register(betas, torch.arange(num_steps))

    def _register(self, betas: torch.Tensor, timestep_map: torch.Tensor) -> None:
        """Precompute every buffer from float64 ``betas``; ``timestep_map[i]`` is the trained model's time index
        of this schedule's step ``i`` (the identity, except for a ``respace``d schedule)."""
        num_steps = betas.shape[0]
        self.num_steps = int(num_steps)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        self._alphas_cumprod64 = alphas_cumprod  # float64 copy for respacing and ᾱ matching (not a buffer)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃_0 = 0: clip the log at β̃_1 (as Ho et al.'s code), for a finite log-variance everywhere.
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if num_steps > 1 else betas
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": clipped.log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            # Eq. 11 coefficients of the reverse step: 1/√α_t and β_t/√(1 − ᾱ_t).
            "sqrt_recip_alphas": alphas.rsqrt(),
            "eps_coef": betas / (1.0 - alphas_cumprod).sqrt(),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)
        self.register_buffer("timestep_map", timestep_map.to(torch.long), persistent=False)

    # -- respacing and noise-level matching -------------------------------------------------------
    def respace(self, timesteps: "Sequence[int] | torch.Tensor") -> "DiffusionSchedule":
        """The schedule restricted to the increasing steps ``timesteps`` of this one (Nichol & Dhariwal 2021,
        §4; DDIM's "skipping"): ᾱ is kept at those steps and β_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}} (ᾱ_{τ_{−1}} = 1), so
        q(x_{τ_i} | x_0) is unchanged, and every sampler calls the trained model with time ``τ_i``
        (``timestep_map``). Variance ``"posterior"`` then gives the β̃ of the coarse chain (DiffDefense's authors'
        ``stepDDIM`` with η = 1); ``"beta"`` the coarse β."""
        taus = torch.as_tensor(list(timesteps) if not torch.is_tensor(timesteps) else timesteps, dtype=torch.long)
        if taus.ndim != 1 or taus.numel() < 1:
            raise ValueError("respace needs a non-empty 1-d list of steps")
        if bool((taus[1:] <= taus[:-1]).any()) or int(taus[0]) < 0 or int(taus[-1]) >= self.num_steps:
            raise ValueError(f"respace steps must increase strictly within [0, {self.num_steps - 1}], got {taus.tolist()}")
        ac = self._alphas_cumprod64[taus]
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        new = DiffusionSchedule.__new__(DiffusionSchedule)
        nn.Module.__init__(new)
        new.kind = f"{self.kind}-respaced"
        new.variance = self.variance
        new._register(1.0 - ac / ac_prev, self.timestep_map.cpu()[taus])
        return new.to(self.betas.device)

    def match_step(self, alpha_bar: float) -> int:
        """The step whose ᾱ_t is closest to ``alpha_bar`` (in log SNR), e.g. to state what "t = 470 of a 4000-step
        cosine schedule" is on a 1000-step linear model: ``linear.match_step(cosine.alphas_cumprod[469])``."""
        if not 0.0 < alpha_bar < 1.0:
            raise ValueError(f"alpha_bar must be in (0, 1), got {alpha_bar}")
        ac = self._alphas_cumprod64
        log_snr = (ac / (1 - ac)).log()
        target = math.log(alpha_bar / (1 - alpha_bar))
        return int((log_snr - target).abs().argmin())

    def step_for_sigma(self, sigma: float) -> int:
        """The step whose noise matches additive Gaussian noise of std ``sigma`` on images in [0, 1]
        (Carlini et al. 2022 / DensePure): x_t/√ᾱ_t = x_0 + √((1−ᾱ_t)/ᾱ_t) ε in model space [−1, 1], where the
        image noise is 2σ, so the step has (1 − ᾱ_t)/ᾱ_t = (2σ)², i.e. ᾱ_t = 1/(1 + 4σ²)."""
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        return self.match_step(1.0 / (1.0 + 4.0 * sigma**2))

    def extra_repr(self) -> str:
        b = self.betas
        return f"num_steps={self.num_steps}, kind={self.kind}, beta={b[0].item():.3g}→{b[-1].item():.3g}, variance={self.variance}"

    # -- helpers --------------------------------------------------------------------------------
    def _t(self, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """``t`` as a LongTensor (N,) on ``x``'s device, range-checked."""
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        elif t.ndim == 0:
            t = t.to(device=x.device, dtype=torch.long).expand(x.shape[0])
        else:
            t = t.to(device=x.device, dtype=torch.long)
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}")
        return t

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The trained model's time index of this schedule's steps ``t`` (identity unless ``respace``d)."""
        return self.timestep_map.to(t.device)[t]

    def eps(self, eps_model: EpsModel, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε_θ(x_t, t), called with the model's own time index (``model_time``)."""
        return eps_model(x_t, self.model_time(self._t(t, x_t)))

    def _gather(self, buf: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``buf[t]`` reshaped to broadcast over ``x`` (N, 1, 1, …), on x's device and in x's dtype."""
        out = buf.to(x.device)[t].to(x.dtype)
        return out.reshape(-1, *([1] * (x.ndim - 1)))

    # -- forward process and posterior ------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample q(x_t | x_0): √ᾱ_t x_0 + √(1 − ᾱ_t) ε (x0 in model space [−1, 1])."""
        t = self._t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        return self._gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, the inverse of ``q_sample`` given the noise."""
        t = self._t(t, x_t)
        return self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t−1} | x_t, x_0) (Ho et al. Eq. 6–7): (mean μ̃_t, variance β̃_t, clipped log β̃_t),
        the latter two shaped to broadcast over the batch."""
        t = self._t(t, x_t)
        mean = self._gather(self.posterior_mean_coef1, t, x_t) * x0 + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._gather(self.posterior_variance, t, x_t), self._gather(self.posterior_log_variance_clipped, t, x_t)

    def model_variance(self, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """σ_t² of the reverse step (``variance`` = "beta": β_t; "posterior": β̃_t), broadcastable over ``x``."""
        t = self._t(t, x)
        return self._gather(self.betas if self.variance == "beta" else self.posterior_variance, t, x)

    def p_mean_variance(
        self, eps_model: EpsModel, x_t: torch.Tensor, t: torch.Tensor | int, clip_x0: bool = True
    ) -> dict[str, torch.Tensor]:
        """p_θ(x_{t−1} | x_t) via x̂_0: returns ``mean``, ``variance`` (σ_t²), ``log_variance``, ``pred_x0``
        and ``eps``. With ``clip_x0`` the predicted x̂_0 is clamped to [−1, 1] first (as Ho et al.'s
        sampler); without it the mean equals Eq. 11 exactly."""
        t = self._t(t, x_t)
        eps = self.eps(eps_model, x_t, t)
        pred_x0 = self.predict_x0(x_t, t, eps)
        if clip_x0:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.posterior_mean_variance(pred_x0, x_t, t)
        variance = self.model_variance(t, x_t)
        # log σ_t²: log β_t, or the clipped log β̃_t (finite at t = 0, where β̃_0 = 0).
        log_variance = variance.log() if self.variance == "beta" else self._gather(self.posterior_log_variance_clipped, t, x_t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    # -- reverse process ------------------------------------------------------------------------
    def p_sample(
        self,
        eps_model: EpsModel,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        noise: torch.Tensor | None = None,
        clip_x0: bool = False,
        guidance: Guidance | None = None,
    ) -> torch.Tensor:
        """One reverse step x_t → x_{t−1} (Ho et al. Eq. 11 / Alg. 2; DiffDefense Eq. 2 read as this):

            x_{t−1} = 1/√α_t · (x_t − β_t/√(1 − ᾱ_t) · ε_θ(x_t, t)) + σ_t z,   z ~ N(0, I), z = 0 at t = 0.

        ``clip_x0=True`` uses the mean of clamped x̂_0 instead (identical when x̂_0 ∈ [−1, 1]); the default
        is the unclipped Eq. 11, which keeps gradients everywhere. ``noise`` fixes z (e.g. for EOT or tests).

        ``guidance(x_t, pred_x0, t_model, create_graph) -> g`` (Dhariwal & Nichol 2021, Alg. 1) shifts the mean
        to μ + σ_t² g, where g is ∇_{x_t} log p(y | x_t) — a guided defense returns −s ∇_{x_t} D. ``pred_x0`` is
        x̂_0(x_t) as a differentiable function of the ``x_t`` handed over, so g may differentiate through ε_θ.
        When the caller's graph needs gradients (an attack through the chain) ``create_graph`` is True and g
        stays in the graph (double backprop); otherwise g is computed on a detached copy and detached.
        """
        t = self._t(t, x_t)
        if guidance is not None:
            create_graph = torch.is_grad_enabled() and x_t.requires_grad
            with torch.enable_grad():
                xt = x_t if create_graph else x_t.detach().requires_grad_(True)
                eps = self.eps(eps_model, xt, t)
                pred_x0 = self.predict_x0(xt, t, eps)
                if clip_x0:
                    pred_x0 = pred_x0.clamp(-1.0, 1.0)
                shift = guidance(xt, pred_x0, self.model_time(t), create_graph)
            if not create_graph:
                eps, pred_x0, shift = eps.detach(), pred_x0.detach(), shift.detach()
            if clip_x0:
                mean, _, _ = self.posterior_mean_variance(pred_x0, x_t, t)
            else:
                mean = self._gather(self.sqrt_recip_alphas, t, x_t) * (x_t - self._gather(self.eps_coef, t, x_t) * eps)
            mean = mean + self.model_variance(t, x_t) * shift
        elif clip_x0:
            mean = self.p_mean_variance(eps_model, x_t, t, clip_x0=True)["mean"]
        else:
            eps = self.eps(eps_model, x_t, t)
            mean = self._gather(self.sqrt_recip_alphas, t, x_t) * (x_t - self._gather(self.eps_coef, t, x_t) * eps)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * self.model_variance(t, x_t).sqrt() * noise

    def sample_loop(
        self,
        eps_model: EpsModel,
        x_T: torch.Tensor,
        t_start: int | None = None,
        noise_fn: NoiseFn | None = None,
        clip_x0: bool = False,
        guidance: Guidance | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Run the reverse process from ``x_T`` through steps ``t_start − 1, …, 0`` and return x_0.

        ``t_start = T`` (default) is full generation from pure noise; a truncated start ``T* < T`` is
        ``t_start = T*`` (x_T is then whatever the caller treats as x_{T*}: noise for DiffDefense, a
        diffused image ``q_sample(x0, T* − 1)`` for DiffPure). ``t_start = 0`` returns ``x_T`` unchanged.
        ``noise_fn(x_t, i)`` supplies the noise of step ``i`` (default: fresh ``randn_like``).
        Differentiable end to end (no ``no_grad`` inside): wrap in ``torch.no_grad()`` to just sample.
        ``checkpoint``: when gradients flow, recompute each step on the backward pass instead of storing its
        activations (``torch.utils.checkpoint``, non-reentrant; the step's noise is drawn outside the
        recomputed function, so the recomputation is the same step): memory of one step for any chain length.
        """
        t_start = self.num_steps if t_start is None else int(t_start)
        if not 0 <= t_start <= self.num_steps:
            raise ValueError(f"t_start must be in [0, {self.num_steps}], got {t_start}")
        x = x_T
        for i in reversed(range(t_start)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            noise = noise_fn(x, i) if noise_fn is not None else torch.randn_like(x)
            if checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(
                    self.p_sample, eps_model, x, t, noise, clip_x0, guidance, use_reentrant=False
                )
            else:
                x = self.p_sample(eps_model, x, t, noise=noise, clip_x0=clip_x0, guidance=guidance)
        return x

    def ddim_step(
        self,
        eps_model: EpsModel,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        t_prev: torch.Tensor | int,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        clip_x0: bool = False,
    ) -> torch.Tensor:
        """One DDIM step x_t → x_{t_prev} (Song et al. 2021, Eq. 12), ``t_prev < t``; ``t_prev = −1``
        means "to the data" (ᾱ_{−1} = 1). ``eta = 0`` is deterministic DDIM; ``eta = 1`` with
        ``t_prev = t − 1`` is the DDPM step with σ_t² = β̃_t."""
        t = self._t(t, x_t)
        t_prev = self._t(t_prev, x_t)
        eps = self.eps(eps_model, x_t, t)
        pred_x0 = self.predict_x0(x_t, t, eps)
        if clip_x0:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        ac = self._gather(self.alphas_cumprod, t, x_t)
        ac_ext = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])  # index t_prev + 1
        ac_prev = self._gather(ac_ext, t_prev + 1, x_t)
        sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).clamp(min=0).sqrt()
        x_prev = ac_prev.sqrt() * pred_x0 + (1 - ac_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(x_t)
            x_prev = x_prev + sigma * noise
        return x_prev
