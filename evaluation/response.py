"""Where a purifier's robustness comes from: its intensity response curve and the binarisation it implies.

Why (issue 11): on MNIST one-bit binarisation at 0.5 beats DiffDefense under the paper's own protocol, and the
hypothesis is that DiffDefense's reconstruction *is* a binarisation whose threshold is set by where the denoiser
pulls background pixels. This module measures that instead of arguing it, on the first eval batch:

* **Response curve**: every background pixel (clean intensity ≤ ``background_max``) of the clean images is set to
  level v, the images are purified, and the mean output over those pixels is recorded; likewise stroke pixels
  (clean intensity ≥ ``stroke_min``) set to v. A binariser gives a step; the identity gives the diagonal.
* **Implied threshold**: the level at which the background curve first crosses 0.5 (linear interpolation),
  i.e. the input a background pixel needs before the purifier turns it white; ``None`` if it never does. A
  perturbation of ε is erased by the purifier when ε is below this threshold.
* **Whitened fraction**: the share of clean background pixels that come out white (> 0.5) after purifying the
  configured attack's adversarial examples (and, for reference, after purifying the clean images).

``eval.response_curve=true`` adds these to ``results.json`` (``response_*`` keys) and writes ``response.png``
beside it; ``evaluation.report`` prints them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.tables import variant_suffix

#: Input levels of the response curve (0, 0.05, …, 1).
LEVELS = tuple(round(0.05 * i, 2) for i in range(21))


def _purify(purifier: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """One purification under a fixed seed: every level sees the same randomness, so the curve is not noise."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return purifier(x).clamp(0, 1)


@torch.no_grad()
def response_curve(
    purifier: nn.Module, x: torch.Tensor, levels: tuple[float, ...] = LEVELS, background_max: float = 0.1,
    stroke_min: float = 0.5, seed: int = 0,
) -> dict[str, list[float | None]]:
    """Mean purified intensity over background / stroke pixels whose input was set to each level (module docstring).

    ``x``: clean images in [0, 1]. A curve is ``None`` at every level when the batch has no such pixels.
    """
    if x.dim() != 4 or not (0 <= float(x.min()) and float(x.max()) <= 1):
        raise ValueError(f"response_curve needs a batch of [0, 1] images (N, C, H, W), got shape {tuple(x.shape)}")
    masks = {"background": x <= background_max, "stroke": x >= stroke_min}
    out: dict[str, list[float | None]] = {"levels": list(levels)}
    for name, mask in masks.items():
        n = int(mask.sum())
        curve: list[float | None] = []
        for v in levels:
            if n == 0:
                curve.append(None)
                continue
            x_hat = _purify(purifier, torch.where(mask, torch.full_like(x, v), x), seed)
            curve.append(float(x_hat[mask].mean()))
        out[name] = curve
    return out


def implied_threshold(levels: list[float], curve: list[float | None], white: float = 0.5) -> float | None:
    """First input level where ``curve`` reaches ``white`` (linear interpolation between levels); ``None`` if never."""
    points = [(v, r) for v, r in zip(levels, curve) if r is not None]
    for (v0, r0), (v1, r1) in zip(points, points[1:]):
        if r0 >= white:
            return v0
        if r1 >= white:
            return v0 + (white - r0) * (v1 - v0) / (r1 - r0)
    if points and points[-1][1] >= white:
        return points[-1][0]
    return None


@torch.no_grad()
def whitened_fraction(
    purifier: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, background_max: float = 0.1, white: float = 0.5, seed: int = 0,
) -> dict[str, float]:
    """Share of clean background pixels that are white (> ``white``) in the adversarial input, after purifying it, and
    after purifying the clean image (the purifier's own false whites)."""
    if x.shape != x_adv.shape:
        raise ValueError(f"clean and adversarial batches differ in shape: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
    mask = x <= background_max
    n = max(int(mask.sum()), 1)
    frac = lambda img: float((img[mask] > white).sum()) / n  # noqa: E731
    return {
        "adversarial_input": frac(x_adv),
        "purified_adversarial": frac(_purify(purifier, x_adv, seed)),
        "purified_clean": frac(_purify(purifier, x, seed)),
        "background_pixels": n,
    }


def response_diagnostic(
    purifier: nn.Module, x: torch.Tensor, x_adv: torch.Tensor | None, seed: int = 0, out_png: str | Path | None = None,
    label: str = "",
) -> dict[str, Any]:
    """The ``response_*`` entries of results.json: curves, implied threshold, whitened fractions; the PNG if asked."""
    purifier = purifier.eval()
    curves = response_curve(purifier, x, seed=seed)
    result: dict[str, Any] = {
        "response_curve": curves,
        "response_threshold": implied_threshold(curves["levels"], curves["background"]),
        "response_images": int(x.shape[0]),
    }
    if x_adv is not None:
        result["response_whitened"] = whitened_fraction(purifier, x, x_adv, seed=seed)
    if out_png is not None:
        plot_response(curves, result["response_threshold"], out_png, label)
    return result


def plot_response(curves: dict[str, list[float | None]], threshold: float | None, path: str | Path, label: str = "") -> Path:
    """Response curves with the identity and a 0.5-binariser for reference."""
    from evaluation.plots import plt, save_figure_atomic

    fig, ax = plt.subplots(figsize=(4.5, 4))
    levels = curves["levels"]
    ax.plot([0, 1], [0, 1], ":", color="grey", label="identity")
    ax.step([0, 0.5, 1], [0, 1, 1], where="pre", color="grey", alpha=0.5, label="1-bit binarisation")
    for name in ("background", "stroke"):
        pts = [(v, r) for v, r in zip(levels, curves[name]) if r is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label=f"{name} pixels")
    if threshold is not None:
        ax.axvline(threshold, color="C3", lw=0.8, label=f"implied threshold {threshold:.2f}")
    ax.set(xlabel="input intensity (pixels set to this level)", ylabel="mean purified intensity", xlim=(0, 1), ylim=(0, 1),
           title=label or "purifier response")
    ax.legend(fontsize=7)
    return save_figure_atomic(fig, path)


def response_markdown(results: list[dict[str, Any]]) -> str:
    """The diagnostic of every result that has one: implied threshold and whitened fractions (``""`` if none)."""
    rows = [r for r in results if "response_curve" in r]
    if not rows:
        return ""
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["", "Purifier response (evaluation/response.py; first eval batch): the background level a pixel needs to come",
             "out white, and the share of clean background pixels that are white after purification.", "",
             "| defense | victim | attack | implied threshold | white: adversarial input | white: purified adversarial | white: purified clean |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (str(r.get("defense")), str(r.get("variant")), str(r.get("attack")))):
        w = r.get("response_whitened") or {}
        pct = lambda k: "—" if k not in w else f"{100 * w[k]:.1f} %"  # noqa: E731
        defense = str(r.get("defense")) + variant_suffix(r)
        lines.append(f"| {defense} | {r.get('victim')} | {r.get('attack')} | {fmt(r.get('response_threshold'))} | "
                     f"{pct('adversarial_input')} | {pct('purified_adversarial')} | {pct('purified_clean')} |")
    return "\n".join(lines) + "\n"
