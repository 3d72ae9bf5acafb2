"""Train whatever ``conf/model`` selects: a victim classifier (any training objective) or a diffusion
denoiser — later also RAP adapters and JATP pre-processors, all on the one ``LitBase``.

    python train.py dataset=fashion_mnist victim=classifier_a training=standard trainer.max_epochs=5
    python train.py training=fgsm_at                 # DiffDefense Table 2's FGSM-adversarially-trained A
    python train.py model=denoiser trainer.max_epochs=20   # the DiffDefense DDPM

Writes Lightning checkpoints (``last.ckpt`` → automatic resume) and exports the trained network to the
module's ``export_path`` as a plain state dict (loadable with ``weights_only=True``) for evaluate.py.
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
from models.weights import save_weights


def lightning_dir(export_path: str | Path) -> Path:
    """Lightning checkpoints of one exported network: ``<folder>/lightning/<name>/``."""
    export_path = Path(export_path)
    return export_path.parent / "lightning" / export_path.stem


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.dataset``; return (metrics, objects) like lightning-hydra-template."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset.datamodule)
    module = instantiate(cfg.model)
    if not module.export_path:
        raise ValueError("model.export_path is not set: nowhere to write the trained weights")
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    ckpt_dir = lightning_dir(module.export_path)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, filename="epoch{epoch:03d}", auto_insert_metric_name=False)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[checkpoint])
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if cfg.resume and last.exists() else None)

    weights = save_weights(module.export(), module.export_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.test_after_training:
        # Clean scoring needs no input gradients, so Lightning's inference-mode test loop is fine here;
        # attacks never run under trainer.test (see attacks.base.Attack).
        for results in trainer.test(module, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in results.items()})
    print(f"trained {type(module).__name__} on {cfg.dataset.name}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) + f"; weights → {weights}")
    return metrics, {"module": module, "trainer": trainer, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metrics.get("val/acc", metrics.get("val/loss"))


if __name__ == "__main__":
    guard_command_line()
    main()
