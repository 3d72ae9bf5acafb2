"""Figures from a multirun folder's result files (reads files only, never re-runs anything).

    python -m evaluation.plots tstar <multirun dir>       # accuracy vs T* per attack (DiffDefense Fig. 3, disttrans Fig. 4)
    python -m evaluation.plots detection <multirun dir>   # DiffDefense Fig. 4: ROC curves + AUC table
    python -m evaluation.plots eps <multirun dir>         # accuracy vs ε (distribution transfer Fig. 3)
    python -m evaluation.plots certify <multirun dir>     # certified accuracy vs ℓ2 radius, one curve per defense

``tstar`` reads every ``results.json`` (experiments ``diffdefense_tstar``, ``disttrans_tstar``) and writes
``tstar.png`` and ``tstar.md`` (accuracy per T*, the best T* per attack and for the mean over attacks) into the
folder; one panel per (dataset, split, defense), the y-axis naming the defense. T* is the config's
``defense.purifier.t_star``, or the result's own ``t_star`` where the config leaves it null (disttrans' ``match_t``).
``detection`` reads every ``detection.json`` (experiment ``diffdefense_detection``) and writes
``detection.png`` (ROC curves per attack, one curve per T*) and ``detection.md`` (AUC per attack × T*).
``eps`` reads every ``results.json`` (experiment ``disttrans_eps``) and writes ``eps.png`` (robust accuracy vs ε in
/255, one line per (defense, victim), worst-of-N dashed for stochastic defenses) and ``eps.md``.
``certify`` reads every ``certify.json`` (experiment ``disttrans_certify``) and writes ``certify.png`` (the certified
accuracy curves overlaid) and ``certify.md`` (rows defense, columns radius) — ``certify_overlay.png`` / ``.md``
when the folder is itself one run (it holds a ``certify.json``, whose own ``certify.png`` is kept).
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
from evaluation.tables import eval_split, is_stochastic, load_results, natural_key, recorded_t_star, robust_cell, variant_suffix  # noqa: E402


def save_figure_atomic(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically; close the figure."""
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"), binary=True)
    finally:
        plt.close(fig)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


# -- Fig. 3: accuracy vs T* ---------------------------------------------------------------------
Curves = dict[tuple[str, str, str], dict[str, dict[int, float]]]


def tstar_curves(results: list[dict[str, Any]]) -> Curves:
    """{(dataset, split, defense): {attack: {T*: robust_acc}}} from results.json dicts that have a T*."""
    curves: Curves = defaultdict(lambda: defaultdict(dict))
    for r in results:
        t = recorded_t_star(r)
        if t is None or r.get("robust_acc") is None:
            continue
        defense = str(r.get("defense", "?")) + variant_suffix(r)
        curves[(r["dataset"], eval_split(r), defense)][r["attack"]][t] = float(r["robust_acc"])
    return {k: dict(v) for k, v in curves.items()}


#: Percentage points of mean accuracy a cheaper T* may give up (docs/decisions.md).
CHOICE_TOLERANCE = 1.0


def choose_t_star(mean_acc: dict[int, float], tolerance: float = CHOICE_TOLERANCE) -> int:
    """The smallest T* whose mean accuracy is within ``tolerance`` points of the best one."""
    if not mean_acc:
        raise ValueError("no T* to choose from")
    best = max(mean_acc.values())
    return min(t for t, acc in mean_acc.items() if acc >= best - tolerance)


def tstar_markdown(curves: Curves) -> str:
    """Accuracy per (attack, T*) with the best T* per attack and for the mean over attacks."""
    parts = []
    for (dataset, split, defense), by_attack in sorted(curves.items(), key=lambda kv: natural_key(kv[0])):
        ts = sorted({t for c in by_attack.values() for t in c})
        parts += [f"## {dataset} ({split} split), {defense}: accuracy % vs T* (attack `none` = clean accuracy)", ""]
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


def tstar_ylabel(defense: str) -> str:
    return f"accuracy after {defense} (%)"


def plot_tstar(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Accuracy vs T* per attack (one panel per dataset/split) → ``<run_dir>/tstar.png`` (+ ``tstar.md``)."""
    run_dir = Path(run_dir)
    curves = tstar_curves(load_results(run_dir))
    if not curves:
        raise FileNotFoundError(f"no results.json with a defense.purifier.t_star under {run_dir}")
    panels = sorted(curves, key=natural_key)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for attack, c in sorted(curves[key].items()):
            ts = sorted(c)
            ax.plot(ts, [c[t] for t in ts], marker="o", label=attack)
        ax.set(title=f"{key[0]} ({key[1]})", xlabel="T* (diffusion steps)", ylabel=tstar_ylabel(key[2]))
        ax.set_ylim(0, 100)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(out) if out else run_dir / "tstar.png"
    save_figure_atomic(fig, out)
    write_text_atomic(out.with_suffix(".md"), tstar_markdown(curves))
    return out


# -- Fig. 4: detection ROC -------------------------------------------------------------------------
def load_json_files(run_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """Every ``name`` (e.g. detection.json) under ``run_dir``, skipping unreadable ones with a warning."""
    out = []
    for f in sorted(Path(run_dir).rglob(name)):
        try:
            out.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            print(f"warning: skipping unreadable {f}: {e}", file=sys.stderr)
    return out


def load_detections(run_dir: str | Path) -> list[dict[str, Any]]:
    return load_json_files(run_dir, "detection.json")


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


# -- accuracy vs ε (distribution transfer Fig. 3) ------------------------------------------------------
EpsCurves = dict[tuple[str, str, str, str], dict[tuple[str, str], dict[float, dict[str, Any]]]]


def _eps255(result: dict[str, Any]) -> float | None:
    eps = result.get("eps")
    return None if eps is None else round(float(eps) * 255, 2)


def eps_curves(results: list[dict[str, Any]]) -> EpsCurves:
    """{(dataset, attack, norm, threat): {(defense, victim): {ε·255: result}}} from results with an ε and a robust_acc."""
    curves: EpsCurves = defaultdict(lambda: defaultdict(dict))
    for r in results:
        e = _eps255(r)
        if e is None or r.get("robust_acc") is None:
            continue
        panel = tuple(str(r.get(k, "?")) for k in ("dataset", "attack", "norm", "threat"))
        curves[panel][(str(r.get("defense", "?")), str(r.get("victim", "?")))][e] = r
    return {k: dict(v) for k, v in curves.items()}


def eps_markdown(curves: EpsCurves) -> str:
    """Robust accuracy per (defense, victim) × ε (``mean / worst`` for stochastic defenses, the paper's number in
    parentheses where the experiment states one)."""
    parts = []
    for (dataset, attack, norm, threat), lines in sorted(curves.items()):
        es = sorted({e for c in lines.values() for e in c})
        worst = "; stochastic defenses: mean / worst-of-N" if any(is_stochastic(r) for c in lines.values() for r in c.values()) else ""
        parts += [f"## {dataset}: accuracy % vs ε ({attack}, {norm}, threat {threat}{worst})", ""]
        parts += ["| defense | victim | " + " | ".join(f"ε={e:g}/255" for e in es) + " |", "|---" * (len(es) + 2) + "|"]
        for (defense, victim), c in sorted(lines.items()):
            parts.append(f"| {defense} | {victim} | " + " | ".join(robust_cell(c[e]) if e in c else "" for e in es) + " |")
        parts.append("")
    return "\n".join(parts)


def plot_eps(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Robust accuracy vs ε·255, one line per (defense, victim), worst-of-N dashed where a defense is stochastic;
    one panel per (dataset, attack, norm, threat) → ``<run_dir>/eps.png`` (+ ``eps.md``)."""
    run_dir = Path(run_dir)
    curves = eps_curves(load_results(run_dir))
    if not curves:
        raise FileNotFoundError(f"no results.json with an eps under {run_dir}: run `python evaluate.py -m experiment=disttrans_eps` first")
    panels = sorted(curves, key=natural_key)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for (defense, victim), c in sorted(curves[key].items()):
            es = sorted(c)
            (line,) = ax.plot(es, [float(c[e]["robust_acc"]) for e in es], marker="o", label=f"{defense} / {victim}")
            worst = [e for e in es if c[e].get("robust_acc_worst") is not None]
            if any(is_stochastic(c[e]) for e in worst):
                ax.plot(worst, [float(c[e]["robust_acc_worst"]) for e in worst], ls="--", marker=".", color=line.get_color(),
                        label=f"{defense} / {victim} (worst of {max(int(c[e].get('n_draws') or 1) for e in worst)})")
        ax.set(title=f"{key[0]}: {key[1]} ({key[2]}, {key[3]})", xlabel="ε (/255)", ylabel="accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(out) if out else run_dir / "eps.png"
    save_figure_atomic(fig, out)
    write_text_atomic(out.with_suffix(".md"), eps_markdown(curves))
    return out


# -- certified accuracy vs radius (randomized smoothing, evaluation/certify.py) -------------------------
def load_certificates(run_dir: str | Path) -> list[dict[str, Any]]:
    return load_json_files(run_dir, "certify.json")


def certify_labels(certs: list[dict[str, Any]]) -> list[str]:
    """One label per certify.json: the defense, plus dataset / victim / training / σ where those differ between files."""
    varying = [k for k in ("dataset", "victim", "victim_training", "sigma") if len({str(c.get(k)) for c in certs}) > 1]
    labels: list[str] = []
    for c in certs:
        parts = [str(c.get("defense", "smoothed"))] + [f"σ={c.get(k):g}" if k == "sigma" else str(c.get(k)) for k in varying]
        label = " ".join(parts)
        labels.append(label if label not in labels else f"{label} #{labels.count(label) + 1}")
    return labels


def _certified_at(cert: dict[str, Any]) -> dict[float, float]:
    """{radius: certified accuracy in [0, 1]} at the run's radius grid."""
    return {float(r): float(a) for r, a in zip(cert.get("radius_grid") or [], cert.get("certified_accuracy") or [])}


def certify_markdown(certs: list[dict[str, Any]]) -> str:
    """Certified accuracy % per defense (rows) × ℓ2 radius (columns), then each run's settings."""
    labels = certify_labels(certs)
    radii = sorted({r for c in certs for r in _certified_at(c)})
    name = ((certs[0].get("table") or {}).get("name")) or "Randomized smoothing"
    lines = [
        f"## {name}: certified accuracy % at ℓ2 radius r (correct and certified at ≥ r; abstentions count as wrong)",
        "",
        "| defense | " + " | ".join(f"r={r:g}" for r in radii) + " |",
        "|---" * (len(radii) + 1) + "|",
    ]
    for label, c in sorted(zip(labels, certs), key=lambda lc: lc[0]):
        at = _certified_at(c)
        lines.append(f"| {label} | " + " | ".join(_fmt(100 * at[r]) if r in at else "" for r in radii) + " |")
    lines.append("")
    for label, c in sorted(zip(labels, certs), key=lambda lc: lc[0]):
        settings = ", ".join(f"{k}={c[k]:g}" if isinstance(c[k], float) else f"{k}={c[k]}"
                             for k in ("dataset", "victim", "sigma", "n0", "n", "alpha", "n_images") if c.get(k) is not None)
        cap = c.get("max_certifiable_radius")
        lines.append(f"- {label}: {settings}" + (f"; no radius beyond {cap:.3f} can be certified at this n, α" if cap is not None else ""))
    lines.append("")
    return "\n".join(lines)


def plot_certify(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Certified accuracy vs ℓ2 radius of every certify.json under ``run_dir``, one curve each (steps from the per-image
    radii, dots at the radius grid) → ``<run_dir>/certify.png`` (+ ``certify.md``); ``certify_overlay.png`` (+ ``.md``)
    when ``run_dir`` itself holds a certify.json, so that run's own certify.png is not overwritten."""
    run_dir = Path(run_dir)
    certs = load_certificates(run_dir)
    if not certs:
        raise FileNotFoundError(f"no certify.json under {run_dir}: run `python evaluate.py -m experiment=disttrans_certify` first")
    caps = sorted({float(c["max_certifiable_radius"]) for c in certs if c.get("max_certifiable_radius") is not None})
    top = max([*(r for c in certs for r in _certified_at(c)), *caps, *(float(i.get("radius", 0.0)) for c in certs for i in c.get("images") or [])],
              default=1.0) * 1.05 or 1.0
    fine = [top * i / 399 for i in range(400)]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, c in sorted(zip(certify_labels(certs), certs), key=lambda lc: lc[0]):
        at = _certified_at(c)
        images = c.get("images") or []
        if images:
            ok = [float(i["radius"]) for i in images if int(i["prediction"]) == int(i["label"])]
            (line,) = ax.plot(fine, [sum(r >= x for r in ok) / len(images) for x in fine], drawstyle="steps-post", label=label)
            ax.plot(sorted(at), [at[r] for r in sorted(at)], "o", color=line.get_color())
        else:
            ax.plot(sorted(at), [at[r] for r in sorted(at)], marker="o", label=label)
    for cap in caps:
        if 0 < cap < float("inf"):
            ax.axvline(cap, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="ℓ2 radius (pixel units, [0, 1] images)", ylabel="certified accuracy", ylim=(-0.02, 1.02), xlim=(0.0, top))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    what = " ".join(sorted({str(c[k]) for c in certs for k in ("dataset", "victim") if c.get(k)}))
    ax.set_title(f"{what + ': ' if what else ''}randomized smoothing (dotted: max certifiable radius)", fontsize=9)
    out = Path(out) if out else run_dir / ("certify_overlay.png" if (run_dir / "certify.json").exists() else "certify.png")
    save_figure_atomic(fig, out)
    write_text_atomic(out.with_suffix(".md"), certify_markdown(certs))
    return out


FIGURES = {"tstar": plot_tstar, "detection": plot_detection, "eps": plot_eps, "certify": plot_certify}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=tuple(FIGURES))
    parser.add_argument("run_dir", help="multirun folder of the experiment")
    parser.add_argument("--out", default=None, help="PNG path (default: <run_dir>/<figure>.png)")
    args = parser.parse_args(argv)
    try:
        out = FIGURES[args.figure](args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(out).with_suffix(".md").read_text())
    print(f"(written {out} and {Path(out).with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
