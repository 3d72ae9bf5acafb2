"""Reports of the distribution-transfer experiments from synthetic result files (no evaluation runs):
``paper_quoted`` rows, Table 3's mean over severities, the ε and certification figures, the T* plot's label."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from evaluation.runner import _paper_number


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _result_from_config(cfg, **metrics) -> dict:
    """What ``evaluation.runner.run_metadata`` puts in results.json (labels, table, paper, resolved config) + metrics."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {
        "dataset": cfg.dataset.name, "victim": cfg.victim.name, "victim_training": cfg.victim_training, "defense": cfg.defense.name,
        "attack": cfg.attack.name, "threat": cfg.threat.name, "norm": cfg.attack.norm, "eps": cfg.attack.eps,
        "table": plain["table"], "paper": _paper_number(cfg), "config": plain, **metrics,
    }  # fmt: skip


def test_table1_quoted_rows_come_from_the_resolved_config(compose, tmp_path, grid_cells):
    from evaluation.tables import main, render

    jobs = [("disttrans", "none", 85.0, 4), ("disttrans", "pgd", 70.0, 4), ("none", "none", 93.0, 1)]
    for i, (defense, attack, acc, draws) in enumerate(jobs):
        cfg = compose("evaluate", ["experiment=disttrans_table1", f"defense={defense}", f"attack={attack}"])
        result = _result_from_config(cfg, robust_acc=acc, robust_acc_worst=acc - 5 if draws > 1 else acc, n_draws=draws)
        assert result["config"]["paper_quoted"]["resnet18 AT-ALP"]["pgd"] == 60.3  # reaches results.json via config
        _write(tmp_path / str(i) / "results.json", result)
    text = render(tmp_path)
    cells = grid_cells(text)
    assert cells[("resnet18 disttrans standard", "none")] == "85.00 / 80.00 (86.70)"  # ours, beside the paper's
    assert cells[("resnet18 AT-ALP (quoted)", "none")] == "– (72.10)"
    assert cells[("resnet18 MACER* (quoted)", "pgd")] == "– (43.30)"
    assert cells[("wrn_28_10 EBM-Defense (quoted)", "pgd")] == "– (51.20)"
    assert not any(col == "pgd40_l2" for _, col in cells)  # a column we did not run is not added for quoted rows
    rows = [row for row, _ in cells]
    assert rows.index("resnet18 AT-ALP (quoted)") > max(rows.index("resnet18 disttrans standard"), rows.index("resnet18 none standard"))
    assert "(quoted)" not in text.split("## All metrics")[1]  # the per-run table lists runs only
    assert "`… (quoted)`" in text  # the note says what the marker means
    assert main([str(tmp_path)]) == 0 and "resnet18 TRADES-AWP (quoted)" in (tmp_path / "tables.md").read_text()


def test_table3_mean_over_severities_carries_the_paper_number(compose, tmp_path, grid_cells):
    from evaluation.tables import render

    i = 0
    # disttrans: all five severities, stochastic; none: three of five, deterministic.
    for defense, severities in (("disttrans", [1, 2, 3, 4, 5]), ("none", [1, 3, 5])):
        for k in severities:
            cfg = compose("evaluate", ["experiment=disttrans_table3", f"defense={defense}", f"dataset.datamodule.severity={k}"])
            robust = 90.0 - 2 * k if defense == "disttrans" else 70.0 - 5 * k
            worst = robust - 4 if defense == "disttrans" else robust
            _write(tmp_path / str(i) / "results.json",
                   _result_from_config(cfg, robust_acc=robust, robust_acc_worst=worst, n_draws=4 if defense == "disttrans" else 1))
            i += 1
    text = render(tmp_path)
    cells = grid_cells(text)
    mean = "cifar10c resnet18 gaussian_noise mean"
    assert cells[(mean, "disttrans")] == "84.00 / 80.00 (88.50)"  # mean of 88, 86, 84, 82, 80; paper 88.5
    assert cells[(mean, "none")] == "55.00 (3/5 severities) (65.60)"  # mean of 65, 55, 45 over the three that ran
    assert cells[("cifar10c resnet18 gaussian_noise s3", "none")] == "55.00"  # severity rows: no paper number
    rows = list(dict.fromkeys(row for row, _ in cells))
    assert rows == [f"cifar10c resnet18 gaussian_noise s{k}" for k in range(1, 6)] + [mean]  # severities in order, then the mean
    assert "Rows `… mean`" in text


def _eps_results(root: Path) -> None:
    for i, (defense, e) in enumerate((d, e) for d in ("none", "disttrans") for e in (0, 8, 16, 32)):
        stochastic = defense == "disttrans"
        robust = (90.0 - e if stochastic else 93.0 - 2.5 * e)
        _write(root / str(i) / "results.json", {
            "dataset": "cifar10", "victim": "resnet18", "defense": defense, "attack": "pgd", "threat": "oblivious", "norm": "Linf",
            "eps": e / 255, "robust_acc": robust, "robust_acc_worst": robust - 3 if stochastic else robust, "n_draws": 4 if stochastic else 1,
            "paper": None, "table": {"name": "eps", "row": f"{defense} eps={e / 255}", "column": "resnet18"},
        })  # fmt: skip


def test_eps_plot_one_line_per_defense_and_victim(tmp_path):
    from evaluation.plots import main

    _eps_results(tmp_path)
    assert main(["eps", str(tmp_path)]) == 0
    assert (tmp_path / "eps.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "eps.md").read_text()
    assert "| defense | victim | ε=0/255 | ε=8/255 | ε=16/255 | ε=32/255 |" in md
    assert "| disttrans | resnet18 | 90.00 / 87.00 | 82.00 / 79.00 | 74.00 / 71.00 | 58.00 / 55.00 |" in md
    assert "| none | resnet18 | 93.00 | 73.00 | 53.00 | 13.00 |" in md
    assert "cifar10: accuracy % vs ε (pgd, Linf, threat oblivious; stochastic defenses: mean / worst-of-N)" in md
    assert main(["eps", str(tmp_path / "empty")]) == 2


def _certificate(defense: str, radii: list[float], correct: list[bool]) -> dict:
    grid = [0.0, 0.25, 0.5]
    images = [{"index": i, "label": 1, "prediction": 1 if ok else 0, "radius": r, "correct": ok} for i, (r, ok) in enumerate(zip(radii, correct))]
    curve = [sum(ok and r >= g for r, ok in zip(radii, correct)) / len(radii) for g in grid]
    return {
        "dataset": "fashion_mnist_rgb32", "victim": "resnet18", "defense": "none" if defense == "none" else defense, "sigma": 0.25,
        "n0": 100, "n": 1000, "alpha": 0.001, "n_images": len(radii), "radius_grid": grid, "certified_accuracy": curve,
        "max_certifiable_radius": 0.62, "images": images,
        "table": {"name": "Distribution transfer — randomized-smoothing certified accuracy", "row": f"x {defense}", "column": "sigma=0.25"},
    }  # fmt: skip


def test_certify_plot_overlays_every_certificate(tmp_path):
    from evaluation.plots import main

    _write(tmp_path / "0" / "certify.json", _certificate("none", [0.1, 0.3, 0.6, 0.0], [True, True, False, False]))
    _write(tmp_path / "1" / "certify.json", _certificate("diffpure", [0.4, 0.6, 0.2, 0.3], [True, True, True, False]))
    assert main(["certify", str(tmp_path)]) == 0
    assert (tmp_path / "certify.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "certify.md").read_text()
    assert "| defense | r=0 | r=0.25 | r=0.5 |" in md
    assert "| none | 50.00 | 25.00 | 0.00 |" in md
    assert "| diffpure | 75.00 | 50.00 | 25.00 |" in md
    assert "no radius beyond 0.620" in md
    # A single run's folder: its own certify.png stays, the overlay goes beside it.
    single = tmp_path / "0"
    (single / "certify.png").write_bytes(b"own figure")
    assert main(["certify", str(single)]) == 0
    assert (single / "certify.png").read_bytes() == b"own figure" and (single / "certify_overlay.md").exists()
    assert main(["certify", str(tmp_path / "empty")]) == 2


def test_tstar_plot_names_the_defense_and_reads_a_recorded_t_star(tmp_path, monkeypatch):
    import evaluation.plots as plots

    labels: list[str] = []
    original = plots.save_figure_atomic
    monkeypatch.setattr(plots, "save_figure_atomic", lambda fig, path, **kw: (labels.extend(a.get_ylabel() for a in fig.axes), original(fig, path, **kw))[1])
    for i, (attack, t) in enumerate((a, t) for a in ("none", "pgd") for t in (10, 58, 100)):
        # t* = 58 left null in the config (matched from match_t) and recorded by the run as t_star.
        _write(tmp_path / str(i) / "results.json", {
            "dataset": "cifar10", "attack": attack, "defense": "disttrans", "robust_acc": 50.0 + t / 10 + (30 if attack == "none" else 0),
            "config": {"defense": {"purifier": {"t_star": None if t == 58 else t}}, "dataset": {"eval_split": "val"}},
            **({"t_star": 58} if t == 58 else {}),
        })  # fmt: skip
    assert plots.main(["tstar", str(tmp_path)]) == 0
    assert labels == ["accuracy after disttrans (%)"]
    md = (tmp_path / "tstar.md").read_text()
    assert "## cifar10 (val split), disttrans:" in md and "| pgd | 51.00 | 55.80 | 60.00 | 100 |" in md


def test_report_sections_for_eps_certify_and_severities(compose, tmp_path):
    from evaluation.report import build_report

    _eps_results(tmp_path / "eps")
    _write(tmp_path / "certify" / "0" / "certify.json", _certificate("diffpure", [0.4, 0.6], [True, False]))
    for k in (1, 2):
        cfg = compose("evaluate", ["experiment=disttrans_table3", "defense=none", f"dataset.datamodule.severity={k}"])
        _write(tmp_path / "table3" / str(k) / "results.json", _result_from_config(cfg, robust_acc=60.0 + k, robust_acc_worst=60.0 + k, n_draws=1))
    md = build_report(tmp_path)
    assert "# eps" in md and (tmp_path / "eps" / "eps.png").exists() and "ε=32/255" in md
    assert "# certify" in md and (tmp_path / "certify" / "certify.png").exists() and "| diffpure | 50.00 | 50.00 | 0.00 |" in md
    assert "| cifar10c resnet18 gaussian_noise mean | 61.50 (2/5 severities) (65.60) |" in md
