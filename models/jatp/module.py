"""Trains JATP's pre-processor P (Alg. 1) in front of a frozen target T, on full adversarial examples of T∘P (Eq. 5).

One training batch (x, y):

    x̃*   = FeatureAttack(P, T, x)                                 (Eq. 5, current weights of P; detached: an input)
    L_adv = BCE(T(P(x̃*)), y)                                        (Eq. 7)
            + α · mean_i MSE(t*(P(x̃*_i)), t*(P(x_i))) · (1 − p_y(T(P(x_i))))   (Eqs. 8–9)
    L     = w_bce · BCE + α · FSM + β · L_pix(P(x̃*), x)                 (Eqs. 6, 10; α = 5, β = 3, w_bce = 1)

L_pix is the mean squared error by default (``pixel="mse"``); Eq. 6 read literally, the per-image Euclidean norm
(``pixel="l2"``), diverges under the paper's SGD (lr 1e-2, momentum 0.9) and β = 3 in a few steps (NaN within ~10
steps of the pixel term alone, full-size and tiny NRP alike), while the MSE trains: see docs/decisions.md.

Any weight 0 switches its term off (the ablation of Fig. 4b: no BCE / no FSM / no pix); with α = 0 the natural
images are not even passed through P. The pixel term is taken on ``P.raw`` (NRP's unclamped output, see
``models.jatp.networks``); BCE and FSM on the clamped image the target sees. The (1 − p_y) weight carries its
gradient by default (``weight_gradient``), as MART's code (``1.0000001 − true_probs``, not detached), where Eq. 9
comes from; FSM's gradient flows through both branches, t*(P(x̃*)) and t*(P(x)), both functions of P.

Gradient-norm clipping (``grad_clip_norm``, not in the paper): before every optimiser step the gradient of all
optimised parameters is rescaled to norm ≤ ``grad_clip_norm`` (``torch.nn.utils.clip_grad_norm_``, through
Lightning's ``configure_gradient_clipping`` hook, so AMP's unscaling comes first; a ``+trainer.gradient_clip_val=…``
given on the command line takes precedence). Why: measured on fashion_mnist_rgb32 with a fitted ResNet-18 target,
NRP(nf 16, nb 1), the paper's SGD (lr 1e-2, momentum 0.9, wd 2e-4) and α = 5, β = 3, BCE and FSM through a trained
target give P gradient norms of 10–200 in the first steps (182 at step 0 without ``skip``); SGD turns them into
parameter jumps that push P's raw output to ±50, where the pixel term on it (an un-normalised RRDB trunk: its
curvature grows with the weights) is past SGD's stability limit and grows geometrically (pix 0.23 → 12.6 → 190 →
678 → 5e11 → NaN in 5 steps). Clipped at norm 1 the same run trains (20 steps: BCE 18.5 → 0.71, pix 0.23 →
0.033; with ``skip``: BCE ≈ 1, pix ≤ 0.034; norms 5 and 10 were stable over those 20 steps too, pix peaking at
0.07 / 0.16). Where the norm is below the threshold the update is the paper's SGD step unchanged (the tiny target
of ``tests/test_jatp.py``: after ~15 steps). With JATP′ the norm is that of P's and the target's gradients together
(one optimiser).

JATP′ (``update_target: true``): the target's parameters are optimised too, by the same optimiser. The attack still
runs with the target in eval mode (``FeatureAttack`` uses ``eval_mode``); the loss pass runs it in train mode
(BatchNorm statistics update), as in standard adversarial training. Its weights are written to ``target_export_path``
at the end of fitting (``export()`` stays the pre-processor, which is what ``train.py`` writes to ``export_path``).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from models.jatp.attack import FeatureAttack, features_and_logits, resolve_layer
from models.jatp.losses import PIXEL_LOSSES, boosted_cross_entropy, feature_similarity, pixel_loss, true_class_probability
from models.jatp.networks import NRPGenerator
from models.lit_base import LitBase, OptimizerFactory, SchedulerFactory
from models.weights import save_weights


class JATPModule(LitBase):
    """Alg. 1 on the shared Lightning base (see the module docstring).

    Args:
        preprocessor: the ``NRPGenerator`` P.
        victim: the trained target T (inputs in [0, 1]); frozen (eval mode, no parameter gradients) unless
            ``update_target``.
        attack: the full-adversary generator of Eq. 5 (its ``layer`` is also the FSM layer).
        optimizer / scheduler: partial factories, as every ``LitBase``.
        alpha / beta / bce_weight: weights of FSM, the pixel loss and BCE (0 = off).
        pixel: ``"mse"`` (default) or ``"l2"`` (Eq. 6's norm read literally: per image, mean over the batch).
        weight_gradient: let the gradient flow through the (1 − p_y(P(x))) weight of Eq. 9 (MART's code) or not.
        grad_clip_norm: clip the gradient of the optimised parameters to this L2 norm before each step (``None`` = no
            clipping, the paper's plain SGD, which diverges: see the module docstring).
        update_target: JATP′ — also train the target.
        target_export_path: where JATP′ writes the updated target (required with ``update_target``).
        variant: the trained P's name (``jatp``, ``jatp_prime``, an ablation), the prefix of ``export_path``; kept so
            a checkpoint says which P it is.
    """

    def __init__(
        self,
        preprocessor: NRPGenerator,
        victim: nn.Module,
        attack: FeatureAttack,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        alpha: float = 5.0,
        beta: float = 3.0,
        bce_weight: float = 1.0,
        pixel: str = "mse",
        weight_gradient: bool = True,
        grad_clip_norm: float | None = 1.0,
        update_target: bool = False,
        target_export_path: str | None = None,
        export_path: str | None = None,
        variant: str = "jatp",
    ) -> None:
        super().__init__(optimizer, scheduler, export_path)
        if pixel not in PIXEL_LOSSES:
            raise ValueError(f"JATPModule: unknown pixel loss {pixel!r}; valid: {', '.join(PIXEL_LOSSES)}")
        if min(alpha, beta, bce_weight) < 0 or alpha + beta + bce_weight == 0:
            raise ValueError(f"JATPModule: loss weights must be >= 0 and not all 0, got alpha={alpha}, beta={beta}, bce_weight={bce_weight}")
        if grad_clip_norm is not None and not float(grad_clip_norm) > 0:
            raise ValueError(f"JATPModule: grad_clip_norm must be > 0 or null (no clipping), got {grad_clip_norm}")
        if update_target and not target_export_path:
            raise ValueError("JATPModule: update_target (JATP′) needs target_export_path, where the updated target is written")
        self.preprocessor = preprocessor
        self.update_target = bool(update_target)
        self.victim = victim.eval().requires_grad_(self.update_target)
        self.attack = attack
        resolve_layer(self.victim, attack.layer)  # fails at construction on a wrong layer name
        self.alpha, self.beta, self.bce_weight = float(alpha), float(beta), float(bce_weight)
        self.pixel = pixel
        self.weight_gradient = bool(weight_gradient)
        self.grad_clip_norm = None if grad_clip_norm is None else float(grad_clip_norm)
        self.target_export_path = target_export_path
        self.variant = str(variant)

    def train(self, mode: bool = True) -> "JATPModule":
        """The frozen target stays in eval mode whatever Lightning sets (JATP′'s target follows ``mode``)."""
        super().train(mode)
        if not self.update_target:
            self.victim.eval()
        return self

    @property
    def layer(self) -> nn.Module:
        """The target's feature layer t* (looked up by name, not stored: no second copy of it in the state dict)."""
        return resolve_layer(self.victim, self.attack.layer)

    def export(self) -> nn.Module:
        return copy.deepcopy(self.preprocessor).eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.preprocessor(x)

    def clip_gradient_norm(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """Rescale the gradients of ``optimizer``'s parameters to L2 norm ≤ ``grad_clip_norm``; the norm before clipping
        (``None`` when clipping is off). Called by Lightning before each step; a hand-written loop calls it itself."""
        if self.grad_clip_norm is None:
            return None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``trainer.gradient_clip_val`` when set (``+trainer.gradient_clip_val=…``), else ``grad_clip_norm``."""
        if gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            self.clip_gradient_norm(optimizer)

    def on_fit_end(self) -> None:
        if self.update_target and self.target_export_path and (self._trainer is None or self.trainer.is_global_zero):
            save_weights(copy.deepcopy(self.victim).eval(), self.target_export_path)

    # -- Alg. 1 ---------------------------------------------------------------------------------------
    def adversaries(self, x: Tensor) -> Tensor:
        """x̃* of Eq. 5 against the full model T∘P with the current weights."""
        return self.attack(self.preprocessor, self.victim, x)

    def jatp_loss(self, x: Tensor, y: Tensor, x_adv: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 10 on (x, y) (adversaries crafted here unless ``x_adv`` is given): (loss, logs)."""
        x_adv = self.adversaries(x) if x_adv is None else x_adv
        raw_adv = self.preprocessor.raw(x_adv)
        p_adv = raw_adv if self.preprocessor.output == "sigmoid" else raw_adv.clamp(0.0, 1.0)
        f_adv, logits_adv = features_and_logits(self.victim, self.layer, p_adv)
        zero = logits_adv.new_zeros(())
        bce = boosted_cross_entropy(logits_adv, y) if self.bce_weight else zero
        fsm = zero
        if self.alpha:
            f_nat, logits_nat = features_and_logits(self.victim, self.layer, self.preprocessor(x))
            weight = 1.0 - true_class_probability(logits_nat, y)
            fsm = feature_similarity(f_adv, f_nat, weight if self.weight_gradient else weight.detach())
        pix = pixel_loss(raw_adv, x, self.pixel) if self.beta else zero
        loss = self.bce_weight * bce + self.alpha * fsm + self.beta * pix
        logs = {"bce": bce.detach(), "fsm": fsm.detach(), "pix": pix.detach(),
                "adv_acc": (logits_adv.detach().argmax(1) == y).float().mean()}
        return loss, logs

    def step(self, batch: Any, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        loss, logs = self.jatp_loss(x, y)
        if stage != "train":
            with torch.no_grad():
                logs["acc"] = (self.victim(self.preprocessor(x)).argmax(1) == y).float().mean()
        return loss, logs
