"""The gradient-masking audit flags a planted masked defense and passes an honest model."""
from __future__ import annotations

import pytest

from defenses.base import Defended, Identity
from defenses.bit_depth import BitDepthReduction
from defenses.gaussian_noise import GaussianNoise
from evaluation.audit import format_report, run_audit
from evaluation.threats import WhiteBoxAdaptive


@pytest.fixture(scope="module")
def xy(fmnist_test_batch):
    x, y = fmnist_test_batch
    return x[:48], y[:48]


def _checks(report):
    return {c["name"]: c["passed"] for c in report["checks"]}


def test_audit_passes_an_honest_model(trained_victim, xy):
    report = run_audit(Defended(Identity(), trained_victim), *xy, eps=0.2, steps=8, square_queries=100)
    assert report["passed"], format_report(report)


def test_audit_flags_quantisation_attacked_without_bpda(trained_victim, xy):
    """1-bit quantisation attacked naively: zero gradients, and BPDA beats the 'full' gradient."""
    masked = Defended(BitDepthReduction(1), trained_victim)
    report = run_audit(masked, *xy, eps=0.2, steps=8, square_queries=100, threat=WhiteBoxAdaptive(bpda=False))
    checks = _checks(report)
    assert not report["passed"]
    assert not checks["d_gradients_finite_nonzero_consistent"]
    assert not checks["c_full_gradient_strongest"]
    assert any("zero gradient" in w for w in report["autoattack_warnings"])  # pyautoattack's own check agrees
    assert "FAIL" in format_report(report)


def test_audit_of_a_stochastic_defense_reports_consistency_and_frozen_seed(trained_victim, xy):
    noisy = Defended(GaussianNoise(0.1), trained_victim)
    report = run_audit(noisy, *xy, eps=0.2, steps=5, eot_samples=4, n_draws=4, square_queries=50)
    values = {c["name"]: c["values"] for c in report["checks"]}
    assert "cosine_between_draws" in values["d_gradients_finite_nonzero_consistent"]
    assert "frozen" in values["e_frozen_randomness_not_stronger"]
    assert any("randomized" in w for w in report["autoattack_warnings"])
