"""Figures from a multirun folder's result files (reads files only, never re-runs anything).

    python -m evaluation.plots tstar <multirun dir>       # DiffDefense Fig. 3: accuracy vs T* per attack
    python -m evaluation.plots detection <multirun dir>   # DiffDefense Fig. 4: ROC curves + AUC table

``tstar`` reads every ``results.json`` (experiment ``diffdefense_tstar``) and writes ``tstar.png`` and
``tstar.md`` (accuracy per T*, the best T* per attack and for the mean over attacks) into the folder.
``detection`` reads every ``detection.json`` (experiment ``diffdefense_detection``) and writes
``detection.png`` (ROC curves per attack, one curve per T*) and ``detection.md`` (AUC per attack × T*).
Every file is written atomically (temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluation.results import write_atomic, write_text_atomic  # noqa: E402
from evaluation.tables import load_results  # noqa: E402


def save_figure_atomic(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically; close the figure."""
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"), binary=True)
    finally:
        plt.close(fig)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


# -- Fig. 3: accuracy vs T* ---------------------------------------------------------------------
def _t_star(result: dict[str, Any]) -> int | None:
    purifier = ((result.get("config") or {}).get("defense") or {}).get("purifier") or {}
    t = purifier.get("t_star", result.get("t_star"))
    return None if t is None else int(t)


def _split(result: dict[str, Any]) -> str:
    return str(((result.get("config") or {}).get("dataset") or {}).get("eval_split", "test"))


def tstar_curves(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """{(dataset, split): {attack: {T*: robust_acc}}} from results.json dicts that have a T*."""
    curves: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        t = _t_star(r)
        if t is None or r.get("robust_acc") is None:
            continue
        curves[(r["dataset"], _split(r))][r["attack"]][t] = float(r["robust_acc"])
    return {k: dict(v) for k, v in curves.items()}


#: Percentage points of mean accuracy a cheaper T* may give up (docs/decisions.md).
CHOICE_TOLERANCE = 1.0


def choose_t_star(mean_acc: dict[int, float], tolerance: float = CHOICE_TOLERANCE) -> int:
    """The smallest T* whose mean accuracy is within ``tolerance`` points of the best one."""
    if not mean_acc:
        raise ValueError("no T* to choose from")
    best = max(mean_acc.values())
    return min(t for t, acc in mean_acc.items() if acc >= best - tolerance)


def tstar_markdown(curves: dict[tuple[str, str], dict[str, dict[int, float]]]) -> str:
    """Accuracy per (attack, T*) with the best T* per attack and for the mean over attacks."""
    parts = []
    for (dataset, split), by_attack in sorted(curves.items()):
        ts = sorted({t for c in by_attack.values() for t in c})
        parts += [f"## {dataset} ({split} split): accuracy % vs T* (attack `none` = clean accuracy)", ""]
        parts += ["| attack | " + " | ".join(f"T*={t}" for t in ts) + " | best T* |", "|---" * (len(ts) + 2) + "|"]
        for attack, c in sorted(by_attack.items()):
            best = max(c, key=lambda t: (c[t], -t))
            parts.append(f"| {attack} | " + " | ".join(_fmt(c.get(t)) for t in ts) + f" | {best} |")
        complete = [t for t in ts if all(t in c for c in by_attack.values())]
        if complete:
            mean = {t: sum(c[t] for c in by_attack.values()) / len(by_attack) for t in complete}
            best = max(mean, key=lambda t: (mean[t], -t))
            parts.append("| mean | " + " | ".join(_fmt(mean.get(t)) for t in ts) + f" | {best} |")
            if split == "val":
                parts += ["", f"Chosen T* = **{choose_t_star(mean)}**: the smallest T* whose mean is within "
                          f"{CHOICE_TOLERANCE:g} point of the best (cost grows linearly in T*; docs/decisions.md)."]
            else:
                parts += ["", f"{split} split: reported, never used to choose T* (that is done on the val split)."]
        parts.append("")
    return "\n".join(parts)


def plot_tstar(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Accuracy vs T* per attack (one panel per dataset/split) → ``<run_dir>/tstar.png`` (+ ``tstar.md``)."""
    run_dir = Path(run_dir)
    curves = tstar_curves(load_results(run_dir))
    if not curves:
        raise FileNotFoundError(f"no results.json with a defense.purifier.t_star under {run_dir}")
    panels = sorted(curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for attack, c in sorted(curves[key].items()):
            ts = sorted(c)
            ax.plot(ts, [c[t] for t in ts], marker="o", label=attack)
        ax.set(title=f"{key[0]} ({key[1]})", xlabel="T* (diffusion steps)", ylabel="accuracy after DiffDefense (%)")
        ax.set_ylim(0, 100)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(out) if out else run_dir / "tstar.png"
    save_figure_atomic(fig, out)
    write_text_atomic(out.with_suffix(".md"), tstar_markdown(curves))
    return out


# -- Fig. 4: detection ROC -------------------------------------------------------------------------
def load_detections(run_dir: str | Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(Path(run_dir).rglob("detection.json")):
        try:
            out.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            print(f"warning: skipping unreadable {f}: {e}", file=sys.stderr)
    return out


def plot_roc(ax: Any, fpr: Sequence[float], tpr: Sequence[float], label: str) -> None:
    ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
    ax.set(xlabel="false positive rate (clean flagged)", ylabel="true positive rate (attacked flagged)", xlim=(0, 1), ylim=(0, 1.01))


def detection_markdown(detections: list[dict[str, Any]]) -> str:
    """AUC per (dataset, attack) × T*; the paper's value in parentheses where the experiment states one."""
    ts = sorted({d.get("t_star") for d in detections}, key=lambda t: (t is None, t))
    rows: dict[tuple[str, str], dict[Any, dict[str, Any]]] = defaultdict(dict)
    for d in detections:
        rows[(d.get("dataset", "?"), d.get("attack", "?"))][d.get("t_star")] = d
    lines = [
        "## Reconstruction error as an attack detector: ROC AUC (DiffDefense Fig. 4; paper's value in parentheses)",
        "",
        "| dataset | attack | " + " | ".join(f"T*={t}" for t in ts) + " |",
        "|---" * (len(ts) + 2) + "|",
    ]
    for (dataset, attack), by_t in sorted(rows.items()):
        cells = []
        for t in ts:
            d = by_t.get(t)
            cell = "" if d is None else _fmt(d.get("auc"), ".3f")
            if d is not None and d.get("paper") is not None:
                cell += f" ({_fmt(float(d['paper']), '.2f')})"
            cells.append(cell)
        lines.append(f"| {dataset} | {attack} | " + " | ".join(cells) + " |")
    n = sorted({d.get("n_clean") for d in detections if d.get("n_clean") is not None})
    lines += ["", f"Clean images (negatives) per run: {', '.join(map(str, n)) or '–'}; as many attacked (positives).", ""]
    return "\n".join(lines)


def plot_detection(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """ROC curves, one panel per (dataset, attack), one curve per T* → ``<run_dir>/detection.png`` (+ ``.md``)."""
    run_dir = Path(run_dir)
    detections = load_detections(run_dir)
    if not detections:
        raise FileNotFoundError(f"no detection.json under {run_dir}: run `python evaluate.py -m experiment=diffdefense_detection` first")
    panels = sorted({(d.get("dataset", "?"), d.get("attack", "?")) for d in detections})
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, (dataset, attack) in zip(axes.flat, panels):
        mine = [d for d in detections if (d.get("dataset", "?"), d.get("attack", "?")) == (dataset, attack)]
        for d in sorted(mine, key=lambda d: (d.get("t_star") is None, d.get("t_star"))):
            plot_roc(ax, d["fpr"], d["tpr"], f"T*={d.get('t_star')} (AUC {_fmt(d.get('auc'), '.3f')})")
        ax.set_title(f"{dataset}: {attack}")
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    out = Path(out) if out else run_dir / "detection.png"
    save_figure_atomic(fig, out)
    write_text_atomic(out.with_suffix(".md"), detection_markdown(detections))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=("tstar", "detection"))
    parser.add_argument("run_dir", help="multirun folder of the experiment")
    parser.add_argument("--out", default=None, help="PNG path (default: <run_dir>/<figure>.png)")
    args = parser.parse_args(argv)
    try:
        out = (plot_tstar if args.figure == "tstar" else plot_detection)(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(out).with_suffix(".md").read_text())
    print(f"(written {out} and {Path(out).with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
