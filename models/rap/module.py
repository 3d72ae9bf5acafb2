"""Trains RAP's adapter (Alg. 3) against a frozen victim, on adversaries of the *full* classifier victim∘adapter.

One training batch:

    x₀, y ~ data;  t ~ U{1, …, T}
    x_t   = Alg. 1 on CE(victim(f̃_θ(·, t_a)), y), t sign steps from x₀    (current θ: §3.3, "adversaries of the
                                                                            robust classifier", not of the victim)
    loss  = rec(f̃_θ(x_t, t), x₀) + w · CE(victim(f̃_θ(x_t, t)), y)       (Alg. 3 line 6; rec = L1 (appendix) or
                                                                            squared L2 (Eq. 8), in [−1, 1] space)

The training attack is the defense's own threat: it differentiates through the adapter as the evaluation's adaptive
attack will, with the weights of this very step (detached from the loss: the adversary is an input, as in Madry
adversarial training). t_a, the time the adapter is shown inside the attack, is T by default: the 1-step defense
x̂₀ = f̃(x, T) is what the evaluation attacks, and the appendix's ``JointAttack`` is handed no t.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.lit_base import LitBase, OptimizerFactory, SchedulerFactory
from models.rap.adapter import AdaptedClassifier, RAPAdapter
from models.rap.forward_process import AdversarialProcess

RECONSTRUCTIONS = ("l1", "l2")


class RAPModule(LitBase):
    """Alg. 3 on the shared Lightning base (see the module docstring).

    Args:
        adapter: the ``RAPAdapter`` f̃_θ (its ``num_steps`` is T).
        victim: the trained classifier (inputs in [0, 1]); frozen — eval mode, no parameter gradients, never
            exported.
        process: the adversarial forward process (Alg. 1: norm, ε, λ, random start).
        optimizer / scheduler: partial factories, as every ``LitBase`` (only the adapter's parameters train).
        reconstruction: ``"l1"`` (the appendix's ``(x_start − x_recon).abs().mean()``) or ``"l2"`` (Eq. 8, mean
            squared error), both on the unclamped prediction in [−1, 1] space against 2x₀ − 1.
        ce_weight: weight w of the classification term (Alg. 3: 1).
        attack_t: the adapter time inside the training attack (1 … T; ``None`` = T, see the module docstring).
        sample_every_n_epochs: save a grid (clean / x_T / f̃(x_T, T)) of ``n_samples`` validation images to
            ``<log_dir>/samples/`` every that many epochs (0/None: never).
    """

    def __init__(
        self,
        adapter: RAPAdapter,
        victim: nn.Module,
        process: AdversarialProcess,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        reconstruction: str = "l1",
        ce_weight: float = 1.0,
        attack_t: int | None = None,
        sample_every_n_epochs: int | None = 1,
        n_samples: int = 8,
        export_path: str | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, export_path)
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"RAPModule: unknown reconstruction {reconstruction!r}; valid: {', '.join(RECONSTRUCTIONS)}")
        if not isinstance(adapter, RAPAdapter):
            raise TypeError(f"RAPModule: adapter must be a models.rap.adapter.RAPAdapter, got {type(adapter).__name__}")
        self.adapter = adapter
        self.victim = victim.eval().requires_grad_(False)
        self.process = process
        self.num_steps = adapter.num_steps
        self.attack_t = self.num_steps if attack_t is None else int(attack_t)
        if not 1 <= self.attack_t <= self.num_steps:
            raise ValueError(f"RAPModule: attack_t must lie in 1..{self.num_steps} (T), got {attack_t}")
        self.reconstruction = reconstruction
        self.ce_weight = float(ce_weight)
        self.sample_every_n_epochs = sample_every_n_epochs or 0
        self.n_samples = int(n_samples)
        self._grid_batch: Tensor | None = None
        self._grid_labels: Tensor | None = None

    def train(self, mode: bool = True) -> "RAPModule":
        """The victim stays frozen in eval mode (dropout and BatchNorm statistics off) whatever Lightning sets."""
        super().train(mode)
        self.victim.eval()
        return self

    def export(self) -> nn.Module:
        return copy.deepcopy(self.adapter).eval()

    def forward(self, x: Tensor, t: int | Tensor | None = None) -> Tensor:
        return self.adapter(x, self.num_steps if t is None else t)

    # -- Alg. 3 ---------------------------------------------------------------------------------------
    def robust_classifier(self) -> AdaptedClassifier:
        """victim∘f̃_θ(·, attack_t) with the current weights: the model the training adversaries are crafted on."""
        return AdaptedClassifier(self.adapter, self.victim, self.attack_t)

    def adversaries(self, x0: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """x_t of every image (its own t), crafted by Alg. 1 against ``robust_classifier()``."""
        return self.process.sample(self.robust_classifier(), x0, y, t)

    def rap_loss(self, x0: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Alg. 3 line 6 on (x₀, y) at times ``t``: (loss, logs)."""
        x_t = self.adversaries(x0, y, t)
        raw = self.adapter.raw(x_t, t)
        target = 2.0 * x0 - 1.0
        rec = F.l1_loss(raw, target) if self.reconstruction == "l1" else F.mse_loss(raw, target)
        logits = self.victim(((raw + 1.0) / 2.0).clamp(0.0, 1.0))
        ce = F.cross_entropy(logits, y)
        logs = {"rec": rec.detach(), "ce": ce.detach(), "adv_acc": (logits.detach().argmax(1) == y).float().mean()}
        return rec + self.ce_weight * ce, logs

    def times(self, n: int, stage: str, device: torch.device) -> Tensor:
        """t ~ U{1, …, T} while training; a fixed sweep 1, 2, …, T, 1, … elsewhere (comparable validation losses)."""
        if stage == "train":
            return torch.randint(1, self.num_steps + 1, (n,), device=device)
        return torch.arange(n, device=device) % self.num_steps + 1

    def step(self, batch: Any, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        x0, y = batch
        loss, logs = self.rap_loss(x0, y, self.times(len(x0), stage, x0.device))
        if stage != "train":
            # 1-step defense on the clean images: the accuracy the defense keeps (Table 3's "Clean" row).
            logs["acc"] = (self.victim(self.adapter(x0, self.num_steps)).argmax(1) == y).float().mean()
            if self._grid_batch is None:
                self._grid_batch = x0[: self.n_samples].detach().clone()
                self._grid_labels = y[: self.n_samples].detach().clone()
        return loss, logs

    # -- a visual sanity check ---------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        every = self.sample_every_n_epochs
        x0 = self._grid_batch
        if not every or (self.current_epoch + 1) % every or x0 is None or self._trainer is None or not self.trainer.log_dir:
            return
        t = torch.full((len(x0),), self.num_steps, device=x0.device)
        x_T = self.adversaries(x0, self._grid_labels, t)
        with torch.no_grad():
            self.save_sample_grid(torch.cat([x0, x_T, self.adapter(x_T, self.num_steps)]))
