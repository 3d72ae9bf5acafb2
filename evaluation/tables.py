"""Aggregate a multirun folder's results.json files into Markdown tables (``make tables``).

Reads result files only — never re-runs anything — so tables can be rebuilt from a sweep that ran
on another machine or in Slurm shards. Each cell is our robust accuracy, with the paper's number
beside it where the experiment config states one (``paper: {row: {column: value}}``). A stochastic defense
(scored over ``n_draws`` > 1 purifications) shows ``mean / worst``: the mean over draws is what papers report,
the worst case (correct on every draw) is what an attacker who may retry gets, and both belong in view.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from evaluation.results import write_text_atomic

METRIC_COLUMNS = ("clean_acc", "robust_acc", "robust_acc_worst", "attack_success_rate", "n_images", "images_per_s", "seconds")
#: Shown only when some run has them (eval.time_purifier=true), with 4 significant digits.
TIMING_COLUMNS = ("purify_s_per_image_batched", "purify_s_per_image_bs1", "paper_purify_s_per_image")


def load_results(run_dir: str | Path) -> list[dict[str, Any]]:
    files = sorted(Path(run_dir).rglob("results.json"))
    results = []
    for f in files:
        try:
            results.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            print(f"warning: skipping unreadable {f}: {e}", file=sys.stderr)
    return results


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def is_stochastic(result: dict[str, Any]) -> bool:
    """Scored over several purification draws (``evaluate`` stores n_draws = 1 for deterministic defenses)."""
    return int(result.get("n_draws") or 1) > 1 and result.get("robust_acc_worst") is not None


def robust_cell(result: dict[str, Any]) -> str:
    """``mean / worst (paper)`` for a stochastic defense, ``robust (paper)`` otherwise: the mean stays first, where
    a single-pass figure is compared with the paper's, and deterministic cells read exactly as before."""
    value = _fmt(result["robust_acc"])
    if is_stochastic(result):
        value += f" / {_fmt(result['robust_acc_worst'])}"
    if result.get("paper") is not None:
        value += f" ({_fmt(float(result['paper']))})"
    return value


def grid_table(results: list[dict[str, Any]]) -> str:
    """Rows × columns of robust accuracy ``ours (paper)`` (``mean / worst (paper)`` for stochastic defenses),
    grouped by the experiment's labels."""
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for r in results:
        t = r.get("table") or {}
        row, col = str(t.get("row", r["defense"])), str(t.get("column", r["attack"]))
        row = f"{row} [{r['threat']}]" if "threat" not in (t.get("row_includes") or "threat") else row
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[(row, col)] = robust_cell(r)
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cells.get((row, c), "") for c in cols) + " |")
    return "\n".join(lines)


def long_table(results: list[dict[str, Any]]) -> str:
    timing = tuple(k for k in TIMING_COLUMNS if any(r.get(k) is not None for r in results))
    keys = ("dataset", "victim", "victim_training", "defense", "attack", "threat", "eps") + METRIC_COLUMNS + timing + ("paper",)
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    order = ("dataset", "victim", "victim_training", "defense", "threat", "attack")
    for r in sorted(results, key=lambda r: tuple(str(r.get(k)) for k in order)):
        fmt = lambda k: f"{r[k]:.4g}" if k in timing and isinstance(r.get(k), float) else _fmt(r.get(k))  # noqa: E731
        lines.append("| " + " | ".join(fmt(k) for k in keys) + " |")
    return "\n".join(lines)


def render(run_dir: str | Path) -> str:
    results = load_results(run_dir)
    if not results:
        raise FileNotFoundError(f"no results.json under {run_dir}: run `python evaluate.py -m …` first")
    name = (results[0].get("table") or {}).get("name", "results")
    worst = "; stochastic defenses: mean / worst-of-N over N purification draws" if any(map(is_stochastic, results)) else ""
    parts = [
        f"## {name}: robust accuracy % (paper's number in parentheses{worst})",
        "",
        grid_table(results),
        "",
        "## All metrics",
        "",
        long_table(results),
        "",
    ]
    return "\n".join(parts)


def latest_run(root: str | Path = "multirun") -> Path:
    candidates = sorted({p.parent.parent for p in Path(root).rglob("results.json")}, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no multirun results under {root}/: run `python evaluate.py -m …` first")
    return candidates[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="multirun folder (default: the newest under multirun/)")
    args = parser.parse_args(argv)
    try:
        run_dir = Path(args.run_dir) if args.run_dir else latest_run()
        text = render(run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_text_atomic(run_dir / "tables.md", text)
    print(text)
    print(f"(written to {run_dir / 'tables.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
