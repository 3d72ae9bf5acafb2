"""Scale-out plumbing of issue 15: multiruns that outlive a failing job, sharded evaluation merged by the tables,
and the W&B sweep files checked without a server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from datamodules.base import parse_shard, shard_of
from evaluation.loop import BatchRecord, summarise
from evaluation.tables import ShardMergeError, load_results, main as tables_main, merge_shards, render
from evaluation.wandb_sweep import SweepError, check, expand_command, grid, load_sweep, multirun_command

ROOT = Path(__file__).resolve().parents[1]
#: The numbers a merge must reproduce exactly (timings aside).
NUMBERS = ("n_images", "n_batches", "clean_acc", "clean_acc_worst", "robust_acc", "robust_acc_worst",
           "attack_success_rate", "violations", "max_perturbation", "n_draws")


def run_multirun(tmp: Path, data_dir: Path, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``evaluate.py -m`` in a subprocess, everything under ``tmp``; one thread (a tiny model, a shared machine)."""
    env = {**os.environ, "PROJECT_ROOT": str(tmp), "PURIFY_DATA_DIR": str(data_dir), "PURIFY_CHECKPOINT_DIR": str(tmp / "ckpt"),
           "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "evaluate.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp, timeout=240)


def test_failing_job_does_not_stop_the_sweep_rerun_skips_done_jobs_and_shards_merge_exactly(tmp_path, data_dir):
    """Job #1 (a bad shard) fails between good ones: every other job runs, the end lists it with its one-line error,
    the exit is non-zero; a rerun skips the three finished jobs; shards 0/2 + 1/2 merge into the unsharded numbers.

    Tiny and deterministic: 48 Fashion-MNIST images in 3 batches of 16 (shard 0 = 1 batch, shard 1 = 2), an untrained
    classifier A (seeded), FGSM ε = 0.02 through a stochastic purifier (Gaussian noise) scored over 4 draws, so the
    counts are fractional and every batch's random numbers must match between the sharded and unsharded runs."""
    sweep = tmp_path / "sweep"
    overrides = ("dataset.shard=0/2,2/2,1/2,null", "dataset.eval_subset=48", "dataset.datamodule.eval_batch_size=16",
                 "victim.weights=null", "attack=fgsm", "attack.eps=0.02", "defense=gaussian_noise", "eval.n_draws=4",
                 "eval.progress=false", "eval.grid=false")
    first = run_multirun(tmp_path, data_dir, sweep, *overrides)
    assert first.returncode == 1, first.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "2", "3"], "the jobs after the failing one ran"
    summary = first.stderr[first.stderr.index("multirun: "):].splitlines()
    assert summary[0].startswith("multirun: 1 of 4 jobs FAILED (3 done)"), summary
    assert summary[1].startswith("  #1 dataset.shard=2/2 ") and "error: dataset.shard=2/2 is out of range" in summary[1], summary
    assert f"hydra.sweep.dir={sweep}" in summary[2]
    assert "Traceback" not in first.stderr and "ValueError" in (sweep / "1" / "error.txt").read_text()
    assert json.loads((sweep / "1" / "job_status.json").read_text())["status"] == "failed"

    # The shards merge into exactly the unsharded run's numbers.
    results = load_results(sweep)
    merged = [r for r in results if (r.get("shard") or {}).get("merged")]
    whole = [r for r in results if not r.get("shard")]
    assert len(results) == 2 and len(merged) == 1 and len(whole) == 1
    assert merged[0]["shard"]["merged"] == 2 and merged[0]["n_draws"] == 4
    assert {k: merged[0][k] for k in NUMBERS} == {k: whole[0][k] for k in NUMBERS}
    untimed = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert untimed(merged[0]["batch_records"]) == untimed(whole[0]["batch_records"])
    assert 0 < whole[0]["clean_acc"] < 100 and whole[0]["robust_acc"] != whole[0]["robust_acc_worst"]  # non-trivial counts
    parts = {json.loads((sweep / j / "results.json").read_text())["shard"]["batches"][0] for j in ("0", "2")}
    assert parts == {0, 1}
    assert "merged 2/2 shards (3 batches, 48 images)" in render(sweep)
    # The merged row's cost is the sum of its shards' (each job recorded its own wall time and device).
    shard_costs = [json.loads((sweep / j / "results.json").read_text())["cost"] for j in ("0", "2")]
    assert all(c["wall_s"] > 0 and c["device_kind"] == "cpu" for c in shard_costs)
    assert merged[0]["cost"]["jobs"] == 2 and merged[0]["cost"]["wall_s"] == pytest.approx(sum(c["wall_s"] for c in shard_costs))
    assert "**Cost** of this table: 3 jobs: wall " in render(sweep)

    # Rerun into the same folder: the finished jobs are skipped (their files untouched), the failing one fails again.
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    again = run_multirun(tmp_path, data_dir, sweep, *overrides)
    assert again.returncode == 1, again.stderr[-3000:]
    assert again.stdout.count("skipped: ") == 3, again.stdout[-3000:]
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")} == stamps
    assert "multirun: 1 of 4 jobs FAILED (3 done)" in again.stderr


def _shard_result(index: int, count: int, records: list[BatchRecord], n_batches: int, cell: str = "c0") -> dict:
    """A results.json of one shard, as the runner writes it (labels, shard block, batch records)."""
    first, stop = records[0].index, records[-1].index + 1
    n_images = sum(r.n for r in records)
    return {"dataset": "d", "victim": "v", "defense": "none", "attack": "fgsm", "threat": "white_box_adaptive",
            "table": {"name": "t", "row": "none", "column": "fgsm"}, "n_draws": 1, **summarise(records),
            "batch_records": [asdict(r) for r in records],
            "shard": {"index": index, "count": count, "batches": [first, stop], "n_batches": n_batches,
                      "images": [0, n_images], "n_images": 40, "cell": cell}}


def _record(i: int, robust: float) -> BatchRecord:
    return BatchRecord(index=i, n=10, clean_correct=8.0, clean_correct_worst=8, robust_correct=robust, robust_correct_worst=int(robust),
                       clean_correct_majority=8, attack_success=8 - int(robust), violations=0, max_perturbation=0.1, seconds=0.5)


def test_shard_merge_refuses_missing_or_duplicate_shards_in_one_line(tmp_path, capsys):
    records = [_record(i, r) for i, r in enumerate((1.1, 2.7, 0.3, 5.9))]
    parts = [_shard_result(0, 2, records[:2], 4), _shard_result(1, 2, records[2:], 4)]
    (merged,) = merge_shards(parts[::-1])
    assert merged["robust_acc"] == summarise(records)["robust_acc"] and merged["n_images"] == 40
    with pytest.raises(ShardMergeError, match=r"missing shard 1/2 \(have 1 of 2"):
        merge_shards(parts[:1])
    with pytest.raises(ShardMergeError, match="duplicate shard 0/2"):
        merge_shards([*parts, parts[0]])
    # Another evaluation's shards (another cell key: other config, code or weights) never complete this one.
    with pytest.raises(ShardMergeError, match="missing shard [01]/2"):
        merge_shards([parts[0] | {"shard": {**parts[0]["shard"], "cell": "c1"}}, parts[1]])
    for j, part in enumerate(parts[:1]):
        (tmp_path / str(j)).mkdir()
        (tmp_path / str(j) / "results.json").write_text(json.dumps(part))
    assert tables_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot merge cell none × fgsm (d, white_box_adaptive): missing shard 1/2")


def test_bad_shard_string_is_one_clear_error(compose, capsys):
    from evaluation.cli import report_user_errors
    from evaluation.runner import run_evaluation

    for bad in ("2/2", "-1/2", "1", "a/b", "0/0", "1/2/3", 1):
        with pytest.raises(ValueError, match=r"dataset\.shard") as err:
            parse_shard(bad)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
    # A single run keeps today's behaviour: one line, exit status 2, before any data or weights are loaded.
    bad = "2/2"
    cfg = compose("evaluate", [f"dataset.shard='{bad}'"])
    with pytest.raises(SystemExit) as stop:
        report_user_errors(run_evaluation)(cfg)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset.shard") and bad in lines[0]


def test_shards_are_whole_contiguous_batches_that_partition_the_set():
    assert parse_shard(None) is None and parse_shard("null") is None and parse_shard(" 3 / 4 ") == (3, 4)
    for n_images, batch, count in ((48, 16, 2), (100, 16, 3), (512, 64, 8), (10, 3, 4), (7, 7, 1)):
        shards = [shard_of(n_images, batch, i, count) for i in range(count)]
        assert shards[0].first_batch == 0 and shards[-1].stop_batch == shards[0].n_batches
        assert all(a.stop_batch == b.first_batch and a.stop_image == b.first_image for a, b in zip(shards, shards[1:]))
        assert all(s.first_image == s.first_batch * batch for s in shards) and shards[-1].stop_image == n_images
        assert max(s.stop_batch - s.first_batch for s in shards) - min(s.stop_batch - s.first_batch for s in shards) <= 1
    # More shards than batches: some would be empty (here shard 0 of 3 over 2 batches), which is refused.
    with pytest.raises(ValueError, match=r"dataset.shard=0/3 is empty: the evaluation set has only 2 batches .* at most 2 shards"):
        shard_of(32, 16, 0, 3)


@pytest.mark.parametrize("path", ["sweep.yaml", "sweeps/disttrans.yaml"])
def test_sweep_files_reach_real_config_keys_and_pin_the_validation_split(path):
    sweep = load_sweep(ROOT / path)
    assert check(sweep) == max(len(spec.get("values", [None])) for spec in sweep["parameters"].values())
    points = grid(sweep)
    argv = expand_command(sweep, points[0])
    assert argv[:3] == ["/usr/bin/env", "python", "evaluate.py"] and "dataset.eval_split=val" in argv
    assert argv[-len(points[0]):] == [f"{k}={v}" for k, v in points[0].items()]
    assert len(points) == len({tuple(p.items()) for p in points}) > 1
    multirun = multirun_command(sweep)
    assert multirun[:3] == ["python", "evaluate.py", "-m"] and not any(a.startswith("logger.wandb.mode=") for a in multirun)
    # Tuning on test, or a parameter that reaches no config key, is refused before any agent runs.
    unpinned = {**sweep, "command": [c for c in sweep["command"] if c != "dataset.eval_split=val"]}
    with pytest.raises(SweepError, match="must pin dataset.eval_split=val"):
        check(unpinned)
    with pytest.raises(SweepError, match="never sweep it"):
        check({**sweep, "parameters": {**sweep["parameters"], "dataset.eval_split": {"values": ["val", "test"]}}})
    if path == "sweep.yaml":
        with pytest.raises(SweepError, match="^defense.purifier.bogus=1: Hydra rejects it"):
            check({**sweep, "parameters": {"defense.purifier.bogus": {"value": 1}}})
