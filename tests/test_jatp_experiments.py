"""JATP's experiment machinery (issue 14): the experiment configs and their sweeps compose, the adaptive threat
model's generic BPDA comparison (Fig. 4a) really replaces the purifier's gradient, and `make tables` reports a cell
run under several seeds as mean ± std (the paper's Table 1 format). Synthetic result files, tiny tensors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from torch import nn

from attacks.base import Attack
from defenses.base import Defended, Purifier
from evaluation.threats import WhiteBoxAdaptive

CONF = Path(__file__).resolve().parents[1] / "conf"
JATP_EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("jatp_*.yaml"))


def _jobs(experiment: str) -> list[list[str]]:
    raw = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    params = [f"{k}={v}" for k, v in OmegaConf.select(raw, "hydra.sweeper.params").items()]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]


def test_the_five_experiments_exist():
    assert JATP_EXPERIMENTS == ["jatp_ablation", "jatp_bpda", "jatp_poc", "jatp_table1", "jatp_table2"]


@pytest.mark.parametrize("experiment", JATP_EXPERIMENTS)
def test_every_sweep_job_composes_and_points_at_the_right_weights(compose, experiment):
    """A sample of each sweep's jobs compose and resolve; every trained pre-processor (but NRP, trained without a target)
    names the target it was trained against (TRADES, except in the proof of concept, where it is the evaluated one)."""
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n") and "python train.py" in text and "Full scale" in text
    jobs = _jobs(experiment)
    assert len(jobs) >= 4
    rows = set()
    for job in random.Random(0).sample(jobs, min(8, len(jobs))):
        cfg = compose("evaluate", [f"experiment={experiment}", "dataset=fashion_mnist_rgb32", *job])
        plain = OmegaConf.to_container(cfg, resolve=True)
        purifier = plain["defense"]["purifier"]
        if "weights" in purifier and "feature_net" not in purifier:  # NRP is self-supervised: no target in its name
            target = cfg.victim_training if experiment == "jatp_poc" else "trades"
            assert purifier["weights"].endswith(f"-resnet18-{target}.pt") or f"-resnet18-{target}-" in purifier["weights"]
            assert "/fashion_mnist_rgb32/" in purifier["weights"]
        rows.add((plain["table"]["row"], plain["table"]["column"]))
    assert len(rows) == min(8, len(jobs))  # no two jobs share a table cell


def test_table1_paper_cells_sit_where_its_rows_and_columns_are(compose):
    from evaluation.runner import _paper_number

    cfg = compose("evaluate", ["experiment=jatp_table1", "defense=jatp", "attack=autoattack"])
    assert _paper_number(cfg) == pytest.approx(43.25)
    cfg = compose("evaluate", ["experiment=jatp_table1", "defense=ape_gan", "attack=fwa"])
    assert cfg.defense.name == "ape_gan-oblivious" and _paper_number(cfg) == pytest.approx(23.71)
    cfg = compose("evaluate", ["experiment=jatp_table2", "victim_training=mart", "defense=jatp_prime", "attack=pgd_jatp"])
    assert cfg.defense.name == "jatp_prime" and _paper_number(cfg) == pytest.approx(48.29)


class _Squash(Purifier):
    """A differentiable purifier with a known gradient: x ↦ x² (so its exact gradient is 2x, BPDA's is 1)."""

    stochastic = False
    differentiable = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def test_threat_gradient_bpda_replaces_a_differentiable_purifiers_gradient():
    torch.manual_seed(0)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    defended = Defended(_Squash(), victim)
    attack = Attack(builder=lambda model: None, name="probe", norm="Linf", eps=0.1)
    x = torch.rand(3, 1, 2, 2, requires_grad=True)
    grads = {}
    for gradient in ("exact", "bpda"):
        model = WhiteBoxAdaptive(eot_samples=1, gradient=gradient).attacked_model(defended, attack)
        (g,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
        grads[gradient] = g
    w = victim[1].weight[0].view(1, 1, 2, 2)
    assert torch.allclose(grads["exact"], 2 * x.detach() * w, atol=1e-6)
    assert torch.allclose(grads["bpda"], w.expand_as(x), atol=1e-6)  # the identity in place of d(x²)/dx
    with pytest.raises(ValueError, match="valid: exact, surrogate, bpda"):
        WhiteBoxAdaptive(gradient="straight_through")


def test_tables_report_a_cell_run_under_several_seeds_as_mean_and_std(compose, tmp_path, grid_cells):
    from evaluation.runner import _paper_number
    from evaluation.tables import render

    for i, (seed, acc) in enumerate([(0, 44.0), (1, 46.0), (2, 45.0)]):
        cfg = compose("evaluate", ["experiment=jatp_table1", "defense=jatp", "attack=pgd_jatp", f"seed={seed}"])
        result = {"dataset": cfg.dataset.name, "victim": cfg.victim.name, "victim_training": cfg.victim_training,
                  "defense": cfg.defense.name, "attack": cfg.attack.name, "threat": cfg.threat.name, "seed": seed,
                  "table": OmegaConf.to_container(cfg.table, resolve=True), "paper": _paper_number(cfg),
                  "robust_acc": acc, "robust_acc_worst": acc, "n_draws": 1}
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(result))
    cells = grid_cells(render(tmp_path))
    assert cells[("jatp", "pgd_jatp")] == "45.00 ± 1.00 (3 seeds) (46.14)"
