"""Train whatever ``conf/model`` selects: a victim classifier (any training objective) or a diffusion
denoiser — later also RAP adapters and JATP pre-processors, all on the one ``LitBase``.

    python train.py dataset=fashion_mnist victim=classifier_a training=standard trainer.max_epochs=5
    python train.py training=fgsm_at                 # DiffDefense Table 2's FGSM-adversarially-trained A
    python train.py model=denoiser trainer.max_epochs=20   # the DiffDefense DDPM
    python train.py trainer=ddp trainer.devices=4         # DDP over 4 GPUs (CPU: 2 gloo processes); one run folder

Writes Lightning checkpoints (``last.ckpt`` → automatic resume) and exports the trained network to the
module's ``export_path`` as a plain state dict (loadable with ``weights_only=True``) for evaluate.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from evaluation.cli import UserError, guard_command_line, report_user_errors
from evaluation.cost import CostClock, accumulate_cost, training_record_path
from evaluation.results import flatten, write_json_atomic
from models.weights import load_weights, save_weights

log = logging.getLogger(__name__)


def lightning_dir(export_path: str | Path) -> Path:
    """Lightning checkpoints of one exported network: ``<folder>/lightning/<name>/``."""
    export_path = Path(export_path)
    return export_path.parent / "lightning" / export_path.stem


def check_ddp_launch(trainer: L.Trainer) -> None:
    """Refuse a multi-process DDP training inside a local Hydra multirun (``-m``), in one line.

    Lightning starts ranks 1 … n−1 by re-running this script with this process's command line plus
    ``hydra.run.dir=<rank 0's run folder>`` (``_hydra_subprocess_cmd``), which keeps a single run in one folder. In a
    multirun that command line still holds ``-m`` and the whole sweep, so every child would run the sweep again in
    sweep folders of its own, and the next job of this process would find ``LOCAL_RANK`` set and its process group
    still open (it would wait for ranks that never start). Ranks started by a cluster (Slurm, torchrun) are not
    re-launched from here and pass.
    """
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.num_processes * launcher.num_nodes < 2:
        return
    if launcher.cluster_environment.creates_processes_externally:
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise UserError(f"trainer.strategy={trainer.strategy.__class__.__name__} with {launcher.num_processes} processes "
                        "cannot run inside a local multirun (-m): Lightning re-runs the whole sweep command in each rank; "
                        "run one `python train.py trainer=ddp …` per training instead")


def init_from(module: L.LightningModule, path: str | Path) -> None:
    """Start ``module``'s network (``export()``) from an exported weights file: fine-tuning, e.g. adversarial training
    from a standard victim when the full schedule is too costly (a CPU reduction). A resumed run's ``last.ckpt``
    still wins: it holds the fine-tuned state."""
    load_weights(module.export(), path, missing_hint=(
        f"init_weights={path}: no such file — train that network first (python train.py …) or set init_weights=null"))


#: The keys that make two trainings the same run: what is trained, on which data, from what, with which seed.
#: The trainer is left out on purpose: resuming with more epochs, a longer max_time or another progress bar is the
#: point of resuming; everything else differing means the checkpoint belongs to another training.
RUN_IDENTITY_KEYS = ("model", "dataset", "victim", "training", "init_weights", "seed")
#: Beside ``last.ckpt``: the identity of the training that wrote it.
RUN_RECORD = "run.json"


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved ``RUN_IDENTITY_KEYS`` of ``cfg`` (dataset without its evaluation-only ``eval_subset``)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    identity = {k: plain.get(k) for k in RUN_IDENTITY_KEYS}
    if isinstance(identity["dataset"], dict):
        identity["dataset"] = {k: v for k, v in identity["dataset"].items() if k not in ("eval_subset", "tuned", "shard")}
    return json.loads(json.dumps(identity, default=str))


class RunRecord(Callback):
    """Writes ``run.json`` (the run's identity) whenever Lightning saves a checkpoint, so the record always describes
    the training that wrote the ``last.ckpt`` beside it — also when a ``resume=false`` run is interrupted before its
    first save (the old record then still describes the old checkpoint)."""

    def __init__(self, ckpt_dir: Path, identity: dict[str, Any]) -> None:
        self.path = Path(ckpt_dir) / RUN_RECORD
        self.identity = identity

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.identity)


def check_resume(ckpt_dir: Path, identity: dict[str, Any]) -> bool:
    """Whether ``ckpt_dir/last.ckpt`` may be resumed by the training ``identity`` describes.

    Resuming another training's checkpoint (other data, subset, loss, attack, victim …) would silently continue a
    different run under this one's name, so a differing ``run.json`` is one line naming the differing keys; nothing
    is overwritten. Checkpoints from before ``run.json`` existed resume with a warning."""
    last = ckpt_dir / "last.ckpt"
    if not last.exists():
        return False
    record = ckpt_dir / RUN_RECORD
    if not record.exists():
        log.warning("resuming %s, which has no %s: its training settings cannot be compared with this run's", last, RUN_RECORD)
        return True
    try:
        previous = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{record} is unreadable ({err}); delete it to resume {last}, or pass resume=false to start over") from err
    old, new = flatten(previous), flatten(identity)
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if differing:
        shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} → {new.get(k, '<unset>')!r}" for k in differing[:4])
        more = f" (+{len(differing) - 4} more)" if len(differing) > 4 else ""
        raise UserError(f"{last} was written by a different training ({shown}{more}); pass resume=false to start over "
                        f"(it overwrites that checkpoint), or rerun with the settings it was written with")
    return True


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.dataset``; return (metrics, objects) like lightning-hydra-template."""
    clock = CostClock()  # the training's cost → <weights>.train.json (write_training_record)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset.datamodule)
    module = instantiate(cfg.model)
    if not module.export_path:
        raise ValueError("model.export_path is not set: nowhere to write the trained weights")
    if cfg.get("init_weights"):
        init_from(module, cfg.init_weights)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    ckpt_dir = lightning_dir(module.export_path)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, filename="epoch{epoch:03d}", auto_insert_metric_name=False)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[checkpoint, RunRecord(ckpt_dir, run_identity(cfg))])
    check_ddp_launch(trainer)
    last = ckpt_dir / "last.ckpt"
    identity = run_identity(cfg)
    resumed = bool(cfg.resume) and check_resume(ckpt_dir, identity)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resumed else None)

    # Under DDP every rank holds the same weights after fit; rank 0 alone writes them (ModelCheckpoint and the
    # loggers are rank-0-only already), so no two processes replace one file.
    weights = save_weights(module.export(), module.export_path) if trainer.is_global_zero else None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.test_after_training:
        # Clean scoring needs no input gradients, so Lightning's inference-mode test loop is fine here;
        # attacks never run under trainer.test (see attacks.base.Attack). Under DDP each rank scores its share of the
        # test set (a DistributedSampler pads it to a multiple of the world size, so up to world_size − 1 images count
        # twice) and LitBase syncs the epoch means; evaluate.py's numbers are the exact ones.
        for results in trainer.test(module, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in results.items()})
    if trainer.is_global_zero:
        ranks = f" ({trainer.world_size} processes, {trainer.strategy.__class__.__name__})" if trainer.world_size > 1 else ""
        print(f"trained {type(module).__name__} on {cfg.dataset.name}{ranks}: "
              + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) + f"; weights → {weights}")
    if trainer.is_global_zero:
        write_training_record(cfg, module, trainer, clock, metrics, resumed=resumed)
    return metrics, {"module": module, "trainer": trainer, "datamodule": datamodule}


def write_training_record(cfg: DictConfig, module: L.LightningModule, trainer: L.Trainer, clock: CostClock,
                          metrics: dict[str, float], resumed: bool) -> Path:
    """``<weights>.train.json`` beside the exported weights: the training's ``cost`` (evaluation/cost.py: device,
    wall time, CPU-minutes or GPU-hours; GPUs = the world size on CUDA), its metrics, steps and world size. A training
    resumed from ``last.ckpt`` adds its time to the record of the invocation before it (``invocations``)."""
    path = training_record_path(module.export_path)
    previous = None
    if resumed and path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8")).get("cost")
        except (OSError, json.JSONDecodeError, AttributeError):
            previous = None
    cost = clock.cost(trainer.strategy.root_device, n_devices=trainer.world_size, n_machines=trainer.num_nodes)
    record = {"weights": str(module.export_path), "model": type(module).__name__, "dataset": cfg.dataset.name,
              "epochs": trainer.current_epoch, "global_step": trainer.global_step, "world_size": trainer.world_size,
              "strategy": type(trainer.strategy).__name__, "metrics": metrics, "cost": accumulate_cost(previous, cost)}
    return write_json_atomic(path, record)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metrics.get("val/acc", metrics.get("val/loss"))


if __name__ == "__main__":
    guard_command_line()
    main()
