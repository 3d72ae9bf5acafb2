"""Train a victim classifier (and, in later issues, denoisers / adapters / pre-processors).

    python train.py dataset=fashion_mnist victim=classifier_a training=standard trainer.max_epochs=5
    python train.py training=fgsm_at                 # DiffDefense Table 2's FGSM-adversarially-trained A

Writes Lightning checkpoints (``last.ckpt`` → automatic resume) and exports the trained weights to
``victim.weights`` as a plain state dict (loadable with ``weights_only=True``) for evaluate.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from evaluation.cli import guard_command_line, report_user_errors
from evaluation.loop import evaluate
from models.victims import save_victim


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.dataset``; return (metrics, objects) like lightning-hydra-template."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset.datamodule)
    victim = instantiate(cfg.victim, weights=None).train()  # build_victim returns eval mode
    module = instantiate(cfg.model, model=victim)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    ckpt_dir = Path(cfg.checkpoint_dir)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, monitor="val/acc", mode="max", filename="best")
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[checkpoint])
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if cfg.resume and last.exists() else None)

    weights = Path(cfg.victim.weights)
    save_victim(victim, weights)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.test_after_training:
        # Our own loop, not trainer.test: identical numbers to evaluate.py and no inference-mode surprises.
        clean = evaluate(victim, datamodule, attack=None, progress=False, device=module.device)
        metrics["test/clean_acc"] = clean["clean_acc"]
    print(f"trained {cfg.victim.name} ({cfg.victim_training}) on {cfg.dataset.name}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) + f"; weights → {weights}")
    return metrics, {"module": module, "trainer": trainer, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metrics.get("val/acc")


if __name__ == "__main__":
    guard_command_line()
    main()
