"""Cost reporting (issue 15 item 4): every result file records device, wall time and CPU-minutes / GPU-hours; a
training records its own beside the weights; `make tables` prints each table's summed cost; shards' costs add up."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest

import train as train_script
from evaluation.loop import BatchRecord, summarise
from evaluation.cost import accumulate_cost, cost_record, format_cost, sum_costs, training_record_path
from evaluation.results import device_name
from evaluation.runner import run_evaluation
from evaluation.tables import load_results, long_table, merge_shards, render

TINY_TRAIN = ["logger=csv", "trainer=cpu", "trainer.max_epochs=1", "dataset.datamodule.train_subset=512",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
              "test_after_training=false"]


def _check_cost(cost: dict, device: str = "cpu") -> None:
    assert cost["device"] == device_name(device) and cost["device_kind"] == "cpu" and cost["n_devices"] == 1
    assert cost["wall_s"] > 0 and cost["cpu_minutes"] == pytest.approx(cost["wall_s"] / 60) and cost["gpu_hours"] is None
    assert cost["threads"] >= 1 and cost["cpu_count"] >= 1 and cost["finished_at"].endswith("+00:00")


def test_training_evaluation_and_audit_record_their_cost_and_tables_sum_it(compose, tmp_path):
    # Training: <weights>.train.json beside the weights; a resumed training adds its time to the record before it.
    cfg = compose("train", TINY_TRAIN)
    train_script.train(cfg)
    record_file = training_record_path(cfg.victim.weights)
    assert record_file.name == Path(cfg.victim.weights).stem + ".train.json"
    first = json.loads(record_file.read_text())
    _check_cost(first["cost"])
    assert first["cost"]["invocations"] == 1 and first["world_size"] == 1 and first["weights"] == cfg.victim.weights
    train_script.train(cfg)  # resumes from last.ckpt (max_epochs already reached): a second, short invocation
    again = json.loads(record_file.read_text())["cost"]
    assert again["invocations"] == 2 and again["wall_s"] > first["cost"]["wall_s"]

    # Two evaluation jobs of one table: each results.json (and .csv) records its cost.
    walls = []
    for attack in ("fgsm", "none"):
        ecfg = compose("evaluate", [f"attack={attack}", "dataset.eval_subset=16", "eval.grid=false",
                                    f"paths.output_dir={tmp_path / 'multi' / attack}"])
        result = run_evaluation(ecfg)
        on_disk = json.loads((Path(ecfg.paths.output_dir) / "results.json").read_text())
        _check_cost(on_disk["cost"])
        assert on_disk["cost"] == result["cost"]
        with open(Path(ecfg.paths.output_dir) / "results.csv") as f:
            row = next(csv.DictReader(f))
        assert float(row["cost_wall_s"]) == pytest.approx(on_disk["cost"]["wall_s"]) and row["cost_device_kind"] == "cpu"
        walls.append(on_disk["cost"]["wall_s"])
    text = render(tmp_path / "multi")
    total = sum(walls)
    assert f"**Cost** of this table: 2 jobs: wall {total:.1f} s, {total / 60:.4g} CPU-minutes on {device_name('cpu')}." in text
    # The training record beside the weights the runs load (the resumed training's summed time).
    assert f"Training of the weights these runs load (`<weights>.train.json`): 1 weights file: wall {again['wall_s']:.1f} s" in text
    assert "| wall_s |" in text.split("## All metrics")[1].splitlines()[2]

    # The audit writes its cost into audit.json.
    acfg = compose("evaluate", ["audit=true", "audit_settings.n_images=8", "audit_settings.steps=2", "audit_settings.square_queries=10",
                                f"paths.output_dir={tmp_path / 'audit'}"])
    run_evaluation(acfg)
    _check_cost(json.loads((tmp_path / "audit" / "audit.json").read_text())["cost"])


def _result(i: int, cost: dict | None, seconds: float = 2.0) -> dict:
    return {"dataset": "d", "victim": "v", "defense": "none", "attack": f"a{i}", "threat": "oblivious", "eps": 0.1,
            "robust_acc": 10.0, "n_draws": 1, "seconds": seconds, "table": {"name": "t", "row": "none", "column": f"a{i}"},
            **({"cost": cost} if cost is not None else {})}


def test_tables_print_the_summed_cost_of_two_jobs_and_count_old_results_as_unknown(tmp_path):
    cpu = cost_record("cpu", 90.0)
    gpu = {**cost_record("cpu", 1800.0), "device": "NVIDIA H200", "device_kind": "cuda", "n_devices": 2, "cpu_minutes": None, "gpu_hours": 1.0}
    for i, r in enumerate([_result(0, cpu), _result(1, {**cpu, "wall_s": 30.0, "cpu_minutes": 0.5})]):
        (tmp_path / "two" / str(i)).mkdir(parents=True)
        (tmp_path / "two" / str(i) / "results.json").write_text(json.dumps(r))
    text = render(tmp_path / "two")
    assert f"**Cost** of this table: 2 jobs: wall 2.0 min, 2 CPU-minutes on {device_name('cpu')}." in text
    assert "| 90 |" in long_table(load_results(tmp_path / "two")) and "| 30 |" in long_table(load_results(tmp_path / "two"))

    # An old result (no cost) is unknown, never zero; a CUDA job adds GPU-hours beside the CPU-minutes.
    total = sum_costs([cpu, gpu, None])
    assert total["jobs"] == 3 and total["unknown_jobs"] == 1 and total["wall_s"] == 1890.0
    assert total["cpu_minutes"] == 1.5 and total["gpu_hours"] == 1.0 and total["device_kind"] == "mixed" and total["n_devices"] == 2
    line = format_cost(total)
    assert line.startswith("3 jobs: wall 31.5 min, 1.5 CPU-minutes, 1 GPU-hours on ") and "NVIDIA H200" in line
    assert line.endswith("; 1 of the 3 jobs unknown (no cost record: written before cost reporting), not counted")
    for i, r in enumerate([_result(0, None, 1.5), _result(1, None, 2.5)]):
        (tmp_path / "old" / str(i)).mkdir(parents=True)
        (tmp_path / "old" / str(i) / "results.json").write_text(json.dumps(r))
    old = render(tmp_path / "old")
    assert "**Cost** of this table: 2 jobs: cost unknown (no cost record: written before cost reporting) " in old
    assert "alone took 4 s, their `seconds`" in old and "wall_s" not in old  # no column when no run has a cost
    assert accumulate_cost(None, cpu)["invocations"] == 1
    assert accumulate_cost(accumulate_cost(None, cpu), cpu)["wall_s"] == 180.0


def _record(i: int) -> BatchRecord:
    return BatchRecord(index=i, n=10, clean_correct=8.0, clean_correct_worst=8, robust_correct=3.0, robust_correct_worst=3,
                       clean_correct_majority=8, attack_success=5, violations=0, max_perturbation=0.1, seconds=0.5)


def test_a_sharded_merge_sums_the_shards_costs(tmp_path):
    records = [_record(i) for i in range(4)]
    parts = []
    for index, (part, wall) in enumerate(((records[:2], 40.0), (records[2:], 80.0))):
        parts.append({**_result(0, cost_record("cpu", wall)), **summarise(part), "batch_records": [asdict(r) for r in part],
                      "shard": {"index": index, "count": 2, "batches": [part[0].index, part[-1].index + 1], "n_batches": 4,
                                "images": [0, 20], "n_images": 40, "cell": "c0"}})
    (merged,) = merge_shards(parts)
    cost = merged["cost"]
    assert cost["jobs"] == 2 and cost["unknown_jobs"] == 0 and cost["wall_s"] == 120.0 and cost["cpu_minutes"] == pytest.approx(2.0)
    assert cost["device"] == device_name("cpu") and cost["device_kind"] == "cpu"
    for j, part in enumerate(parts):
        (tmp_path / str(j)).mkdir()
        (tmp_path / str(j) / "results.json").write_text(json.dumps(part))
    text = render(tmp_path)
    assert f"**Cost** of this table: 2 jobs: wall 2.0 min, 2 CPU-minutes on {device_name('cpu')}." in text
    assert "| 2/2 merged | 120 |" in text
    # A shard without a cost record leaves the merged cost partly unknown, said as such.
    (merged,) = merge_shards([parts[0], {k: v for k, v in parts[1].items() if k != "cost"}])
    assert merged["cost"]["jobs"] == 2 and merged["cost"]["unknown_jobs"] == 1 and merged["cost"]["wall_s"] == 40.0
    assert sum_costs([merged["cost"]])["unknown_jobs"] == 1


def test_detection_and_certification_record_their_cost(compose):
    import torch
    from hydra.utils import instantiate

    from models.weights import save_weights

    tiny = ["dataset.eval_subset=8", "eval.max_batches=1", "eval.n_draws=2", "eval.grid=false", "eval.resume=false",
            "defense.purifier.weights=null", "defense.purifier.t_star=1", "defense.purifier.iterations=1", "defense.purifier.restarts=1"]
    certify = ["certify_settings.n0=4", "certify_settings.n=16", "certify_settings.batch_size=16", "certify_settings.n_images=2",
               "dataset.eval_subset=8", "defense=none"]
    for overrides, name in ((["experiment=diffdefense_detection", "attack=fgsm", *tiny], "detection.json"),
                            (["experiment=disttrans_certify", *certify], "certify.json")):
        cfg = compose("evaluate", overrides)
        torch.manual_seed(0)
        save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
        result = run_evaluation(cfg)
        on_disk = json.loads((Path(cfg.paths.output_dir) / name).read_text())
        _check_cost(on_disk["cost"])
        assert on_disk["cost"] == result["cost"]
