"""The response-curve diagnostic (issue 11): it tells an identity from a binariser and finds the binariser's threshold."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defenses.base import Identity, Purifier
from defenses.bit_depth import BitDepthReduction
from evaluation.response import implied_threshold, response_curve, response_diagnostic, whitened_fraction


class Threshold(Purifier):
    """A binariser at an arbitrary threshold: the hypothesis of issue 11 about DiffDefense's reconstruction."""

    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x >= self.at).to(x.dtype)


@pytest.fixture
def digits() -> torch.Tensor:
    """MNIST-like images: black background, a white square 'stroke'."""
    x = torch.zeros(4, 1, 12, 12)
    x[:, :, 3:9, 4:8] = 1.0
    return x


def test_identity_is_the_diagonal_and_thresholds_at_one_half(digits):
    curves = response_curve(Identity(), digits)
    assert curves["background"] == pytest.approx(curves["levels"]) and curves["stroke"] == pytest.approx(curves["levels"])
    assert implied_threshold(curves["levels"], curves["background"]) == pytest.approx(0.5)


@pytest.mark.parametrize("at", [0.2, 0.35, 0.7])
def test_a_binariser_is_a_step_at_its_threshold(digits, at):
    curves = response_curve(Threshold(at), digits)
    assert set(curves["background"]) == {0.0, 1.0}
    assert abs(implied_threshold(curves["levels"], curves["background"]) - at) <= 0.05  # the level grid is 0.05


def test_bit_depth_one_bit_is_binarisation_at_one_half(digits):
    curves = response_curve(BitDepthReduction(1), digits)
    assert abs(implied_threshold(curves["levels"], curves["background"]) - 0.5) <= 0.05


def test_never_white_has_no_threshold():
    assert implied_threshold([0.0, 0.5, 1.0], [0.0, 0.1, 0.2]) is None


def test_whitened_fraction_separates_erasing_from_keeping_a_perturbation(digits):
    x_adv = torch.where(digits <= 0.1, torch.full_like(digits, 0.3), digits)  # every background pixel pushed to ε = 0.3
    keeps = whitened_fraction(Threshold(0.25), digits, x_adv)  # threshold below ε: the perturbation turns white
    erases = whitened_fraction(Threshold(0.5), digits, x_adv)  # above ε: erased
    assert keeps["purified_adversarial"] == 1.0 and erases["purified_adversarial"] == 0.0
    assert keeps["purified_clean"] == erases["purified_clean"] == 0.0 and keeps["adversarial_input"] == 0.0


def test_diagnostic_writes_a_png_and_rejects_bad_input(digits, tmp_path):
    out = response_diagnostic(Threshold(0.3), digits, None, out_png=tmp_path / "r.png", label="t")
    assert (tmp_path / "r.png").stat().st_size > 0 and abs(out["response_threshold"] - 0.3) <= 0.05
    with pytest.raises(ValueError, match=r"\[0, 1\] images"):
        response_curve(Identity(), digits * 2)


def test_runner_records_the_response_of_a_configured_defense(compose, trained_victim):
    """evaluate.py … eval.response_curve=true: response_* in results.json and response.png, attack crafted by the threat."""
    from evaluation.runner import run_evaluation
    from models.weights import save_weights

    cfg = compose("evaluate", ["defense=bit_depth", "attack=fgsm", "dataset.eval_subset=16", "dataset.datamodule.eval_batch_size=16",
                               "eval.n_draws=1", "eval.grid=false", "eval.response_curve=true"])
    save_weights(trained_victim, cfg.victim.weights)
    run_evaluation(cfg)
    out = Path(cfg.paths.output_dir)
    result = json.loads((out / "results.json").read_text())
    assert abs(result["response_threshold"] - 0.5) <= 0.05 and (out / "response.png").is_file()
    white = result["response_whitened"]
    assert white["purified_clean"] <= white["purified_adversarial"] and white["background_pixels"] > 0


def test_report_prints_the_response_rows():
    from evaluation.response import response_markdown

    rows = [{"defense": "bit_depth", "victim": "classifier_a", "attack": "fgsm", "response_curve": {}, "response_threshold": 0.475,
             "response_whitened": {"adversarial_input": 0.0, "purified_adversarial": 0.0, "purified_clean": 0.0}}, {"defense": "none"}]
    md = response_markdown(rows)
    assert "| bit_depth | classifier_a | fgsm | 0.47 | 0.0 % | 0.0 % | 0.0 % |" in md and "none" not in md.split("|---|")[-1]
    assert response_markdown([{"defense": "none"}]) == ""
