"""One LightningModule base for every trainable thing (victims now; denoisers, RAP adapters, JATP
pre-processors later): optimiser and scheduler from partial configs, logging, stage dispatch.

Subclasses implement only ``step(batch, stage) -> (loss, logs)`` and ``export()`` (the trained
``nn.Module`` whose state dict ``train.py`` writes to ``export_path``); the training loop,
checkpoints, resume and loggers are Lightning's, configured in ``train.py``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from lightning import LightningModule
from torch import nn

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class LitBase(LightningModule, ABC):
    def __init__(
        self, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None, export_path: str | None = None
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.export_path = export_path

    @abstractmethod
    def export(self) -> nn.Module:
        """The trained network, as evaluation will load it (e.g. the victim, or the EMA denoiser)."""

    @abstractmethod
    def step(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and extra logs of one batch in ``stage`` (train / val / test)."""

    def _shared(self, batch: Any, stage: str) -> torch.Tensor:
        loss, logs = self.step(batch, stage)
        batch_size = len(batch[0]) if isinstance(batch, (tuple, list)) else None
        # Under DDP (trainer=ddp) val/test epoch means are reduced over ranks, so val/acc is the whole split's, not
        # rank 0's shard; training logs stay per-rank (no extra all-reduce per step). A no-op on one device.
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True, batch_size=batch_size,
                 sync_dist=sync)
        for key, value in logs.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "acc", on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=sync)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared(batch, "test")

    def manual_update(self, optimizer: torch.optim.Optimizer, compute_loss: Callable[[], Any], times: int = 1) -> Any:
        """``times`` steps of ``optimizer`` on ``compute_loss()`` (a loss, or a tuple whose first item is the loss)
        under Lightning's manual optimisation, with ``optimizer`` toggled so that only its parameters get gradients
        (a GAN's discriminator and generator steps); returns the last ``compute_loss()``."""
        self.toggle_optimizer(optimizer)
        try:
            for _ in range(times):
                out = compute_loss()
                optimizer.zero_grad()
                self.manual_backward(out[0] if isinstance(out, tuple) else out)
                optimizer.step()
        finally:
            self.untoggle_optimizer(optimizer)
        return out

    def save_sample_grid(self, images: torch.Tensor) -> Path | None:
        """Write ``images`` (in [0, 1]) to ``<log_dir>/samples/epoch_<epoch>.png`` on rank zero (generative modules)."""
        log_dir = self.trainer.log_dir  # collective (broadcast) call: every rank makes it
        if not log_dir or not self.trainer.is_global_zero:
            return None
        from torchvision.utils import save_image

        path = Path(log_dir) / "samples" / f"epoch_{self.current_epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images, path, nrow=max(1, int(math.sqrt(len(images)))))
        return path

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}
