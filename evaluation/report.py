"""One Markdown report for a reproduction folder (``python -m evaluation.report multirun/cpu``).

Each sub-folder of the reproduction is one experiment; its section is built from the result files only
(never re-running anything): a T* sweep (``results.json`` over ≥ 3 values of T*) → the Fig. 3 table and
``tstar.png``; detection runs (``detection.json``) → the Fig. 4 AUC table and ``detection.png``; certification
runs (``certify.json``) → the certified-accuracy table and the overlaid curves ``certify.png``; an ε sweep
(``results.json`` over ≥ 3 values of ε for one defense, victim and attack) → the accuracy-vs-ε table and
``eps.png``; an audit (``audit.json``) → the audit report; any other ``results.json`` → the grid of robust
accuracies with the paper's numbers (severity means and ``paper_quoted`` rows included), the table of every
metric (``evaluation.tables``) and, where recorded, the purifier response diagnostic (``evaluation.response``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.audit import format_report
from evaluation.plots import eps_curves, load_certificates, load_detections, plot_certify, plot_detection, plot_eps, plot_tstar, tstar_curves
from evaluation.response import response_markdown
from evaluation.cost import format_cost, sum_costs
from evaluation.results import write_text_atomic
from evaluation.tables import load_results, render

MIN_TSTAR_VALUES = 3
MIN_EPS_VALUES = 3


def cost_note(files: list[Path] | list[dict]) -> str:
    """``**Cost**: …`` of the jobs behind a section (their result files' ``cost`` summed; evaluation/cost.py)."""
    records = [json.loads(f.read_text()) if isinstance(f, Path) else f for f in files]
    return f"\n**Cost**: {format_cost(sum_costs(r.get('cost') for r in records))}.\n"


def section(folder: Path) -> str | None:
    """The Markdown of one experiment folder, or ``None`` when it holds no result file. Each section ends with the
    summed cost of its jobs (``render`` prints it under a results table)."""
    title = f"# {folder.name}\n\n"
    audits = sorted(folder.rglob("audit.json"))
    if audits:
        return title + "\n".join("```\n" + format_report(json.loads(a.read_text())) + "\n```\n" for a in audits) + cost_note(audits)
    if load_detections(folder):
        png = plot_detection(folder)
        return title + png.with_suffix(".md").read_text() + f"\nROC curves: `{png}`\n" + cost_note(sorted(folder.rglob("detection.json")))
    if load_certificates(folder):
        png = plot_certify(folder)
        return title + png.with_suffix(".md").read_text() + f"\nPlot: `{png}`\n" + cost_note(sorted(folder.rglob("certify.json")))
    results = load_results(folder)
    if not results:
        return None
    curves = tstar_curves(results)
    if curves and max(len(c) for by_attack in curves.values() for c in by_attack.values()) >= MIN_TSTAR_VALUES:
        png = plot_tstar(folder)
        return title + png.with_suffix(".md").read_text() + f"\nPlot: `{png}`\n" + cost_note(results)
    by_eps = eps_curves(results)
    if by_eps and max(len(c) for lines in by_eps.values() for c in lines.values()) >= MIN_EPS_VALUES:
        png = plot_eps(folder)
        return title + png.with_suffix(".md").read_text() + f"\nPlot: `{png}`\n" + cost_note(results)
    return title + render(folder) + response_markdown(results)


def build_report(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: pass a reproduction folder such as multirun/cpu")
    parts = [s for child in sorted(p for p in run_dir.iterdir() if p.is_dir()) if (s := section(child))]
    if not parts:
        raise FileNotFoundError(f"no result files under {run_dir}: run the experiments first")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="reproduction folder whose sub-folders are experiments (e.g. multirun/cpu)")
    parser.add_argument("--out", help="write the report here too (default: <run_dir>/report.md)")
    args = parser.parse_args(argv)
    try:
        text = build_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for out in {Path(args.run_dir) / "report.md", *( [Path(args.out)] if args.out else [])}:
        write_text_atomic(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
