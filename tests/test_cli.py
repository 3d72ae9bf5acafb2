"""End to end: train.py → evaluate.py → tables, and bad input failing with one clear line that overwrites nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import train as train_script
from evaluation.runner import run_evaluation
from evaluation.tables import render

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["logger=csv", "trainer=cpu", "trainer.max_epochs=1", "dataset.datamodule.train_subset=4096",
              "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"]


def test_train_then_evaluate_then_tables(compose, tmp_path, grid_cells):
    cfg = compose("train", TINY_TRAIN)
    metrics, _ = train_script.train(cfg)
    weights = Path(cfg.victim.weights)
    assert weights.is_file() and metrics["test/acc"] > 0.5  # 4096 images, one epoch: well above chance
    assert (train_script.lightning_dir(weights) / "last.ckpt").is_file()
    torch.load(weights, weights_only=True)  # plain state dict

    rows = []
    for attack in ("fgsm", "pgd"):
        # The pgd run states a paper number for its cell (row "none", column "pgd"), as experiment configs do.
        paper = ["paper={none: {pgd: 12.34}}"] if attack == "pgd" else []
        ecfg = compose("evaluate", [f"attack={attack}", "dataset.eval_subset=64", f"paths.output_dir={tmp_path / 'multi' / attack}", *paper])
        result = run_evaluation(ecfg)
        rows.append(result)
        out = Path(ecfg.paths.output_dir)
        assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "grid.png"}
        on_disk = json.loads((out / "results.json").read_text())
        assert on_disk["robust_acc"] == result["robust_acc"] and on_disk["config"]["attack"]["name"] == attack
        assert result["n_images"] == 64 and result["robust_acc"] < result["clean_acc"]
    assert rows[0]["paper"] is None and rows[1]["paper"] == 12.34
    cells = grid_cells(render(tmp_path / "multi"))
    # Each run's own cell: our robust accuracy, and the paper's number beside it where the config states one.
    assert cells == {("none", "fgsm"): f"{rows[0]['robust_acc']:.2f}", ("none", "pgd"): f"{rows[1]['robust_acc']:.2f} (12.34)"}


class TrainBatchCounter(Callback):
    """Records (epoch, batch index) of every training batch the trainer runs."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, batch_idx))


def counted_train(cfg, monkeypatch) -> tuple[TrainBatchCounter, dict]:
    """``train.train(cfg)`` with a ``TrainBatchCounter`` added to the trainer's callbacks."""
    counter = TrainBatchCounter()
    real = train_script.instantiate

    def instantiate(config, *args, **kwargs):
        if "callbacks" in kwargs:  # the Trainer (train.py passes its ModelCheckpoint here)
            kwargs["callbacks"] = [*kwargs["callbacks"], counter]
        return real(config, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_script, "instantiate", instantiate)
        _, objects = train_script.train(cfg)
    return counter, objects


def test_train_resumes_from_last_checkpoint(compose, monkeypatch):
    """The second run (max_epochs=2) trains only epoch 1's batches: epoch 0 comes from last.ckpt.

    ``current_epoch == 2`` alone holds for a fresh two-epoch run too; the batch count does not.
    """
    tiny = TINY_TRAIN + ["dataset.datamodule.train_subset=256"]
    first, objects = counted_train(compose("train", tiny), monkeypatch)
    per_epoch = len(objects["datamodule"].train_dataloader())
    assert per_epoch >= 2 and first.batches == [(0, b) for b in range(per_epoch)]
    resumed, objects = counted_train(compose("train", tiny + ["trainer.max_epochs=2"]), monkeypatch)
    assert resumed.batches == [(1, b) for b in range(per_epoch)], "resumed at epoch 1: epoch 0 must not be retrained"
    assert objects["trainer"].current_epoch == 2


def test_train_refuses_to_resume_another_trainings_checkpoint(compose, monkeypatch):
    """A last.ckpt written with other data settings is one line naming the differing key, and nothing is trained or
    overwritten; resume=false starts over; the record (run.json) then describes the new run."""
    from evaluation.cli import UserError

    tiny = TINY_TRAIN + ["dataset.datamodule.train_subset=256", "test_after_training=false"]
    _, objects = counted_train(compose("train", tiny), monkeypatch)
    ckpt_dir = train_script.lightning_dir(objects["module"].export_path)
    before = (ckpt_dir / "last.ckpt").read_bytes()
    other = TINY_TRAIN + ["dataset.datamodule.train_subset=128", "trainer.max_epochs=2", "test_after_training=false"]
    with pytest.raises(UserError, match=r"different training \(dataset\.datamodule\.train_subset: 256 → 128\).*resume=false"):
        train_script.train(compose("train", other))
    assert (ckpt_dir / "last.ckpt").read_bytes() == before
    fresh, objects = counted_train(compose("train", other + ["resume=false"]), monkeypatch)
    per_epoch = len(objects["datamodule"].train_dataloader())
    assert fresh.batches[0] == (0, 0) and len(fresh.batches) == 2 * per_epoch, "resume=false trains from epoch 0"
    record = json.loads((ckpt_dir / "run.json").read_text())
    assert record["dataset"]["datamodule"]["train_subset"] == 128


def run_cli(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(tmp), "PURIFY_DATA_DIR": str(tmp / "data"), "PURIFY_CHECKPOINT_DIR": str(tmp / "ckpt")}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def test_unknown_attack_is_one_line_listing_valid_names(tmp_path):
    res = run_cli("evaluate.py", "attack=nonexistent", tmp=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown attack 'nonexistent'" in lines[0] and "pgd" in lines[0] and "deepfool" in lines[0]


def test_missing_dataset_is_one_line_saying_how_to_get_it(tmp_path):
    res = run_cli("evaluate.py", "dataset=mnist", "victim.weights=null", tmp=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "MNIST not found" in lines[0] and "MNIST/raw" in lines[0], lines


def test_corrupt_checkpoint_is_one_line_and_overwrites_nothing(tmp_path):
    ckpt = tmp_path / "ckpt" / "fashion_mnist" / "classifier_a-standard.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"keep": true}')
    res = run_cli("evaluate.py", f"hydra.run.dir={run_dir}", tmp=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and str(ckpt) in lines[0], lines
    assert ckpt.read_bytes() == b"not a checkpoint"
    assert (run_dir / "results.json").read_text() == '{"keep": true}'


def test_resume_cache_key_follows_every_weights_file(compose):
    from evaluation.runner import cache_key

    cfg = compose("evaluate", ["defense=diffdefense"])
    before = cache_key(cfg)
    denoiser = Path(cfg.defense.denoiser.weights)
    denoiser.parent.mkdir(parents=True, exist_ok=True)
    denoiser.write_bytes(b"v1")
    with_v1 = cache_key(cfg)
    denoiser.write_bytes(b"v2")  # retrained denoiser: cached batches must not be reused
    assert len({before, with_v1, cache_key(cfg)}) == 3
    assert cache_key(compose("evaluate", ["defense=diffdefense", "eval.progress=true"])) == cache_key(cfg)


def test_retuned_value_changes_only_the_keys_of_runs_that_read_it(compose):
    from evaluation.runner import cache_key

    key = lambda *overrides: cache_key(compose("evaluate", list(overrides)))  # noqa: E731
    retuned = "dataset.tuned.diffdefense_t_star=3"
    assert key("defense=none", retuned) == key("defense=none")
    assert key("defense=diffdefense", retuned) != key("defense=diffdefense")


def test_wandb_summary_written_offline(compose, tmp_path):
    from evaluation.runner import log_summary

    cfg = compose("evaluate", ["logger=wandb", f"paths.output_dir={tmp_path / 'wb'}"])
    assert cfg.logger.wandb.mode == "offline"
    result = {"defense": "none", "attack": "fgsm", "threat": "white_box_adaptive", "robust_acc": 12.5, "config": {}}
    log_summary(cfg, result)
    runs = list((tmp_path / "wb").rglob("offline-run-*/*.wandb"))  # offline: the summary lives in the run file
    assert len(runs) == 1 and b"robust_acc" in runs[0].read_bytes() and b"12.5" in runs[0].read_bytes()


def test_audit_through_the_cli_passes_the_undefended_model_and_fails_naive_quantisation(compose, tmp_path):
    """`evaluate.py audit=true` end to end: PASS for defense=none, FAIL for 1-bit quantisation without BPDA."""
    cfg = compose("train", TINY_TRAIN)
    train_script.train(cfg)
    common = [
        f"paths.root_dir={tmp_path}", f"paths.data_dir={cfg.paths.data_dir}", f"paths.checkpoint_dir={cfg.paths.checkpoint_dir}",
        "audit=true", "audit_settings.n_images=48", "audit_settings.steps=8", "audit_settings.square_queries=100",
        "logger=csv", "eval.progress=false",
    ]
    # The two audits run side by side, one thread each (small batches gain little from a second thread): the suite's
    # longest test, halved.
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for label, extra in (("none", ["defense=none"]), ("naive", ["defense=bit_depth", "audit_settings.bpda=false"])):
        procs[label] = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *common, *extra, f"hydra.run.dir={tmp_path / label}"],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reports = {}
    for label, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        reports[label] = (stdout, json.loads((tmp_path / label / "audit.json").read_text()))
    stdout, report = reports["none"]
    assert "Gradient-masking audit: PASS" in stdout and report["passed"] and report["defense"] == "none"
    stdout, report = reports["naive"]
    assert "Gradient-masking audit: FAIL" in stdout and not report["passed"] and report["defense"] == "bit_depth"
    failed = {c["name"] for c in report["checks"] if c["status"] == "fail"}
    assert "d_gradients_finite_nonzero" in failed


def test_init_weights_starts_training_from_an_exported_network(compose, tmp_path):
    """``init_weights=<file>``: the network starts from that state dict (lr 0 → the exported weights are the file's,
    apart from BatchNorm's running statistics); a missing file is one line saying how to get it."""
    from models.weights import save_weights

    start = compose("train", TINY_TRAIN)
    donor = instantiate_model(start)
    for p in donor.export().parameters():
        torch.nn.init.uniform_(p, -0.01, 0.01)
    path = save_weights(donor.export(), tmp_path / "donor.pt")
    cfg = compose("train", TINY_TRAIN + [f"init_weights={path}", "model.optimizer.lr=0.0", "trainer.limit_train_batches=1",
                                         "test_after_training=false", "resume=false"])
    train_script.train(cfg)
    trained = torch.load(cfg.victim.weights, weights_only=True)
    given = torch.load(path, weights_only=True)
    weights = [k for k in given if k.endswith("weight")]
    assert weights and all(torch.equal(trained[k], given[k]) for k in weights)
    missing = compose("train", TINY_TRAIN + [f"init_weights={tmp_path / 'nope.pt'}"])
    with pytest.raises(Exception, match="init_weights=.*no such file"):
        train_script.train(missing)


def instantiate_model(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg.model)
