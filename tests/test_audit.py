"""The gradient-masking audit: it fails every planted masked defense and passes the honest ones.

Planted defenses (each would PASS the old audit, which had one-sided (b), chance + 10 points at ε = 1,
gradient consistency between two EOT averages, no finite-difference or determinism check, and
pyautoattack's warnings printed but not counted):
- zero gradients (1-bit quantisation attacked without BPDA),
- vanishing gradients (a steep sigmoid declared differentiable),
- shattered gradients (x + 0.01·sin(3000x), declared differentiable),
- randomness declared deterministic (Gaussian noise with stochastic=False),
- an attack that has not converged (a configured PGD whose steps × α is 0.2 ε),
- robustness that survives the defense's own removal (a masked quantiser whose weakened() still quantises).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torchattacks

from attacks.base import Attack
from defenses.base import Defended, Identity, Purifier
from defenses.bit_depth import BitDepthReduction
from defenses.gaussian_noise import GaussianNoise
from evaluation.audit import format_report, paired_tol, run_audit, zero_rate_bound
from evaluation.threats import WhiteBoxAdaptive

FAST = dict(eps=0.2, steps=8, square_queries=100)


@pytest.fixture(scope="module")
def xy(fmnist_test_batch):
    x, y = fmnist_test_batch
    return x[:48], y[:48]


def _status(report) -> dict[str, str]:
    """Check name → status; prints the report (``pytest tests/test_audit.py -s`` shows every audit in full)."""
    print(f"\n{report.get('label', '')}\n{format_report(report)}")
    return {c["name"]: c["status"] for c in report["checks"]}


class SteepSigmoid(Purifier):
    """Vanishing gradients: a near-step function whose fp32 gradient underflows away from 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(400 * (x - 0.5))


class Shattered(Purifier):
    """Shattered gradients: almost the identity in value, a gradient of ±30 that flips every 0.001."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.01 * torch.sin(3000 * x)).clamp(0, 1)


class HiddenNoise(GaussianNoise):
    """Randomness declared deterministic: no EOT, one-draw scoring."""

    stochastic = False


def test_tolerances_are_binomial_intervals():
    a = torch.zeros(128)
    b = a.clone()
    b[:16] = 1.0  # 16 discordant images
    assert paired_tol(a, b) == pytest.approx(1.96 * 100 * 16**0.5 / 128, rel=1e-3)
    assert paired_tol(a, a) == pytest.approx(100 / 128)  # never below one image
    assert zero_rate_bound(128) == pytest.approx(100 * 2.9957 / 128, rel=1e-3)  # rule of three


def test_audit_passes_an_honest_model(trained_victim, xy, caplog):
    with caplog.at_level("INFO", logger="evaluation.audit"):
        report = run_audit(Defended(Identity(), trained_victim), *xy, **FAST)
    # every check is logged as it is decided (a long audit shows its progress before the verdict)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"audit {c['name']}" for c in report["checks"]]
    assert report["passed"], format_report(report)
    status = _status(report)
    # a comparison of a model with itself is not applicable, never PASS
    assert status["c_full_gradient_beats_bpda_identity"] == "n/a"
    assert status["c_full_gradient_beats_transfer"] == "n/a"
    assert status["d_gradient_matches_finite_differences"] == "pass"
    assert status["i_weakened_defense_is_weaker"] == "n/a"
    assert "[N/A]" in format_report(report)


def test_audit_passes_gaussian_noise(trained_victim, xy):
    report = run_audit(Defended(GaussianNoise(0.1), trained_victim), *xy, **FAST, eot_samples=4, n_draws=4)
    assert report["passed"], format_report(report)
    status = _status(report)
    assert status["d_eot_samples_suffice"] == "pass" and status["e_frozen_randomness_not_stronger"] == "pass"
    assert status["h_autoattack_checks"] == "pass" and report["autoattack_warnings"]  # the randomness warning, explained
    assert status["i_weakened_defense_is_weaker"] == "pass"  # σ → 0 falls to the undefended accuracy


def test_audit_passes_bit_depth_with_bpda_and_calls_the_self_comparison_not_applicable(trained_victim, xy):
    report = run_audit(Defended(BitDepthReduction(1), trained_victim), *xy, **FAST)
    assert report["passed"], format_report(report)
    status = _status(report)
    assert status["c_full_gradient_beats_bpda_identity"] == "n/a"  # the adaptive attack *is* identity BPDA
    assert status["d_gradient_matches_finite_differences"] == "n/a"


def test_audit_fails_zero_gradients(trained_victim, xy):
    report = run_audit(Defended(BitDepthReduction(1), trained_victim), *xy, **FAST, threat=WhiteBoxAdaptive(bpda=False))
    status = _status(report)
    assert not report["passed"] and status["d_gradients_finite_nonzero"] == "fail"
    assert status["h_autoattack_checks"] == "fail"  # pyautoattack's zero-gradient warning now counts
    assert "FAIL" in format_report(report)


def test_audit_fails_vanishing_gradients(trained_victim, xy):
    report = run_audit(Defended(SteepSigmoid(), trained_victim), *xy, **FAST)
    status = _status(report)
    assert not report["passed"], format_report(report)
    # the unbounded attack cannot get through, and identity BPDA (the gradient a stand-in would give) does better
    assert status["a_unbounded_attack_reaches_zero"] == "fail"


def test_audit_fails_shattered_gradients(trained_victim, xy):
    report = run_audit(Defended(Shattered(), trained_victim), *xy, **FAST)
    status = _status(report)
    assert not report["passed"]
    assert status["d_gradient_matches_finite_differences"] == "fail", format_report(report)


def test_audit_fails_randomness_declared_deterministic(trained_victim, xy):
    report = run_audit(Defended(HiddenNoise(0.1), trained_victim), *xy, **FAST)
    status = _status(report)
    assert not report["passed"] and status["g_declared_randomness_holds"] == "fail"
    assert status["h_autoattack_checks"] == "fail"  # "randomized defense" is explained only for declared randomness


def test_audit_fails_an_attack_that_has_not_converged(trained_victim, fmnist_test_batch):
    """200 images: the paired interval then resolves the 9-point gain of doubling a 4 × 0.005 PGD."""
    weak = Attack("weak_pgd", functools.partial(torchattacks.PGD, eps=0.2, alpha=0.005, steps=4), "Linf", 0.2)
    report = run_audit(Defended(Identity(), trained_victim), *fmnist_test_batch, **FAST, attack=weak)
    _status(report)
    check = next(c for c in report["checks"] if c["name"] == "b_configured_attack_converged")
    assert check["status"] == "fail", format_report(report)
    assert check["values"]["robust_2x_budget"] < check["values"]["robust"] - check["values"]["tol_2x_budget"]



class MaskedEvenWhenWeakened(BitDepthReduction):
    """Planted: a 1-bit quantiser declared differentiable (zero gradients) whose weakened() keeps quantising —
    its robustness survives the removal of its 'purification' strength."""

    differentiable = True

    def weakened(self):
        return self


def test_weakened_check_fails_a_defense_whose_robustness_survives_its_removal(trained_victim, xy):
    status = _status(run_audit(Defended(MaskedEvenWhenWeakened(bits=1), trained_victim), *xy, **FAST))
    assert status["i_weakened_defense_is_weaker"] == "fail"


class VotingNoise(GaussianNoise):
    """DensePure's shape on a cheap purifier: Gaussian noise, classified by a majority vote of 3 passes."""

    votes = 3


class VotingShattered(Shattered):
    """Planted: a shattered purifier behind a majority vote (the soft-vote check must not hide it)."""

    stochastic, votes = True, 3


@pytest.mark.parametrize("purifier, ok", [(VotingNoise(0.05), True), (VotingShattered(), False)], ids=["noise", "shattered"])
def test_finite_differences_check_a_vote_against_the_soft_vote(trained_victim, xy, purifier, ok):
    """The hard vote is piecewise constant; its straight-through gradient is the soft vote's, and finite
    differences of the soft vote through the same passes must match it — unless the passes themselves are masked."""
    from evaluation.audit import _gradient_checks, _WarningCollector

    checks = _gradient_checks(Defended(purifier, trained_victim), WhiteBoxAdaptive(2), *xy, 0, 1e-2, 0.1, _WarningCollector())
    fd = next(c for c in checks if c.name == "d_gradient_matches_finite_differences")
    assert (fd.status == "pass") is ok, fd.detail
    assert "soft vote" in fd.detail and fd.values["against"].startswith("soft vote")


class _Grey(Purifier):
    """A lying surrogate: a constant grey image (zero gradient, one label for everything)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 0.5) + 0 * x


class _FakeGradient(Purifier):
    """A lying surrogate: the real shattered values, the identity's gradient (value and gradient disagree)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (Shattered()(x) - x).detach()


class ShatteredWithSurrogate(Shattered):
    """The guided-chain situation in miniature: a rough purifier that offers a smooth surrogate."""

    def __init__(self, surrogate: Purifier) -> None:
        super().__init__()
        self.surrogate = surrogate

    def smooth_surrogate(self) -> Purifier:
        return self.surrogate

    def weakened(self) -> Purifier:
        return Identity()  # check (i) then attacks models without a surrogate: they take the exact gradient


def test_audit_along_an_honest_smooth_surrogate_passes(trained_victim, xy):
    from evaluation.audit import _gradient_checks, _WarningCollector

    defended = Defended(ShatteredWithSurrogate(Identity()), trained_victim)  # the identity it wiggles around
    exact = _gradient_checks(defended, WhiteBoxAdaptive(), *xy, 0, 1e-2, 0.1, _WarningCollector())
    fd = next(c for c in exact if c.name == "d_gradient_matches_finite_differences")
    assert fd.status == "fail" and "gradient=surrogate" in fd.detail  # the rough function's own gradient, and the hint
    report = run_audit(defended, *xy, **FAST, threat=WhiteBoxAdaptive(gradient="surrogate"))
    status = _status(report)
    assert report["passed"], format_report(report)
    assert status["d_gradient_matches_finite_differences"] == "pass"
    assert status["j_surrogate_matches_defense"] == "pass"
    assert status["c_full_gradient_beats_exact_gradient"] == "pass"
    assert status["i_weakened_defense_is_weaker"] == "pass"
    assert "surrogate-gradient PGD" in format_report(report)


def test_the_fidelity_check_fails_a_surrogate_of_another_function(trained_victim, xy):
    from evaluation.audit import _surrogate_fidelity_check

    x, y = xy
    for surrogate, ok in ((_Grey(), False), (Identity(), True)):
        check = _surrogate_fidelity_check(Defended(ShatteredWithSurrogate(surrogate), trained_victim), x, x.flip(0), y, 0, 0.95)
        assert (check.status == "pass") is ok, check.detail


def test_finite_differences_fail_a_surrogate_whose_gradient_is_faked(trained_victim, xy):
    from evaluation.audit import _gradient_checks, _WarningCollector

    defended = Defended(ShatteredWithSurrogate(_FakeGradient()), trained_victim)
    checks = _gradient_checks(defended, WhiteBoxAdaptive(gradient="surrogate"), *xy, 0, 1e-2, 0.1, _WarningCollector())
    fd = next(c for c in checks if c.name == "d_gradient_matches_finite_differences")
    assert fd.status == "fail" and fd.values["against"] == "the smooth surrogate", fd.detail


def test_finite_differences_are_not_applicable_when_the_audited_path_is_bpda(trained_victim, xy):
    """``threat.model.gradient=bpda`` audits the BPDA comparison row: its backward is an approximation by design."""
    from evaluation.audit import _gradient_checks, _WarningCollector

    checks = _gradient_checks(Defended(Shattered(), trained_victim), WhiteBoxAdaptive(gradient="bpda"), *xy, 0, 1e-2, 0.1,
                              _WarningCollector())
    assert next(c for c in checks if c.name == "d_gradient_matches_finite_differences").status == "n/a"
