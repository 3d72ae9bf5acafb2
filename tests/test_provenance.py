"""Provenance and reporting: the resume-cache key follows code, libraries and device; a run that breaks the
threat model writes no result (now or on a resumed rerun); tables show worst-of-N beside the mean."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from evaluation import runner
from evaluation.runner import SOURCE_PACKAGES, SOURCE_ROOT, cache_key, provenance, run_evaluation
from evaluation.tables import grid_table, render


def _copy_sources(dest: Path) -> Path:
    """The packages the source hash covers, copied to ``dest`` (so a test can edit them)."""
    for package in SOURCE_PACKAGES:
        shutil.copytree(SOURCE_ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


# -- Task A: the cache key ---------------------------------------------------------------------------
def test_key_follows_number_code_not_presentation_code(compose, tmp_path):
    cfg = compose("evaluate", ["defense=none"])
    original = _copy_sources(tmp_path / "original")
    key = cache_key(cfg, device="cpu", source_root=original)
    assert cache_key(cfg, device="cpu", source_root=original) == key  # same inputs, same key
    assert key == cache_key(cfg, device="cpu", source_root=_copy_sources(tmp_path / "same"))  # content, not location

    defense_fix = _copy_sources(tmp_path / "defense_fix")
    _append(defense_fix / "defenses" / "gaussian_noise.py", "\n# a bug fix\n")
    assert cache_key(cfg, device="cpu", source_root=defense_fix) != key
    clean_key = cache_key(cfg, ignore=("attack", "threat"), device="cpu", source_root=original)
    assert cache_key(cfg, ignore=("attack", "threat"), device="cpu", source_root=defense_fix) != clean_key

    table_edit = _copy_sources(tmp_path / "table_edit")
    _append(table_edit / "evaluation" / "tables.py", "\n# a new column layout\n")
    assert cache_key(cfg, device="cpu", source_root=table_edit) == key


def test_key_follows_library_versions(compose, monkeypatch):
    cfg = compose("evaluate", [])
    key = cache_key(cfg, device="cpu")
    real = runner.package_version
    monkeypatch.setattr(runner, "package_version", lambda name: "0.0.0-other" if name == "torch" else real(name))
    assert cache_key(cfg, device="cpu") != key
    assert provenance("cpu")["versions"]["torch"] == "0.0.0-other"


def test_key_follows_the_device(compose, monkeypatch):
    cfg = compose("evaluate", ["device=cpu"])
    cpu = cache_key(cfg, device="cpu")
    assert cache_key(cfg) == cpu  # without a device argument, cfg.device resolved
    monkeypatch.setattr(runner, "device_name", lambda device: "NVIDIA H200")  # no GPU needed to key one
    assert runner.device_key("cuda") == "cuda (NVIDIA H200)"
    assert cache_key(cfg, device="cuda") != cpu


# -- Task B1: a run outside the threat model fails and stays failed ---------------------------------
ATTACK_CALLS = {"n": 0}


def overshooting_noise(model: torch.nn.Module, eps: float):
    """A deliberately broken attack: ±2ε per pixel, clamped to [0, 1] — twice outside the L∞ ball."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ATTACK_CALLS["n"] += 1
        return (x + 2 * eps * torch.sign(torch.randn_like(x))).clamp(0, 1)

    return run


def test_threat_model_violation_raises_and_writes_nothing_even_on_resume(compose):
    cfg = compose("evaluate", [
        "attack=fgsm", "attack.name=overshoot", f"attack.builder._target_={__name__}.overshooting_noise",
        "dataset.eval_subset=16", "eval.max_batches=1", "eval.grid=false",
    ])  # fmt: skip
    from models.weights import save_weights

    torch.manual_seed(0)
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    out = Path(cfg.paths.output_dir)
    eps = cfg.attack.eps
    calls = ATTACK_CALLS["n"]
    with pytest.raises(RuntimeError, match=rf"attack 'overshoot' broke the threat model on 16 of 16 .*max Linf perturbation {2 * eps:.4g} vs ε = {eps:g}") as err:
        run_evaluation(cfg)
    assert len(str(err.value).splitlines()) == 1
    assert ATTACK_CALLS["n"] == calls + 1
    assert not (out / "results.json").exists() and not (out / "results.csv").exists()
    cached = list(Path(cfg.eval.cache_dir).glob("*.jsonl"))
    assert any(json.loads(f.read_text().splitlines()[0]).get("violations") == 16 for f in cached)

    with pytest.raises(RuntimeError, match="broke the threat model on 16 of 16"):
        run_evaluation(cfg)  # resumed from the cached batch record: fails the same way, without attacking again
    assert ATTACK_CALLS["n"] == calls + 1
    assert not (out / "results.json").exists()


def test_results_json_records_provenance(compose):
    cfg = compose("evaluate", ["device=cpu", "attack=none", "dataset.eval_subset=8", "eval.max_batches=1", "eval.grid=false", "eval.resume=false"])
    from models.weights import save_weights

    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    run_evaluation(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk["provenance"] == provenance("cpu")
    assert set(on_disk["provenance"]["versions"]) == {"torch", "torchattacks", "pyautoattack"}
    assert on_disk["provenance"]["versions"]["torch"] == importlib.metadata.version("torch")
    assert on_disk["provenance"]["device"] == "cpu" and len(on_disk["provenance"]["source_hash"]) == 16


# -- Task B2: worst-of-N in the tables ---------------------------------------------------------------
def _result(defense: str, n_draws: int, robust: float, worst: float, paper: float | None) -> dict:
    return {
        "dataset": "fashion_mnist", "victim": "classifier_a", "victim_training": "standard", "defense": defense,
        "attack": "pgd", "threat": "white_box_adaptive", "eps": 0.1, "robust_acc": robust, "robust_acc_worst": worst,
        "n_draws": n_draws, "paper": paper, "table": {"name": "t", "row": defense, "column": "pgd"},
    }  # fmt: skip


def test_tables_show_worst_of_n_only_for_stochastic_defenses(tmp_path):
    for i, r in enumerate([_result("diffdefense", 4, 23.4, 18.0, 25.0), _result("none", 1, 3.5, 3.5, None)]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    text = render(tmp_path)
    assert "| diffdefense | 23.40 / 18.00 (25.00) |" in text
    assert "| none | 3.50 |" in text
    assert "mean / worst-of-N" in text.splitlines()[0]
    only_deterministic = grid_table([_result("none", 1, 3.5, 3.5, 4.0)])
    assert only_deterministic.splitlines()[-1] == "| none | 3.50 (4.00) |"


def _weights_variant(path: str, robust: float, out: str) -> dict:
    return {**_result("bit_depth", 1, robust, robust, None),
            "config": {"victim": {"weights": path}, "paths": {"output_dir": out}, "dataset": {"eval_split": "val"}}}


def test_tables_keep_runs_of_other_weights_apart_and_name_what_differs(tmp_path):
    """Three classifiers (800 / 1,600 / 3,200 training images) under one row label: three rows naming the weights
    file, not one cell showing whichever was read last; the output folder (where it ran) names nothing."""
    runs = [_weights_variant(f"checkpoints/mnist/data_size/classifier_a-n{n}.pt", acc, f"multirun/x/{n}")
            for n, acc in [(800, 56.5), (1600, 67.5), (3200, 75.5)]]
    runs.append(_weights_variant("checkpoints/mnist/data_size/classifier_a-n800.pt", 56.5, "multirun/rerun/800"))
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    lines = render(tmp_path).splitlines()
    for n, acc in [(800, "56.50"), (1600, "67.50"), (3200, "75.50")]:
        assert f"| bit_depth (victim.weights=classifier_a-n{n}.pt) | {acc} |" in lines
    assert not any(line.startswith("| bit_depth |") for line in lines)
    assert any(line.startswith("| dataset | victim | victim_training | defense | variant |") for line in lines)


def test_tstar_curves_keep_denoisers_of_other_training_lengths_apart():
    from evaluation.plots import tstar_curves

    def run(epochs: int, acc: float) -> dict:
        return {"dataset": "mnist", "defense": "diffdefense_authors", "attack": "fgsm", "threat": "oblivious",
                "robust_acc": acc, "table": {"row": "mnist val fgsm", "column": "T*=10"},
                "config": {"dataset": {"eval_split": "val"}, "defense": {"purifier": {"t_star": 10},
                           "denoiser": {"weights": f"ckpt/e{epochs}.pt"}}}}

    from evaluation.tables import tell_apart
    curves = tstar_curves(tell_apart([run(86, 75.5), run(501, 74.0)]))
    assert {k[2]: v["fgsm"][10] for k, v in curves.items()} == {
        "diffdefense_authors (defense.denoiser.weights=e86.pt)": 75.5,
        "diffdefense_authors (defense.denoiser.weights=e501.pt)": 74.0}
