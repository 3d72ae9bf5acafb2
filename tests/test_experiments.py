"""DiffDefense experiment configs (conf/experiment/diffdefense_*.yaml) and their machinery.

Every experiment composes, its Hydra sweep expands (exactly as the basic sweeper does, command-line
overrides winning) into configs that compose and resolve, the paper blocks hold the paper's numbers at
the right (row, column); ``attack=none`` is the identity; the detection AUC and ``run_detection`` are
right on known scores; the purifier timing lands in results.json; the plots write PNGs.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from attacks.base import Attack
from attacks.noise import NoAttack
from defenses.base import Defended, Identity
from evaluation.cli import UserError, check_overrides, group_options
from evaluation.detection import roc_auc, run_detection
from evaluation.runner import _paper_number, run_evaluation
from evaluation.threats import Oblivious

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DIFFDEFENSE = [e for e in EXPERIMENTS if e.startswith("diffdefense_")]
CPU_SCALE = ["dataset=fashion_mnist", "dataset.eval_subset=1000"]
SAMPLE = 10  # sweeps larger than this are checked on a deterministic sample


def sweep_params(experiment: str) -> dict[str, str]:
    raw = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    params = OmegaConf.select(raw, "hydra.sweeper.params")
    return {} if params is None else {str(k): str(v) for k, v in params.items()}


def sweep_jobs(experiment: str, command_line: list[str] = ()) -> list[list[str]]:
    """The job override lists ``python evaluate.py -m experiment=<e> <command_line>`` launches."""
    params = [f"{k}={v}" for k, v in sweep_params(experiment).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(command_line))
    return BasicSweeper.split_arguments(overrides, None)[0]


def sample(jobs: list[list[str]], k: int = SAMPLE) -> list[list[str]]:
    return jobs if len(jobs) <= k else random.Random(0).sample(jobs, k)


# -- composition ------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(compose, experiment):
    cfg = compose("evaluate", [f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.table.name and isinstance(cfg.table.row, str) and isinstance(cfg.table.column, str)


@pytest.mark.parametrize("experiment", DIFFDEFENSE)
def test_experiment_documents_its_commands(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"python evaluate.py -m experiment={experiment} dataset=fashion_mnist dataset.eval_subset=1000" in text
    assert "python train.py" in text and "Full scale" in text and "CPU scale" in text


@pytest.mark.parametrize("experiment", DIFFDEFENSE)
@pytest.mark.parametrize("scale", ["full", "cpu"])
def test_sweep_combinations_compose(compose, experiment, scale):
    command_line = CPU_SCALE if scale == "cpu" else []
    jobs = sweep_jobs(experiment, command_line)
    assert len(jobs) >= 2
    for job in sample(jobs):
        cfg = compose("evaluate", [f"experiment={experiment}", *job])
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert plain["table"]["row"] and plain["table"]["column"]
        _paper_number(cfg)  # the lookup never fails
        if scale == "cpu":
            assert cfg.dataset.name == "fashion_mnist" and cfg.dataset.eval_subset == 1000
            assert _paper_number(cfg) is None  # Fashion-MNIST has no paper numbers


def test_cpu_overrides_replace_the_sweeps_datasets():
    assert {j[0] for j in sweep_jobs("diffdefense_table1")} == {"dataset=mnist", "dataset=kmnist", "dataset=fashion_mnist"}
    jobs = sweep_jobs("diffdefense_table1", CPU_SCALE)
    assert len(jobs) == 4 * 2 * 4 and all("dataset=fashion_mnist" in j for j in jobs)


def test_sweep_sizes():
    assert len(sweep_jobs("diffdefense_table1")) == 3 * 4 * 2 * 4  # defenses: none, diffdefense, diffdefense_authors, bit_depth
    assert len(sweep_jobs("diffdefense_table2")) == 2 * 8 * 4 * 2
    assert len(sweep_jobs("diffdefense_table3")) == 2 * 6
    tstar = sweep_jobs("diffdefense_tstar")
    assert len(tstar) == 2 * 5 * 15 and {j[-1] for j in tstar} == {f"defense.purifier.t_star={t}" for t in range(1, 16)}
    assert len(sweep_jobs("diffdefense_detection")) == 2 * 7 * 4
    assert len(sweep_jobs("disttrans_table1")) == 2 * 5 * 3
    assert len(sweep_jobs("disttrans_table3")) == 5 * 5 * 2
    assert len(sweep_jobs("disttrans_tstar")) == 2 * 6


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in DIFFDEFENSE if e not in ("diffdefense_tstar",)])
def test_every_paper_cell_is_reached_by_the_sweep(compose, experiment):
    """Every paper[row][column] is the label of some job (a typo in a key would silently drop a number)."""
    labels = set()
    for job in sweep_jobs(experiment):
        cfg = compose("evaluate", [f"experiment={experiment}", *job])
        labels.add((cfg.table.row, cfg.table.column))
    paper = OmegaConf.to_container(compose("evaluate", [f"experiment={experiment}"]).paper)
    cells = {(row, col) for row, cols in paper.items() for col in cols if col != "s_per_image"}
    assert cells and cells <= labels, sorted(cells - labels)


# -- paper numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "experiment, overrides, expected",
    [
        ("diffdefense_table1", ["dataset=mnist", "attack=pgd_restarts", "threat=oblivious", "defense=diffdefense"], 95.94),
        ("diffdefense_table1", ["dataset=mnist", "attack=pgd_restarts", "threat=transfer", "defense=none"], 51.28),
        ("diffdefense_table1", ["dataset=mnist", "attack=none", "threat=oblivious", "defense=none"], 99.14),
        ("diffdefense_table1", ["dataset=kmnist", "attack=fgsm", "threat=transfer", "defense=diffdefense"], 88.53),
        ("diffdefense_table1", ["dataset=kmnist", "attack=none", "threat=oblivious", "defense=diffdefense"], 95.18),
        ("diffdefense_table1", ["dataset=kmnist", "attack=deepfool", "threat=oblivious", "defense=none"], 2.93),
        ("diffdefense_table1", ["dataset=fashion_mnist", "attack=fgsm", "threat=oblivious", "defense=none"], None),
        ("diffdefense_table2", ["dataset=mnist", "attack=ead", "defense=none", "victim_training=fgsm_at"], 0.62),
        ("diffdefense_table2", ["dataset=mnist", "attack=square", "defense=diffdefense", "victim_training=standard"], 97.31),
        ("diffdefense_table2", ["dataset=mnist", "attack=autoattack_fast", "defense=none", "victim_training=standard"], 1.26),
        ("diffdefense_table2", ["dataset=mnist", "attack=autoattack", "defense=none", "victim_training=standard"], None),
        ("diffdefense_table2", ["dataset=mnist", "attack=fgsm", "defense=diffdefense", "victim_training=fgsm_at"], None),
        ("diffdefense_table3", ["dataset=mnist", "defense=table3/defense_gan_l100r1"], 50.11),
        ("diffdefense_table3", ["dataset=mnist", "defense=table3/diffdefense_l5r1"], 87.78),
        ("diffdefense_detection", ["dataset=mnist", "attack=deepfool"], 0.85),
    ],
)
def test_paper_cells(compose, experiment, overrides, expected):
    cfg = compose("evaluate", [f"experiment={experiment}", *overrides])
    assert _paper_number(cfg) == expected


def test_table2_victim_variant_and_threat(compose):
    cfg = compose("evaluate", ["experiment=diffdefense_table2", "dataset=mnist", "victim_training=fgsm_at"])
    assert cfg.victim.weights.endswith("mnist/classifier_a-fgsm_at.pt") and cfg.threat.name == "oblivious"
    assert cfg.table.column == "diffdefense fgsm_at"


def test_table3_rows_set_l_and_r_and_timing(compose):
    expected = {"diffdefense_l5r1": (5, 1), "diffdefense_l5r5": (5, 5), "defense_gan_l25r10": (25, 10),
                "defense_gan_l100r1": (100, 1), "defense_gan_l100r10": (100, 10), "defense_gan_l200r10": (200, 10)}
    assert {o.split("/")[1] for o in group_options("defense") if o.startswith("table3/")} == set(expected)
    for name, (L, R) in expected.items():
        cfg = compose("evaluate", ["experiment=diffdefense_table3", "dataset=mnist", f"defense=table3/{name}"])
        base = compose("evaluate", [f"defense={name.split('_l')[0]}"]).defense.purifier
        assert (cfg.defense.purifier.iterations, cfg.defense.purifier.restarts) == (L, R)
        assert cfg.defense.name == name.split("_l")[0] and cfg.defense.purifier._target_ == base._target_
        assert cfg.defense.purifier.lr == base.lr  # everything else inherited
        assert cfg.table.row == f"mnist {cfg.defense.name} L={L} R={R}" and cfg.eval.time_purifier is True
        assert cfg.paper[cfg.table.row].s_per_image > 0


def test_tstar_and_detection_settings(compose):
    cfg = compose("evaluate", ["experiment=diffdefense_tstar", "defense.purifier.t_star=7", "dataset.eval_split=val"])
    assert (cfg.defense.purifier.iterations, cfg.defense.purifier.restarts) == (4, 5)  # Fig. 3: L = 4, R = 5
    assert cfg.table.row.startswith("fashion_mnist val ") and cfg.table.column == "T*=7"
    assert cfg.threat.name == "oblivious"
    det = compose("evaluate", ["experiment=diffdefense_detection"])
    assert det.detection is True and det.threat.name == "oblivious" and det.defense.name == "diffdefense"
    assert compose("evaluate", []).detection is False and compose("evaluate", []).eval.time_purifier is False


def test_nested_defense_options_pass_the_command_line_check():
    check_overrides(["defense=table3/diffdefense_l5r1,table3/defense_gan_l25r10,none"])
    with pytest.raises(UserError, match="table3/diffdefense_l5r1"):
        check_overrides(["defense=table3/nope"])


# -- attack=none -----------------------------------------------------------------------------------
def test_attack_none_leaves_images_unchanged(compose, fmnist_test_batch):
    attack = instantiate(compose("evaluate", ["attack=none"]).attack)
    assert isinstance(attack, Attack) and attack.name == "none" and not attack.bounded and attack.kind == "noise"
    x, y = fmnist_test_batch
    x, y = x[:16], y[:16]
    x_adv = attack(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x, y)
    assert torch.equal(x_adv, x) and x_adv.data_ptr() != x.data_ptr()
    assert torch.equal(NoAttack()(x), x)


# -- detection ---------------------------------------------------------------------------------------
def test_roc_auc_known_cases():
    assert roc_auc([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])["auc"] == 1.0
    assert roc_auc([0.4, 0.5, 0.6], [0.1, 0.2, 0.3])["auc"] == 0.0
    assert roc_auc([0.5] * 4, [0.5] * 4)["auc"] == 0.5
    # Hand count, pairs (neg, pos) with pos > neg: 0.35 beats 0.1, 0.3; 0.2 beats 0.1; 0.7 beats all three → 6/9;
    # no ties.
    assert roc_auc([0.1, 0.3, 0.5], [0.2, 0.35, 0.7])["auc"] == pytest.approx(6 / 9)
    # One tie (0.3 vs 0.3) counts one half: pos 0.3 beats 0.1 (1) + ties 0.3 (0.5); 0.6 beats all (3); 0.05 none → 4.5/9.
    roc = roc_auc([0.1, 0.3, 0.5], [0.05, 0.3, 0.6])
    assert roc["auc"] == pytest.approx(4.5 / 9)
    assert roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0
    assert roc_auc([], [0.1])["auc"] is None


class StubReconstructor(Identity):
    """reconstruct(x).mse_mean = mean pixel value: a known score per image."""

    def __init__(self) -> None:
        super().__init__()
        self.t_star, self.iterations, self.restarts = 3, 2, 1
        self.calls = 0

    def reconstruct(self, x: torch.Tensor):
        self.calls += 1
        mse = x.flatten(1).mean(1)
        return SimpleNamespace(reconstruction=x, mse_best=mse, mse_mean=mse)


def _shift_attack(shift: float) -> Attack:
    return Attack("shift", lambda model: (lambda x, y: (x + shift).clamp(0, 1)), norm="none", eps=None, kind="noise")


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Image i has constant value v_i: its clean score is v_i.
    values = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    x = values.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    y = torch.zeros(6, dtype=torch.long)
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def test_run_detection_on_known_scores(tmp_path):
    victim = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    purifier = StubReconstructor()
    defended = Defended(purifier, victim, (1, 28, 28))
    # Shift by 0.5: adversarial scores 0.5…1.0 (clipped: 0.5, 0.6, 0.7, 0.8, 0.9, 1.0) vs clean 0.0…0.5.
    # Pairs (clean, adv) with adv > clean: all 36 but the tie (0.5, 0.5) → (35 + 0.5) / 36.
    result = run_detection(defended, _batches(), _shift_attack(0.5), Oblivious(), out_dir=tmp_path, extra={"attack": "shift"})
    assert result["auc"] == pytest.approx(35.5 / 36)
    assert result["n_clean"] == result["n_adv"] == 6 and result["t_star"] == 3 and result["violations"] == 0
    assert result["scores_clean"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert purifier.calls == 4  # clean + adversarial per batch
    on_disk = json.loads((tmp_path / "detection.json").read_text())
    assert on_disk["auc"] == result["auc"] and on_disk["attack"] == "shift"
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    same = run_detection(defended, _batches(), Attack("none", NoAttack, norm="none", kind="noise"), Oblivious())
    assert same["auc"] == 0.5  # identical clean and "attacked" scores: a coin flip


def test_run_detection_resumes_from_its_cache(tmp_path):
    defended = Defended(StubReconstructor(), nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28))
    cache = tmp_path / "det.jsonl"
    first = run_detection(defended, _batches(), _shift_attack(0.2), Oblivious(), cache_file=cache, max_batches=1)
    assert first["n_clean"] == 3 and len(cache.read_text().splitlines()) == 1
    second = run_detection(defended, _batches(), _shift_attack(0.2), Oblivious(), cache_file=cache)
    assert second["n_clean"] == 6 and len(cache.read_text().splitlines()) == 2
    assert defended.purifier.calls == 2 + 2  # batch 0 came from the cache


def test_run_detection_shares_clean_scores_between_attacks(tmp_path):
    purifier = StubReconstructor()
    defended = Defended(purifier, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28))
    clean = tmp_path / "clean.jsonl"
    first = run_detection(defended, _batches(), _shift_attack(0.2), Oblivious(), clean_cache_file=clean)
    assert purifier.calls == 4
    second = run_detection(defended, _batches(), _shift_attack(0.5), Oblivious(), clean_cache_file=clean)
    assert purifier.calls == 4 + 2  # only the attacked batches were reconstructed
    assert second["scores_clean"] == pytest.approx(first["scores_clean"])
    assert second["auc"] == pytest.approx(35.5 / 36)


def test_run_detection_needs_a_reconstruct_method():
    defended = Defended(Identity(), nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28))
    with pytest.raises(ValueError, match="reconstruct"):
        run_detection(defended, _batches(), _shift_attack(0.1), Oblivious())


# -- runner: detection mode and purifier timing, end to end on a tiny DiffDefense ----------------------
TINY = ["dataset.eval_subset=8", "eval.max_batches=1", "eval.n_draws=2", "eval.grid=false", "eval.resume=false",
        "defense.purifier.weights=null", "defense.purifier.t_star=1", "defense.purifier.iterations=1", "defense.purifier.restarts=1"]


def _save_random_victim(cfg) -> None:
    from models.weights import save_weights

    torch.manual_seed(0)
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)


def test_runner_detection_mode(compose):
    cfg = compose("evaluate", ["experiment=diffdefense_detection", "attack=fgsm", *TINY])
    _save_random_victim(cfg)
    result = run_evaluation(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"detection.json", "roc.png"} <= {p.name for p in out.iterdir()} and not (out / "results.json").exists()
    assert result["n_clean"] == result["n_adv"] == 8 and 0.0 <= result["auc"] <= 1.0
    assert result["attack"] == "fgsm" and result["t_star"] == 1 and result["table"]["row"] == "fashion_mnist fgsm"


def test_runner_times_the_purifier(compose):
    cfg = compose("evaluate", ["experiment=diffdefense_table3", "defense=table3/diffdefense_l5r1", "eval.time_purifier_bs1_images=2", *TINY])
    _save_random_victim(cfg)
    result = run_evaluation(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    for key in ("purify_s_per_image_batched", "purify_s_per_image_bs1"):
        assert on_disk[key] > 0 and on_disk[key] == result[key]
    assert on_disk["purify_bs1_images"] == 2 and on_disk["purify_batch_size"] == 8
    assert on_disk["paper_purify_s_per_image"] is None  # Fashion-MNIST row: no paper number

    from evaluation.tables import render

    assert "purify_s_per_image_bs1" in render(Path(cfg.paths.output_dir).parent)


# -- plots --------------------------------------------------------------------------------------------
def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_table1_cells_show_our_number_beside_the_papers(compose, tmp_path, grid_cells):
    """Synthetic results of real Table 1 jobs: each lands in its (row, column) cell as ``ours (paper)``."""
    from evaluation.tables import render

    jobs = [  # overrides, our robust accuracy, n_draws, worst case
        (["dataset=mnist", "attack=pgd_restarts", "threat=oblivious", "defense=none"], 3.5, 1, 3.5),
        (["dataset=mnist", "attack=fgsm", "threat=transfer", "defense=none"], 20.25, 1, 20.25),
        (["dataset=fashion_mnist", "attack=fgsm", "threat=oblivious", "defense=none"], 61.0, 1, 61.0),
        (["dataset=kmnist", "attack=pgd_restarts", "threat=oblivious", "defense=diffdefense"], 80.5, 10, 70.25),
    ]
    for i, (overrides, acc, draws, worst) in enumerate(jobs):
        cfg = compose("evaluate", ["experiment=diffdefense_table1", *overrides])
        labels = OmegaConf.to_container(cfg, resolve=True)
        _write(tmp_path / str(i) / "results.json", {
            "dataset": cfg.dataset.name, "defense": cfg.defense.name, "attack": cfg.attack.name, "threat": cfg.threat.name,
            "table": labels["table"], "paper": _paper_number(cfg), "robust_acc": acc, "robust_acc_worst": worst, "n_draws": draws,
        })  # fmt: skip
    cells = grid_cells(render(tmp_path))
    assert cells[("mnist pgd_restarts", "oblivious none")] == "3.50 (5.81)"
    assert cells[("mnist fgsm", "transfer none")] == "20.25 (15.81)"
    assert cells[("fashion_mnist fgsm", "oblivious none")] == "61.00"  # no paper number for Fashion-MNIST
    stochastic = cells[("kmnist pgd_restarts", "oblivious diffdefense")]  # mean first, the paper's number last
    assert stochastic.startswith("80.50") and stochastic.endswith(" (84.85)")
    assert len(cells) == 4  # nothing else filled in: every other (row, column) of the grid is empty


def test_tstar_plot_from_fake_multirun(tmp_path):
    from evaluation.plots import main

    for i, (attack, t) in enumerate(itertools.product(["fgsm", "pgd_restarts"], [1, 5, 10])):
        acc = 50.0 + 3 * t + (5 if attack == "fgsm" else 0)
        _write(tmp_path / str(i) / "results.json", {
            "dataset": "fashion_mnist", "attack": attack, "defense": "diffdefense", "robust_acc": acc,
            "config": {"defense": {"purifier": {"t_star": t}}, "dataset": {"eval_split": "val"}},
        })  # fmt: skip
    assert main(["tstar", str(tmp_path)]) == 0
    assert (tmp_path / "tstar.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "tstar.md").read_text()
    assert "fashion_mnist (val split)" in md and "| fgsm | 58.00 | 70.00 | 85.00 | 10 |" in md and "| mean |" in md
    assert "Chosen T* = **10**" in md  # 10 beats 5 by 15 points: cost does not win
    for f in tmp_path.glob("*/results.json"):  # the same curve on the test split chooses nothing
        f.write_text(f.read_text().replace('"val"', '"test"'))
    assert main(["tstar", str(tmp_path)]) == 0
    assert "Chosen" not in (tmp_path / "tstar.md").read_text() and "never used to choose" in (tmp_path / "tstar.md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_choose_t_star_prefers_the_cheaper_of_near_ties():
    from evaluation.plots import choose_t_star

    assert choose_t_star({1: 40.0, 5: 79.5, 15: 80.2}) == 5
    assert choose_t_star({1: 40.0, 5: 78.0, 15: 80.2}) == 15
    with pytest.raises(ValueError):
        choose_t_star({})


def test_report_collects_every_experiment_folder(tmp_path):
    from evaluation.report import main

    for i, t in enumerate([1, 5, 10]):
        _write(tmp_path / "tstar" / str(i) / "results.json", {
            "dataset": "fashion_mnist", "attack": "fgsm", "defense": "diffdefense", "robust_acc": 10.0 + t,
            "config": {"defense": {"purifier": {"t_star": t}}, "dataset": {"eval_split": "val"}},
        })  # fmt: skip
    _write(tmp_path / "detection" / "0" / "detection.json", {
        "dataset": "mnist", "attack": "deepfool", "t_star": 5, "auc": 0.9, "fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "n_clean": 4,
    })  # fmt: skip
    _write(tmp_path / "audit" / "audit.json", {"passed": True, "checks": [{"name": "eps", "passed": True, "detail": "ok", "values": {}}], "autoattack_warnings": []})
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path), "--out", str(tmp_path / "copy.md")]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md == (tmp_path / "copy.md").read_text()
    assert "# tstar" in md and "Chosen T* = **10**" in md and "| mnist | deepfool | 0.900 |" in md
    assert "Gradient-masking audit: PASS" in md and "# empty" not in md
    assert main([str(tmp_path / "empty")]) == 2


def test_detection_plot_from_fake_multirun(tmp_path):
    from evaluation.plots import main

    for i, (attack, t) in enumerate(itertools.product(["deepfool", "ead"], [5, 15])):
        _write(tmp_path / str(i) / "detection.json", {
            "dataset": "mnist", "attack": attack, "t_star": t, "auc": 0.8 + t / 100, "paper": 0.85 if attack == "deepfool" else None,
            "fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.7, 1.0], "n_clean": 10,
        })  # fmt: skip
    assert main(["detection", str(tmp_path)]) == 0
    assert (tmp_path / "detection.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "detection.md").read_text()
    assert "| mnist | deepfool | 0.850 (0.85) | 0.950 (0.85) |" in md and "| mnist | ead | 0.850 | 0.950 |" in md
    assert main(["detection", str(tmp_path / "empty")]) == 2
