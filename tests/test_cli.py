"""End to end: train.py → evaluate.py → tables, and bad input failing with one clear line that overwrites nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import train as train_script
from evaluation.runner import run_evaluation
from evaluation.tables import render

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["logger=csv", "trainer=cpu", "trainer.max_epochs=1", "dataset.datamodule.train_subset=4096",
              "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"]


def test_train_then_evaluate_then_tables(compose, tmp_path):
    cfg = compose("train", TINY_TRAIN)
    metrics, _ = train_script.train(cfg)
    weights = Path(cfg.victim.weights)
    assert weights.is_file() and metrics["test/acc"] > 0.5  # 4096 images, one epoch: well above chance
    assert (train_script.lightning_dir(weights) / "last.ckpt").is_file()
    torch.load(weights, weights_only=True)  # plain state dict

    rows = []
    for attack in ("fgsm", "pgd"):
        ecfg = compose("evaluate", [f"attack={attack}", "dataset.eval_subset=64", f"paths.output_dir={tmp_path / 'multi' / attack}"])
        result = run_evaluation(ecfg)
        rows.append(result)
        out = Path(ecfg.paths.output_dir)
        assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "grid.png"}
        on_disk = json.loads((out / "results.json").read_text())
        assert on_disk["robust_acc"] == result["robust_acc"] and on_disk["config"]["attack"]["name"] == attack
        assert result["n_images"] == 64 and result["robust_acc"] < result["clean_acc"]
    table = render(tmp_path / "multi")
    assert "| fgsm | pgd |" in table.replace("| | ", "| ") or ("fgsm" in table and "pgd" in table)
    assert f"{rows[1]['robust_acc']:.2f}" in table


def test_train_resumes_from_last_checkpoint(compose):
    cfg = compose("train", TINY_TRAIN + ["dataset.datamodule.train_subset=256"])
    train_script.train(cfg)
    cfg2 = compose("train", TINY_TRAIN + ["dataset.datamodule.train_subset=256", "trainer.max_epochs=2"])
    _, objects = train_script.train(cfg2)
    assert objects["trainer"].current_epoch == 2  # resumed at epoch 1, trained one more


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
