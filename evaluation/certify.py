"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter 2019): ``evaluate.py certify=true``.

The smoothed classifier of a base classifier f is

    g(x) = argmax_c  P_{δ ~ N(0, σ² I)} [ f(x + δ) = c ],

and if the top class has probability p_A ≥ ½ then g is constant on the ℓ2 ball of radius σ·Φ⁻¹(p_A) around x
(Cohen et al., Theorem 1). p_A cannot be computed, so CERTIFY (their Algorithm, ``Smooth.certify``) guesses the top
class from n0 noisy samples, bounds p_A from below with n *fresh* samples (one-sided Clopper–Pearson at level
1 − α) and abstains when that bound is below ½. With probability ≥ 1 − α over the samples a returned
(class, radius) is right about g. The reference implementation is locuslab/smoothing ``code/core.py``; this module
follows it step for step, with a seeded noise generator and without statsmodels.

Here the base classifier is ``Defended(purifier, victim)``, i.e. victim∘purifier. A stochastic purifier is fine:
each sample then draws fresh purifier randomness ω too, so p_c(x) = P_{δ,ω}[f_ω(x + δ) = c] = E_δ[h_c(x + δ)] with
h_c(z) = P_ω[f_ω(z) = c] ∈ [0, 1], and the same radius holds for such soft base classifiers (Salman et al. 2019,
Lemma 2: Φ⁻¹ of a Gaussian-smoothed [0, 1]-valued function is 1/σ-Lipschitz). The samples stay independent as
long as the purifier's randomness is drawn anew on every call, which every purifier here does.

``run_certification`` certifies the first ``n_images`` images of the evaluation split one by one (image i under
its own seeds, derived from (seed, i) as in ``evaluation.loop.batch_seed``, so a run is deterministic and an image's
result does not depend on how many images are certified), writes ``certify.json`` (per-image records, the
certified-accuracy curve, the settings, run metadata) and ``certify.png``, and — given a ``cache_file`` — appends
each finished image to a JSON-lines cache so an interrupted run (hours at paper scale) resumes.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from evaluation.loop import as_batches, batch_seed
from evaluation.results import append_jsonl, read_jsonl, write_json_atomic

#: Returned as the prediction when CERTIFY / PREDICT abstain (Cohen's ``Smooth.ABSTAIN``).
ABSTAIN = -1
#: Image i's noise generator is seeded with batch_seed(seed, i) + this; the global RNG (a stochastic purifier's
#: randomness) with batch_seed(seed, i). Two streams, so a purifier that draws more or fewer numbers never shifts
#: the Gaussian noise of the smoothing.
NOISE_SEED_OFFSET = 5


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − alpha) Clopper–Pearson lower bound on a binomial proportion from k successes in n trials.

    The bound is the p at which P(Bin(n, p) ≥ k) = alpha, i.e. the alpha-quantile of Beta(k, n − k + 1); for k = 0
    it is 0 (the Beta is undefined there). Equal to Cohen's ``proportion_confint(k, n, alpha=2 * alpha,
    method="beta")[0]`` (statsmodels' two-sided interval at 2·alpha has this lower end), without the dependency.
    For k = n it is alpha^(1/n): the largest p_A any finite sample can certify, which caps the radius at
    σ·Φ⁻¹(alpha^(1/n)).
    """
    k, n = int(k), int(n)
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """σ·Φ⁻¹(alpha^(1/n)): the radius of an image on which all n estimation samples agree; no image gets more, so
    certified accuracy beyond it is 0 by construction (n = 100,000, α = 0.001: ≈ 3.81 σ; n = 10,000: ≈ 3.20 σ)."""
    p = lower_confidence_bound(n, n, alpha)
    return float(sigma * norm.ppf(p)) if p >= 0.5 else 0.0


@dataclass
class Certificate:
    """One CERTIFY outcome: ``prediction`` (``ABSTAIN`` or the class) and ``radius`` (0.0 when abstaining), plus
    what they came from: the guessed top class, its count among the n estimation samples, the lower bound."""

    prediction: int
    radius: float
    top_class: int
    count: int
    n: int
    p_lower: float


class Smooth:
    """The Gaussian-smoothed classifier g of a base classifier f (Cohen et al.'s ``Smooth``, same argument order).

    Args:
        base_classifier: maps images (N, C, H, W) in [0, 1] to logits (N, K); here ``Defended(purifier, victim)``.
        num_classes: K; ``None`` takes it from the width of the logits.
        sigma: the noise level σ, in the same [0, 1] pixel units as the images (and hence as the radius).

    The noise is added in image space and x + δ is *not* clamped to [0, 1], as in Cohen's reference code, so this
    is the smoothed version of exactly the classifier we were given and its radii are comparable with theirs.
    (Clamping would not void the certificate — f∘clamp is just another base classifier and δ is still N(0, σ²I) —
    but it certifies a different g. What *would* void it is changing the noise distribution with x, e.g. a
    truncated or rejection-sampled Gaussian that keeps x + δ inside [0, 1]: Theorem 1 needs the same isotropic
    Gaussian at every point.) A purifier that clamps its input internally is part of f and changes nothing here.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int | None, sigma: float):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.base_classifier = base_classifier
        self.num_classes = None if num_classes is None else int(num_classes)
        self.sigma = float(sigma)

    # -- Monte Carlo ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, generator: torch.Generator | None = None) -> np.ndarray:
        """Class counts (K,) of f(x + δ) over ``num`` independent draws δ ~ N(0, σ²I), ``batch_size`` at a time.

        ``x``: one image (C, H, W) or (1, C, H, W). ``generator``: draws the noise (on x's device); ``None`` = the
        global torch RNG. A stochastic base classifier draws its own randomness from the global RNG as usual.
        """
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3:
            raise ValueError(f"expected one image (C, H, W) or (1, C, H, W), got shape {tuple(x.shape)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"the noise generator is on {generator.device}, the image on {x.device}")
        counts = None if self.num_classes is None else np.zeros(self.num_classes, dtype=np.int64)
        remaining = int(num)
        while remaining > 0:
            b = min(int(batch_size), remaining)
            remaining -= b
            batch = x.unsqueeze(0).expand(b, *x.shape)
            noise = torch.randn(batch.shape, generator=generator, device=x.device, dtype=x.dtype)
            logits = self.base_classifier(batch + noise * self.sigma)  # not clamped: see the class docstring
            if counts is None:
                counts = np.zeros(int(logits.shape[-1]), dtype=np.int64)
            predictions = logits.argmax(-1).cpu()  # ties: the first maximal index, as numpy's argmax in Cohen's code
            if int(predictions.max()) >= counts.size:
                raise ValueError(f"the base classifier returned {logits.shape[-1]} logits, more than num_classes={counts.size}")
            counts += torch.bincount(predictions, minlength=counts.size).numpy()
        return counts if counts is not None else np.zeros(self.num_classes or 0, dtype=np.int64)

    # -- CERTIFY and PREDICT --------------------------------------------------------------------------
    def certify_details(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, generator: torch.Generator | None = None
    ) -> Certificate:
        """``certify`` with its intermediate numbers (the guessed class, its count, the lower bound)."""
        _check_counts(n0=n0, n=n, alpha=alpha)
        self.base_classifier.eval()
        # Selection: n0 samples only to *guess* c_A. Reusing them for the estimate would bias p_A upwards (the
        # guess is the class that happened to come out on top), so the bound below uses n fresh samples.
        counts_selection = self.sample_counts(x, n0, batch_size, generator)
        top_class = int(counts_selection.argmax())
        counts_estimation = self.sample_counts(x, n, batch_size, generator)
        count = int(counts_estimation[top_class])
        p_lower = lower_confidence_bound(count, n, alpha)
        if p_lower < 0.5:
            return Certificate(ABSTAIN, 0.0, top_class, count, int(n), p_lower)
        return Certificate(top_class, float(self.sigma * norm.ppf(p_lower)), top_class, count, int(n), p_lower)

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[int, float]:
        """Cohen et al.'s CERTIFY: ``(class, radius)`` such that, with probability ≥ 1 − alpha over the samples,
        g(x') = class for every ‖x' − x‖₂ < radius; or ``(ABSTAIN, 0.0)`` when the lower bound on p_A is below ½.

        n0 selection samples guess the top class c_A, n fresh samples give the one-sided (1 − alpha)
        Clopper–Pearson lower bound p̲_A on its probability, and the radius is σ·Φ⁻¹(p̲_A).
        """
        cert = self.certify_details(x, n0, n, alpha, batch_size, generator)
        return cert.prediction, cert.radius

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, generator: torch.Generator | None = None) -> int:
        """Cohen et al.'s PREDICT: g(x) with probability ≥ 1 − alpha of being right, or ``ABSTAIN``.

        From n samples, the two most frequent classes (counts n_A ≥ n_B) are compared with a two-sided binomial test
        of n_A out of n_A + n_B against ½ (Hung & Fithian 2016); abstain unless its p-value is ≤ alpha, i.e. unless
        the top class is significantly more likely than the runner-up. Ties in the counts go to the lower class index.
        """
        _check_counts(n=n, alpha=alpha)
        self.base_classifier.eval()
        counts = self.sample_counts(x, n, batch_size, generator)
        order = np.argsort(-counts, kind="stable")
        n_a = int(counts[order[0]])
        n_b = int(counts[order[1]]) if counts.size > 1 else 0
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(order[0])


def _check_counts(*, n: int, alpha: float, n0: int | None = None) -> None:
    if n0 is not None and int(n0) < 1:
        raise ValueError(f"n0 must be >= 1, got {n0}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def certified_accuracy(
    radii: Sequence[float], predictions: Sequence[int], labels: Sequence[int], radius_grid: Sequence[float]
) -> list[float]:
    """For each r in ``radius_grid``: the fraction of images with prediction == label and radius ≥ r.

    This is Cohen et al.'s "approximate certified test accuracy" (their ``analyze.py``: correct & radius ≥ r,
    averaged over all images, abstentions counting as wrong). At r = 0 it is the smoothed classifier's accuracy.
    """
    radii_a = np.asarray(radii, dtype=np.float64).ravel()
    pred_a = np.asarray(predictions, dtype=np.int64).ravel()
    label_a = np.asarray(labels, dtype=np.int64).ravel()
    if not radii_a.size == pred_a.size == label_a.size:
        raise ValueError(f"radii, predictions and labels differ in length: {radii_a.size}, {pred_a.size}, {label_a.size}")
    if radii_a.size == 0:
        raise ValueError("certified accuracy of zero images is undefined")
    correct = pred_a == label_a
    return [float(np.mean(correct & (radii_a >= float(r)))) for r in radius_grid]


# -- driver ---------------------------------------------------------------------------------------
def run_certification(
    defended: nn.Module,
    datamodule: Any,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    n_images: int,
    radius_grid: Sequence[float],
    seed: int = 0,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    *,
    num_classes: int | None = None,
    cache_file: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """CERTIFY the first ``n_images`` images of ``datamodule``'s evaluation split; write certify.json / certify.png.

    Args:
        defended: the base classifier f (``Defended(purifier, victim)``).
        datamodule: a LightningDataModule (its test/eval split), a DataLoader, or an iterable of (x, y) batches.
        sigma / n0 / n / alpha / batch_size: ``Smooth.certify``'s settings.
        n_images: how many images, taken in the split's order (fewer if the split is shorter).
        radius_grid: radii at which the certified accuracy is reported.
        seed: image i runs under seeds derived from (seed, i); the same image gets the same samples in any run.
        out_dir: where ``certify.json`` and ``certify.png`` are written (``None`` = nothing written).
        extra: fields merged into the result (run labels, config …, from ``evaluation.runner.run_metadata``).
        cache_file: JSON-lines file of finished images (resume); the caller keys it by everything that changes the
            samples (config, weights, code, σ, n0, n, α, batch size — the batch size too, since it changes how the
            noise stream is cut into batches and a stochastic purifier's draws). ``None`` = no cache.

    Returns:
        ``{…extra, "sigma", "n0", "n", "alpha", "batch_size", "seed", "n_images", "n_images_requested",
        "radius_grid", "certified_accuracy" (list, one per radius), "certified_accuracy_at" ({"0.25": …}),
        "accuracy", "abstain_rate", "max_certifiable_radius", "seconds", "seconds_per_image",
        "images" (per image: index, label, prediction, radius, correct, top_class, count, p_lower, seconds)}``.
    """
    if int(n_images) < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    device = torch.device(device)
    defended = defended.to(device).eval()
    smooth = Smooth(defended, num_classes, sigma)
    done = {int(r["index"]): r for r in read_jsonl(cache_file)} if cache_file else {}

    records: list[dict[str, Any]] = []
    for x, y in _images(datamodule, int(n_images)):
        index = len(records)
        label = int(y)
        cached = done.get(index)
        if cached is not None and int(cached["label"]) == label:
            records.append(cached)
            continue
        x = x.to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch_seed(seed, index))  # a stochastic purifier's randomness
            generator = torch.Generator(device=device).manual_seed(batch_seed(seed, index) + NOISE_SEED_OFFSET)
            start = time.perf_counter()
            cert = smooth.certify_details(x, n0, n, alpha, batch_size, generator)
            seconds = time.perf_counter() - start
        record = {
            "index": index,
            "label": label,
            **{k: v for k, v in asdict(cert).items() if k != "n"},
            "correct": cert.prediction == label,
            "seconds": seconds,
        }
        records.append(record)
        if cache_file:
            append_jsonl(cache_file, record)
        if progress:
            verdict = "abstain" if cert.prediction == ABSTAIN else f"class {cert.prediction}, radius {cert.radius:.3f}"
            print(f"certify {index + 1}/{n_images}: label {label}: {verdict} ({seconds:.1f} s)")

    grid = [float(r) for r in radius_grid]
    curve = certified_accuracy([r["radius"] for r in records], [r["prediction"] for r in records], [r["label"] for r in records], grid)
    total = sum(float(r["seconds"]) for r in records)
    result: dict[str, Any] = {
        **(extra or {}),
        "sigma": float(sigma),
        "n0": int(n0),
        "n": int(n),
        "alpha": float(alpha),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "n_images": len(records),
        "n_images_requested": int(n_images),
        "radius_grid": grid,
        "certified_accuracy": curve,
        "certified_accuracy_at": {f"{r:g}": a for r, a in zip(grid, curve)},
        "accuracy": float(np.mean([bool(r["correct"]) for r in records])),
        "abstain_rate": float(np.mean([r["prediction"] == ABSTAIN for r in records])),
        "max_certifiable_radius": max_certifiable_radius(sigma, n, alpha),
        "seconds": total,
        "seconds_per_image": total / len(records),
        "images": records,
    }
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    at = ", ".join(f"r={r:g}: {a:.3f}" for r, a in zip(grid, curve))
    print(f"certified accuracy (σ={sigma:g}, n={n}, α={alpha:g}, {len(records)} images): {at}")
    return result


def _images(data: Any, limit: int):
    """(x (C, H, W), y) of the first ``limit`` images of the evaluation split, one at a time."""
    seen = 0
    for x, y in as_batches(data):
        for i in range(x.shape[0]):
            if seen >= limit:
                return
            yield x[i], y[i]
            seen += 1


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """``certify.json`` and ``certify.png`` (certified accuracy vs ℓ2 radius) in ``out_dir``, both written atomically."""
    from evaluation.plots import plt, save_figure_atomic  # Agg backend, set there

    write_json_atomic(out_dir / "certify.json", result)
    images = result["images"]
    grid = result["radius_grid"]
    cap = result["max_certifiable_radius"]
    top = max([*grid, cap, *(r["radius"] for r in images)]) * 1.05 or 1.0
    fine = np.linspace(0.0, top, 400)
    curve = certified_accuracy([r["radius"] for r in images], [r["prediction"] for r in images], [r["label"] for r in images], fine)
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    label = f"{result.get('defense', 'smoothed')} (σ={result['sigma']:g})"
    ax.plot(fine, curve, drawstyle="steps-post", label=label)
    ax.plot(grid, result["certified_accuracy"], "o", color=ax.lines[-1].get_color())
    if math.isfinite(cap) and cap > 0:
        ax.axvline(cap, color="grey", linestyle=":", linewidth=1, label=f"max radius at n={result['n']}, α={result['alpha']:g}")
    ax.set_xlabel("ℓ2 radius (pixel units, [0, 1] images)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0.0, top)
    ax.legend(fontsize=8, loc="upper right")
    what = " ".join(str(result[k]) for k in ("dataset", "victim") if result.get(k))
    ax.set_title(f"{what + ': ' if what else ''}randomized smoothing, {result['n_images']} images", fontsize=9)
    save_figure_atomic(fig, out_dir / "certify.png")
