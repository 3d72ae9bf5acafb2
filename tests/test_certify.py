"""Randomized-smoothing certification (evaluation/certify.py): Cohen et al.'s CERTIFY / PREDICT on base
classifiers whose smoothed behaviour is known in closed form, the Clopper–Pearson bound, the certified-accuracy
curve, the driver's files and resume, and the runner path ``certify=true`` on the real config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import binom, norm
from torch import nn

from evaluation.certify import (
    ABSTAIN,
    Smooth,
    certified_accuracy,
    lower_confidence_bound,
    max_certifiable_radius,
    run_certification,
)

SHAPE = (1, 4, 4)  # one tiny grey image: every base classifier here is cheap


class Constant(nn.Module):
    """Always class ``c`` of ``k``."""

    def __init__(self, c: int = 2, k: int = 10):
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.k)
        logits[:, self.c] = 1.0
        return logits


class RandomClass(nn.Module):
    """A uniformly random class of ``k`` on every call (ignores its input): p_A = 1/k."""

    def __init__(self, k: int = 10):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.rand(x.shape[0], self.k)


class Linear2(nn.Module):
    """Class 1 where w·x − b > 0, else class 0 (the half-space classifier of Cohen et al.'s tightness example)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w.flatten(), float(b)

    def forward(self, x):
        s = x.flatten(1) @ self.w - self.b
        return torch.stack([-s, s], dim=1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- (3) Clopper–Pearson -----------------------------------------------------------------------------
def test_clopper_pearson_matches_a_hand_computation():
    # k = 7 of n = 10 at alpha = 0.05: the bound is the p where P(Bin(10, p) >= 7) = 0.05 (its defining equation),
    # solved here by bisection on the binomial tail written out with math.comb (no scipy).
    def tail(p: float, k: int = 7, n: int = 10) -> float:
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))

    lo, hi = 0.0, 1.0
    for _ in range(60):  # the tail grows with p
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < 0.05 else (lo, mid)
    assert lower_confidence_bound(7, 10, 0.05) == pytest.approx(lo, abs=1e-12)
    assert lo == pytest.approx(0.393376, abs=1e-6)
    assert binom.sf(6, 10, lo) == pytest.approx(0.05, abs=1e-12)
    # k = n: P(Bin(n, p) >= n) = p^n = alpha ⇒ p = alpha^(1/n); k = 1 of 1: alpha; k = 0: 0.
    assert lower_confidence_bound(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10), rel=1e-12)
    assert lower_confidence_bound(1, 1, 0.001) == pytest.approx(0.001, rel=1e-12)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    with pytest.raises(ValueError):
        lower_confidence_bound(11, 10, 0.05)


# -- (1), (2) CERTIFY ---------------------------------------------------------------------------------
def test_certify_abstains_when_p_a_is_low():
    torch.manual_seed(0)
    smooth = Smooth(RandomClass(10), 10, sigma=0.25)
    prediction, radius = smooth.certify(torch.rand(SHAPE), n0=50, n=500, alpha=0.001, batch_size=250, generator=_gen())
    assert (prediction, radius) == (ABSTAIN, 0.0)
    cert = smooth.certify_details(torch.rand(SHAPE), n0=50, n=500, alpha=0.001, batch_size=250)
    assert cert.p_lower < 0.2 and cert.prediction == ABSTAIN  # p_A = 0.1


def test_constant_classifier_gets_the_largest_radius_n_samples_allow():
    sigma, n, alpha = 0.5, 1000, 0.001
    smooth = Smooth(Constant(2), None, sigma)  # num_classes from the logits
    prediction, radius = smooth.certify(torch.rand(SHAPE), n0=10, n=n, alpha=alpha, batch_size=300, generator=_gen())
    assert prediction == 2
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-12)
    assert radius == pytest.approx(max_certifiable_radius(sigma, n, alpha), rel=1e-12)


# -- (4) the half-space classifier: exact smoothed radius known ---------------------------------------
def test_linear_classifier_radius_is_sound_and_close_to_the_exact_one():
    """For f(x) = [w·x − b > 0], f(x + δ) is class 1 w.p. Φ((w·x − b)/(σ‖w‖)), so the exact radius of g is
    σ·Φ⁻¹(p_A) = |w·x − b|/‖w‖: the distance to the decision boundary (Cohen et al.: the bound is tight here)."""
    torch.manual_seed(0)
    d = math.prod(SHAPE)
    w = torch.randn(d)
    x = torch.rand(SHAPE)
    sigma, distance = 0.25, 0.3
    b = float(x.flatten() @ w) - distance * float(w.norm())  # x on the class-1 side, at ℓ2 distance 0.3
    smooth = Smooth(Linear2(w, b), 2, sigma)
    assert norm.cdf(distance / sigma) == pytest.approx(0.8849, abs=1e-4)  # p_A
    prediction, radius = smooth.certify(x, n0=100, n=10000, alpha=0.001, batch_size=5000, generator=_gen(1))
    assert prediction == 1
    assert radius <= distance and radius >= 0.85 * distance, radius
    # the other side of the boundary: class 0, same distance
    smooth_flip = Smooth(Linear2(-w, -b), 2, sigma)
    prediction, radius = smooth_flip.certify(x, n0=100, n=10000, alpha=0.001, batch_size=5000, generator=_gen(2))
    assert prediction == 0 and 0.85 * distance <= radius <= distance


def test_same_generator_seed_same_certificate_and_no_global_noise():
    smooth = Smooth(Linear2(torch.ones(16), 8.0), 2, 0.25)
    x = torch.full(SHAPE, 0.52)
    a = smooth.certify_details(x, 10, 400, 0.001, 128, _gen(3))
    torch.manual_seed(123)  # the global RNG does not enter the noise when a generator is given
    b = smooth.certify_details(x, 10, 400, 0.001, 128, _gen(3))
    assert a == b


# -- (6) PREDICT --------------------------------------------------------------------------------------
def test_predict_abstains_on_a_coin_flip_and_answers_a_constant():
    torch.manual_seed(0)
    assert Smooth(RandomClass(2), 2, 0.25).predict(torch.rand(SHAPE), n=1000, alpha=0.001, batch_size=500) == ABSTAIN
    assert Smooth(Constant(3, 5), 5, 0.25).predict(torch.rand(SHAPE), n=100, alpha=0.001, batch_size=64, generator=_gen()) == 3


# -- (5) certified accuracy ---------------------------------------------------------------------------
def test_certified_accuracy_counts_correct_and_radius_at_least_r():
    radii = [0.0, 0.3, 0.6, 1.2, 0.0]
    predictions = [1, 2, 3, 4, ABSTAIN]
    labels = [1, 2, 0, 4, 5]  # image 2 is wrong (however large its radius), image 4 abstains
    assert certified_accuracy(radii, predictions, labels, [0.0, 0.25, 0.3, 0.5, 1.0, 2.0]) == [0.6, 0.4, 0.4, 0.2, 0.2, 0.0]
    with pytest.raises(ValueError):
        certified_accuracy([0.1], [1, 2], [1, 2], [0.0])


# -- driver -------------------------------------------------------------------------------------------
def _batches():
    """Five images with mean pixel 0.8 or 0.2 (ℓ2 distance 1.2 from the toy boundary), the fourth mislabelled."""
    torch.manual_seed(0)
    level = torch.tensor([0.8, 0.2, 0.8, 0.8, 0.2]).view(5, 1, 1, 1)
    x = level + 0.01 * torch.randn(5, *SHAPE)
    y = torch.tensor([1, 0, 1, 0, 0])
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def test_run_certification_writes_files_is_deterministic_and_resumes(tmp_path):
    model = Linear2(torch.ones(16), 8.0)  # class 1 where the mean pixel > 0.5
    settings = dict(sigma=0.25, n0=10, n=200, alpha=0.001, batch_size=64, n_images=4, radius_grid=[0.0, 0.1, 0.5], seed=7)
    cache = tmp_path / "cache.jsonl"
    result = run_certification(model, _batches(), **settings, out_dir=tmp_path / "out", extra={"defense": "toy"}, num_classes=2, cache_file=cache)
    on_disk = json.loads((tmp_path / "out" / "certify.json").read_text())
    assert (tmp_path / "out" / "certify.png").stat().st_size > 0
    assert on_disk["n_images"] == 4 and len(on_disk["images"]) == 4 and on_disk["defense"] == "toy"
    assert on_disk["certified_accuracy"] == result["certified_accuracy"] and len(result["certified_accuracy"]) == 3
    assert [r["label"] for r in on_disk["images"]] == [1, 0, 1, 0]
    # every sample agrees on each image: all radii are the cap σΦ⁻¹(α^(1/n)) ≈ 0.455; three of four are correct
    cap = max_certifiable_radius(0.25, 200, 0.001)
    assert [r["radius"] for r in on_disk["images"]] == pytest.approx([cap] * 4) and 0.45 < cap < 0.46
    assert result["certified_accuracy"] == [0.75, 0.75, 0.0] and result["accuracy"] == 0.75 and result["abstain_rate"] == 0.0
    for r in on_disk["images"]:
        assert set(r) >= {"index", "label", "prediction", "radius", "correct", "seconds", "p_lower"}
        assert r["correct"] == (r["prediction"] == r["label"])
    again = run_certification(model, _batches(), **settings, num_classes=2)  # no cache: recomputed, same numbers
    assert [r["radius"] for r in again["images"]] == [r["radius"] for r in result["images"]]
    # resume: every image from the cache, one more image computed (same per-image seeds: the cache is a prefix)
    more = run_certification(model, _batches(), **{**settings, "n_images": 5}, num_classes=2, cache_file=cache)
    assert [r["seconds"] for r in more["images"][:4]] == [r["seconds"] for r in result["images"]]
    assert more["n_images"] == 5 and len(cache.read_text().splitlines()) == 5


# -- (7) runner: certify=true on the real config ------------------------------------------------------
def test_experiment_sweeps_none_and_diffpure():
    raw = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "experiment" / "disttrans_certify.yaml")
    assert str(raw.hydra.sweeper.params.defense) == "none,diffpure"
    assert raw.certify is True and raw.paper is None


def test_runner_certify_mode(compose):
    from hydra.utils import instantiate

    from evaluation.runner import cache_key, run_evaluation
    from models.weights import save_weights

    tiny = ["certify_settings.n0=4", "certify_settings.n=16", "certify_settings.batch_size=16", "certify_settings.n_images=3",
            "dataset.eval_subset=8"]
    cfg = compose("evaluate", ["experiment=disttrans_certify", "defense=none", *tiny])
    assert cfg.certify is True and cfg.victim.name == "resnet18" and cfg.dataset.name == "fashion_mnist_rgb32"
    torch.manual_seed(0)
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    result = run_evaluation(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"certify.json", "certify.png"} <= {p.name for p in out.iterdir()} and not (out / "results.json").exists()
    on_disk = json.loads((out / "certify.json").read_text())
    assert on_disk["n_images"] == len(on_disk["images"]) == 3 and on_disk["n"] == 16 and on_disk["sigma"] == 0.25
    assert on_disk["table"]["row"] == "fashion_mnist_rgb32 none" and on_disk["paper"] is None
    assert result["certified_accuracy"] == on_disk["certified_accuracy"] and Path(result["cache_file"]).is_file()
    # the certify settings are not part of the attack runs' cache key
    assert cache_key(cfg) == cache_key(compose("evaluate", ["experiment=disttrans_certify", "defense=none", "dataset.eval_subset=8"]))
