"""RAP, the reverse adversarial process ("From Malicious to Marvelous: the Art of Adversarial Attack as Diffusion"):
an adapter U-Net f̃_θ(x_t, t) → x̂₀ trained (``models.rap.module``) on adversaries of victim∘adapter, put in front of
the victim.

Two inference modes (``mode``):

* ``one_step`` (default): x̂₀ = f̃_θ(x, T). Deterministic and differentiable: the adaptive attack gets the exact
  gradient of victim∘f̃ — the model the adapter was adversarially trained against.
* ``reverse``: Alg. 2, the T-step reverse process, Cold Diffusion's default sampler (re-degrade x̂₀ to t − 1):

      x_T = x;  for t = T … 1:  x̂₀ = f̃_θ(x_t, t);  x_{t−1} = Alg. 1(x̂₀, t − 1 steps)   (x₀ = x̂₀ at t = 1)

  Alg. 1 inside needs a label: the victim's prediction on the current x̂₀ (the defense never sees y). Its
  classifier is victim∘f̃(·, t_a), as in training. Randomness is off by default ("in the defense stage, we deactivate
  Langevin dynamics": ``random_start: none``), so the mode is deterministic; with a random start it is stochastic
  and the evaluation applies EOT and N-draw scoring.

Gradients of the reverse mode (``inner_gradient``): the inner steps' sign(∇) is piecewise constant, so its exact
derivative is zero almost everywhere and the exact gradient of x_{t−1} in x̂₀ flows through the ε-projection and
the [0, 1] clamp only (``"exact"``, the default: ``AdversarialProcess.trajectory(differentiable=True)``); every
adapter call in the chain is differentiated exactly. ``"bpda"`` replaces each inner re-degradation by the identity on
the backward pass (straight-through, Athalye et al. 2018), the comparison. ``gradient="bpda"`` makes the whole
purifier identity-BPDA (``differentiable = False``), ``also_bpda`` attacks along both paths; the audit decides which
is strongest.

``smooth_surrogate()`` (reverse mode only) is the same chain with every inner step made smooth: sign(∇) → tanh(∇/(τ·m)),
m the image's mean |∇| (τ = ``surrogate_tau``; τ → 0 is the sign), the gradient taken with ``create_graph`` so the step
depends on x̂₀ through it, and the argmax label → the victim's softmax at sharpness κ (``surrogate_sharpness``) kept in
the graph, and inside those steps every ReLU as softplus(β·)/β (``surrogate_beta``; the masks of a ReLU net's
gradient jump, as in the guided distribution-transfer chain). Its gradient is exact for its own function (the audit's finite differences check it), and it classifies
like the real chain (check (j)); ``threat.model.gradient=surrogate`` attacks along it. The chain's L2 steps
(∇/‖∇‖) are smooth already; only their label changes.

``weakened()`` is the identity: a RAP whose adapter does nothing is the undefended victim (audit check (i)).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.base import Identity, Purifier
from defenses.latent_search import check_gradient_mode
from models.diffusion.unet import double_backward_attention
from models.rap.adapter import AdaptedClassifier, RAPAdapter
from models.rap.forward_process import STARTS, AdversarialProcess
from models.smooth_relu import softplus_relus
from models.weights import load_weights

MODES = ("one_step", "reverse")
INNER_GRADIENTS = ("exact", "bpda")


def rap_train_hint(path: str | Path, adapter: str, norm: str, victim: str, victim_training: str) -> str:
    """The ``train.py`` command that writes ``path`` (``<checkpoint_dir>/<dataset>/rap-<adapter>-<norm>-<victim>-<training>.pt``)."""
    dataset = Path(path).parent.name
    command = f"python train.py model=rap dataset={dataset} victim={victim} denoiser={adapter}"
    if norm != "Linf":
        command += f" denoiser.norm={norm}"
    if victim_training != "standard":
        command += f" victim_training={victim_training}"
    return f"train it first with `{command}` (it needs the victim's weights {victim}-{victim_training}.pt)"


class RAP(Purifier):
    """``x ↦ f̃_θ(x, T)`` (``one_step``) or Alg. 2 (``reverse``); see the module docstring.

    Args:
        adapter: the ``RAPAdapter`` (frozen here: eval mode, no parameter gradients).
        weights: its weights file (``python train.py model=rap``); ``None`` keeps ``adapter`` as given.
        mode: ``"one_step"`` or ``"reverse"``.
        classifier: the victim the reverse process attacks inside (needed by ``reverse`` only; the same weights
            as the evaluated victim).
        process: Alg. 1 as the adapter was trained with it (``reverse`` only; norm, ε and λ of training).
        random_start: the reverse process's start at inference (``"none"``: the paper's "no randomness";
            ``"uniform"`` / ``"gaussian"`` make the defense stochastic).
        attack_t: the adapter time inside the inner attack (``None`` = T, as in training).
        inner_gradient: ``"exact"`` or ``"bpda"`` through the inner re-degradations (``reverse`` only).
        gradient: ``"exact"`` (differentiable) or ``"bpda"`` (identity BPDA of the whole purifier).
        also_bpda: with exact gradients, also attack along identity BPDA and keep each image's worse candidate.
        surrogate_tau: τ of the smooth surrogate's tanh(∇/(τ·mean|∇|)) inner steps (``reverse`` only).
        surrogate_sharpness: κ of the surrogate's soft label softmax(κ·victim logits of x̂₀).
        surrogate_beta: β of the softplus(β·)/β that replaces the ReLUs of adapter and victim inside the surrogate's
            inner steps (their gradient, differentiated again, would otherwise jump with every ReLU mask).
        adapter_name / norm / victim_name / victim_training: only for the "train it first" message.
    """

    stochastic = False
    differentiable = True

    def __init__(
        self,
        adapter: RAPAdapter,
        weights: str | None = None,
        mode: str = "one_step",
        classifier: nn.Module | None = None,
        process: AdversarialProcess | None = None,
        random_start: str = "none",
        attack_t: int | None = None,
        inner_gradient: str = "exact",
        gradient: str = "exact",
        also_bpda: bool = False,
        surrogate_tau: float = 0.1,
        surrogate_sharpness: float = 5.0,
        surrogate_beta: float = 10.0,
        adapter_name: str = "rap_small",
        norm: str = "Linf",
        victim_name: str = "victim",
        victim_training: str = "standard",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"RAP: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if inner_gradient not in INNER_GRADIENTS:
            raise ValueError(f"RAP: unknown inner_gradient {inner_gradient!r}; valid: {', '.join(INNER_GRADIENTS)}")
        if random_start not in STARTS:
            raise ValueError(f"RAP: unknown random_start {random_start!r}; valid: {', '.join(STARTS)}")
        check_gradient_mode(gradient)
        if not isinstance(adapter, RAPAdapter):
            raise TypeError(f"RAP: adapter must be a models.rap.adapter.RAPAdapter, got {type(adapter).__name__}")
        if mode == "reverse" and (classifier is None or process is None):
            raise ValueError("RAP: mode=reverse needs the victim (classifier) and the training process (process)")
        if weights is not None:
            load_weights(adapter, weights, missing_hint=rap_train_hint(weights, adapter_name, norm, victim_name, victim_training))
        self.adapter = adapter.eval().requires_grad_(False)
        self.weights = None if weights is None else str(weights)
        self.mode = mode
        self.num_steps = adapter.num_steps
        self.attack_t = self.num_steps if attack_t is None else int(attack_t)
        if not 1 <= self.attack_t <= self.num_steps:
            raise ValueError(f"RAP: attack_t must lie in 1..{self.num_steps} (T), got {attack_t}")
        self.classifier = None if classifier is None or mode != "reverse" else classifier.eval().requires_grad_(False)
        self.process = None
        if process is not None and mode == "reverse":
            self.process = copy.copy(process)
            self.process.random_start = random_start
        self.inner_gradient = inner_gradient
        self.gradient = gradient
        self.differentiable = gradient == "exact"  # instance attributes: Defended / the threat models read them
        self.also_bpda = bool(also_bpda) and self.differentiable
        self.stochastic = self.process is not None and self.process.stochastic
        if not (surrogate_tau > 0 and surrogate_sharpness > 0 and surrogate_beta > 0):
            raise ValueError("RAP: surrogate_tau, surrogate_sharpness and surrogate_beta must be > 0, got "
                             f"{surrogate_tau}, {surrogate_sharpness}, {surrogate_beta}")
        self.surrogate_tau = float(surrogate_tau)
        self.surrogate_sharpness = float(surrogate_sharpness)
        self.surrogate_beta = float(surrogate_beta)
        #: True on the copy ``smooth_surrogate()`` returns.
        self.smooth = False

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, T={self.num_steps}, attack_t={self.attack_t}, inner_gradient={self.inner_gradient}, "
                f"gradient={self.gradient}, process={self.process}")

    def train(self, mode: bool = True) -> "RAP":
        """Adapter and inner victim stay in eval mode whatever the wrappers around the purifier do."""
        super().train(mode)
        self.adapter.eval()
        if self.classifier is not None:
            self.classifier.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        param = next(self.adapter.parameters(), None)
        xin = x if param is None else x.to(param.dtype)
        out = self.adapter(xin, self.num_steps) if self.mode == "one_step" else self.reverse(xin)
        return out.to(x.dtype)

    def reverse(self, x: Tensor) -> Tensor:
        """Alg. 2: T adapter calls, each followed (for t > 1) by Alg. 1's re-degradation of x̂₀ to t − 1 steps."""
        robust = AdaptedClassifier(self.adapter, self.classifier, self.attack_t)
        exact = self.inner_gradient == "exact"
        x_t = x
        for t in range(self.num_steps, 0, -1):
            x0_hat = self.adapter(x_t, t)
            if t == 1:
                return x0_hat
            if self.smooth:
                x_t = self.smooth_redegrade(robust, x0_hat, t - 1)
                continue
            with torch.no_grad():
                label = self.classifier(x0_hat).argmax(dim=1)
            x_prev = self.process.trajectory(robust, x0_hat, label, t - 1, differentiable=exact)[-1]
            x_t = x_prev if exact else x0_hat + (x_prev - x0_hat).detach()
        return x_t  # unreachable: num_steps >= 1

    def smooth_redegrade(self, robust: nn.Module, x0_hat: Tensor, steps: int) -> Tensor:
        """The surrogate's Alg. 1: ``steps`` smooth inner steps from x̂₀ (see the module docstring), differentiable
        in x̂₀ through the steps themselves (double backprop), not only through the projections; attention on the
        math kernel (``double_backward_attention``: rap_tiny's U-Net has self-attention)."""
        proc = self.process
        keep = torch.is_grad_enabled() and x0_hat.requires_grad
        with torch.inference_mode(False), torch.enable_grad(), softplus_relus(self.surrogate_beta), \
                double_backward_attention():
            anchor = x0_hat if keep else x0_hat.detach().clone().requires_grad_(True)
            soft_label = F.softmax(self.surrogate_sharpness * self.classifier(anchor), dim=1)
            x = proc.project(anchor + proc.start_noise(anchor), anchor)
            for _ in range(steps):
                loss = -(soft_label * F.log_softmax(robust(x), dim=1)).sum()
                (grad,) = torch.autograd.grad(loss, [x], create_graph=True)
                if proc.norm == "Linf":
                    scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
                    direction = torch.tanh(grad / (self.surrogate_tau * scale))
                else:
                    direction = proc.direction(grad)
                x = proc.project(x + proc.step_size * direction, anchor)
        return x if keep else x.detach()

    def smooth_surrogate(self) -> "RAP | None":
        """The reverse chain with smooth inner steps and a soft label (None in one-step mode, which is smooth, and on
        the surrogate itself). Shares the adapter and victim."""
        if self.mode != "reverse" or self.smooth:
            return None
        return self.variant_copy(smooth=True)

    def weakened(self) -> Purifier:
        """The identity: RAP with an adapter that does nothing is the undefended victim (audit check (i))."""
        return Identity()
