"""Trains a victim classifier with any training objective of ``models.training_losses``."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from models.lit_base import LitBase, OptimizerFactory, SchedulerFactory


class ClassifierModule(LitBase):
    """``model`` is the victim (normalisation inside, inputs in [0, 1]); ``loss`` is a training
    objective ``loss(model, x, y) -> (loss, logs)`` — standard, FGSM-AT, PGD-AT, TRADES, MART."""

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        export_path: str | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, export_path)
        self.model = model.train()  # build_victim returns eval mode; dropout must be on while training
        self.loss = loss
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def export(self) -> nn.Module:
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def step(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        if stage == "train":
            loss, logs = self.loss(self.model, x, y)
            return loss, dict(logs)
        logits = self.model(x)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        return nn.functional.cross_entropy(logits, y), {"acc": metric}
