"""``trainer=ddp``: Lightning's DDP on CPU (gloo, two processes) through the real ``train.py`` command line.

The trap this guards: Lightning starts rank 1 by re-running ``train.py`` with the same arguments, and a Hydra app
whose run folder is timestamped (``outputs/train/<time>``) would give that child a folder of its own. One run must
leave one folder, one weights file (written by rank 0 only) and a training that two ranks really shared.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: ``hydra.run.dir``'s last component (conf/hydra/default.yaml: ``%Y-%m-%d_%H-%M-%S.%f``).
RUN_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d{6}$")
TRAIN_IMAGES, BATCH = 512, 64  # one epoch = 8 optimiser steps on one process, 4 per rank on two


def test_ddp_config_builds_a_two_process_gloo_trainer(compose) -> None:
    """The config alone (no processes started): strategy ddp, 2 CPU processes, gloo, Lightning's sampler swap on."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose("train", ["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.accelerator == "auto"
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy._get_process_group_backend() == "gloo"
    assert trainer._accelerator_connector.use_distributed_sampler


def test_ddp_inside_a_local_multirun_is_refused_in_one_line(compose, monkeypatch) -> None:
    """Each rank would re-run the whole sweep (its command line still says -m): refused before anything starts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import train as train_script
    from evaluation.cli import UserError

    trainer = instantiate(compose("train", ["trainer=ddp"]).trainer, accelerator="cpu", logger=False,
                          enable_checkpointing=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    train_script.check_ddp_launch(trainer)  # no Hydra app running (composed config): nothing to refuse
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: OmegaConf.create({"mode": RunMode.MULTIRUN})))
    with pytest.raises(UserError, match="cannot run inside a local multirun"):
        train_script.check_ddp_launch(trainer)
    single = instantiate(compose("train", ["trainer=ddp", "trainer.devices=1"]).trainer, accelerator="cpu",
                         logger=False, enable_checkpointing=False)
    train_script.check_ddp_launch(single)  # one process launches no children: fine in a sweep


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_py_ddp_two_cpu_processes_one_run_folder(tmp_path: Path) -> None:
    """``python train.py trainer=ddp`` on CPU: exit 0, ONE Hydra run folder, one loadable weights file, two ranks.

    "Two ranks" is checked by what only a shared epoch produces: with a DistributedSampler each rank steps through
    half of the 512 training images, so the epoch ends at global step 4 (8 on one process); and Lightning's own
    "MEMBER: 2/2" line comes from rank 1.
    """
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "PURIFY_DATA_DIR": str(tmp_path / "data"),
           "PURIFY_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    args = ["trainer=ddp", "trainer.accelerator=cpu", "logger=csv", "trainer.max_epochs=1",
            f"dataset.datamodule.train_subset={TRAIN_IMAGES}", f"dataset.datamodule.batch_size={BATCH}",
            "trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=540)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]

    runs = sorted((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1, f"one Hydra run folder per run, not one per rank: {[p.name for p in runs]}"
    assert RUN_FOLDER.match(runs[0].name) and (runs[0] / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "data", "outputs"]  # no stray lightning_logs/

    weights = tmp_path / "ckpt" / "fashion_mnist" / "classifier_a-standard.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert state and all(torch.is_tensor(v) for v in state.values())
    assert not [p.name for p in weights.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written copy

    last = torch.load(weights.parent / "lightning" / weights.stem / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == TRAIN_IMAGES // BATCH // 2, "each of the 2 ranks trains on half of the epoch"
    assert "MEMBER: 2/2" in out, "rank 1 joined the process group"
    assert "(2 processes, DDPStrategy)" in res.stdout and res.stdout.count("trained ClassifierModule") == 1
    metrics = (runs[0] / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/acc" in metrics and "test/acc" in metrics
