"""Aggregate a multirun folder's results.json files into Markdown tables (``make tables``).

Reads result files only — never re-runs anything — so tables can be rebuilt from a sweep that ran
on another machine or in Slurm shards. Each cell is our robust accuracy, with the paper's number
beside it where the experiment config states one (``paper: {row: {column: value}}``). A stochastic defense
(scored over ``n_draws`` > 1 purifications) shows ``mean / worst``: the mean over draws is what papers report,
the worst case (correct on every draw) is what an attacker who may retry gets, and both belong in view.

Two kinds of rows are added to the grid besides one per run:

* ``<prefix> mean``: where table rows end in `` s<k>`` (a corruption severity k = 1…5, experiment
  ``disttrans_table3``), the mean over the severities that ran, per column, with ``(k/5 severities)`` when fewer
  than five did; the paper's number is looked up at ``paper["<prefix> mean"][column]`` of the run's config.
* ``<row> (quoted)``: the experiment's ``paper_quoted: {row: {column: value}}`` (rows of the paper's table this
  framework does not run, read from the resolved ``config`` in results.json), shown as ``– (paper)``: nothing of
  ours, the paper's number in parentheses.

A cell run under several seeds (``seed=0,1,2``) shows ``mean ± std (k seeds)`` over them (the sample standard
deviation; JATP reports its tables that way). Runs that would share a cell and a seed while their configs differ
(another victim or denoiser weights file, a setting the table does not label) are never folded into one cell: each
gets a ``variant`` naming what differs (``victim.weights=classifier_a-n800.pt``), appended to its row
(``tell_apart``). Runs of one cell with the same config and seed are reruns: the last read wins.

Shards (``dataset.shard=i/n``, a multirun over i) of one evaluation are merged into one result before anything is
shown: their per-batch counts (``batch_records``) are concatenated in batch order and summed exactly as the unsharded
run sums its own, so the merged row has the unsharded run's numbers, and a note says "merged n/n shards". Shards
belong together when their ``shard.cell`` (the run's cache key without the shard: config, code, versions, device kind,
weights) agrees; a cell with a missing or a duplicate shard is refused in one line rather than shown in part. The merged
row's ``cost`` is the sum of the shards' (``evaluation.cost.sum_costs``).

Under each table, its cost (issue 15): the jobs whose results.json it read, their wall times summed, CPU-minutes and
GPU-hours summed over the jobs of each kind, and the devices (``evaluation.cost.format_cost``); jobs written before
cost reporting have no ``cost`` and are counted as unknown, never as zero. A second line gives the training cost of the
weights files the runs load, where ``train.py`` recorded one beside them (``<weights>.train.json``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from evaluation.cost import format_cost, sum_costs, training_record_path
from evaluation.results import flatten, write_text_atomic

METRIC_COLUMNS = ("clean_acc", "robust_acc", "robust_acc_worst", "attack_success_rate", "n_images", "images_per_s", "seconds")
#: Shown only when some run has them (eval.time_purifier=true), with 4 significant digits.
TIMING_COLUMNS = ("purify_s_per_image_batched", "purify_s_per_image_bs1", "paper_purify_s_per_image")
#: A table row that is one corruption severity: ``<prefix> s<k>``, k = 1 … N_SEVERITIES (disttrans_table3).
SEVERITY_ROW = re.compile(r"^(?P<prefix>.+) s(?P<k>[1-5])$")
N_SEVERITIES = 5
#: Appended to the label of a row whose numbers are the paper's only (``paper_quoted``), never ours.
QUOTED_SUFFIX = " (quoted)"


class ShardMergeError(ValueError):
    """A cell whose shards cannot be merged (missing, duplicate or inconsistent): said in one line."""


def natural_key(key: Any) -> list[Any]:
    """Sort key that orders the numbers inside labels by value: job 2 before job 10, e86.pt before e250.pt."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(key))]


def load_results(run_dir: str | Path, merge: bool = True) -> list[dict[str, Any]]:
    """Every results.json under ``run_dir`` in natural order of their paths (a multirun's job 2 before job 10), with the
    shards of each evaluation merged into one (``merge_shards``)."""
    files = sorted(Path(run_dir).rglob("results.json"), key=natural_key)
    results = []
    for f in files:
        try:
            results.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            print(f"warning: skipping unreadable {f}: {e}", file=sys.stderr)
    return tell_apart(merge_shards(results)) if merge else results


#: Config keys that say where and how a run printed, never what it measured.
PLACE_KEYS = ("paths.", "logger.", "hydra.", "eval.progress")
#: What a table shows a run under; runs that agree on all of these land in one cell.
CELL_KEYS = ("dataset", "defense", "attack", "threat", "norm", "eps", "seed")


def recorded_t_star(result: dict[str, Any]) -> int | None:
    """The config's ``defense.purifier.t_star``; where that is null (distribution transfer matches t* from
    ``match_t``), the resolved one the run recorded (results.json ``purifier.t_star``; ``t_star`` in older files)."""
    purifier = ((result.get("config") or {}).get("defense") or {}).get("purifier") or {}
    t = purifier.get("t_star")
    if t is None:
        t = (result.get("purifier") or {}).get("t_star", result.get("t_star"))
    return None if t is None else int(t)


def eval_split(result: dict[str, Any]) -> str:
    """The split a run scored (``dataset.eval_split``: test, or val for tuning)."""
    return str(((result.get("config") or {}).get("dataset") or {}).get("eval_split", "test"))


def _cell_identity(result: dict[str, Any]) -> tuple[str, ...]:
    t = result.get("table") or {}
    return (*(str(result.get(k)) for k in CELL_KEYS), eval_split(result), str(t.get("row")), str(t.get("column")),
            str(recorded_t_star(result)))


def variant_suffix(result: dict[str, Any]) -> str:
    """`` (<what differs>)`` for a run ``tell_apart`` labelled, else ""; appended to the run's row or curve label."""
    return f" ({result['variant']})" if result.get("variant") else ""


def _shown(key: str, value: str) -> str:
    return f"{key}={Path(value).name if '/' in value else value}"


def tell_apart(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` with a ``variant`` label on each run that shares its cell (``_cell_identity``: labels, dataset
    split, seed, T*) with a run of a different config: the config keys whose values differ within the cell, paths
    shown by file name (``victim.weights=classifier_a-n800.pt``); keys that always vary together are named once (the
    shortest). Without it, a sweep over weights files — classifiers trained on 800 / 1,600 / 3,200 images, one DDPM
    after 86 / 250 / 501 epochs — would show one of them per cell as if it were the only run (the last read wins)."""
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault(_cell_identity(r), []).append(r)
    labelled: dict[int, str] = {}
    for group in cells.values():
        if len(group) < 2:
            continue
        flats = [{k: str(v) for k, v in flatten(r.get("config") or {}).items()} for r in group]
        keys = sorted(set().union(*flats), key=lambda k: (len(k), k))
        columns: dict[tuple[str, ...], str] = {}
        for key in keys:
            if key.startswith(PLACE_KEYS):
                continue
            values = tuple(f.get(key, "<unset>") for f in flats)
            if len(set(values)) > 1:
                columns.setdefault(values, key)  # keys that vary together: the shortest names them
        for i, r in enumerate(group):
            if columns:
                labelled[id(r)] = ", ".join(_shown(key, values[i]) for values, key in columns.items())
    return [{**r, "variant": labelled[id(r)]} if id(r) in labelled else r for r in results]


def _is_shard(result: dict[str, Any]) -> bool:
    shard = result.get("shard")
    return isinstance(shard, dict) and "index" in shard and "cell" in shard


def _cell_name(result: dict[str, Any]) -> str:
    row, suffix, col = _labels(result)
    return f"cell {row}{suffix} × {col} ({result.get('dataset')}, {result.get('threat')})"


def merge_shards(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` with the shards of each evaluation (same ``shard.cell``) replaced by one merged result, placed
    where its first shard was; unsharded results pass through. Raises ``ShardMergeError`` (one line) for a cell
    with shards missing or duplicated."""
    groups: dict[str, list[dict[str, Any]]] = {}
    order: list[dict[str, Any] | str] = []
    for r in results:
        if not _is_shard(r):
            order.append(r)
            continue
        cell = str(r["shard"]["cell"])
        if cell not in groups:
            order.append(cell)
        groups.setdefault(cell, []).append(r)
    return [merge_cell(groups[item]) if isinstance(item, str) else item for item in order]


def merge_cell(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the n shards of one evaluation: the metrics are ``evaluation.loop.summarise`` of the shards'
    batch records in batch order — the very sum the unsharded run computes — and the other fields are shard 0's
    (labels, config, provenance, diagnostics of the first batch)."""
    name = _cell_name(parts[0])
    counts = sorted({int(p["shard"]["count"]) for p in parts})
    if len(counts) > 1:
        raise ShardMergeError(f"cannot merge {name}: shards of {' and '.join(map(str, counts))} mixed in one folder")
    n = counts[0]
    indices = [int(p["shard"]["index"]) for p in parts]
    missing = sorted(set(range(n)) - set(indices))
    duplicate = sorted({i for i in indices if indices.count(i) > 1})
    if missing or duplicate:
        problems = ([f"missing shard {', '.join(f'{i}/{n}' for i in missing)}"] if missing else []) + (
            [f"duplicate shard {', '.join(f'{i}/{n}' for i in duplicate)}"] if duplicate else [])
        raise ShardMergeError(f"cannot merge {name}: {' and '.join(problems)} (have {len(parts)} of {n}; "
                              "run the missing ones or remove the extra folders — a table never shows part of a cell)")
    parts = sorted(parts, key=lambda p: int(p["shard"]["index"]))
    records = [record for p in parts for record in p.get("batch_records") or []]
    n_batches = int(parts[0]["shard"]["n_batches"])
    if [int(record["index"]) for record in records] != list(range(n_batches)):
        raise ShardMergeError(f"cannot merge {name}: the shards' batch records do not cover batches 0–{n_batches - 1} once each")
    from evaluation.loop import BatchRecord, summarise  # torch and the loop only when there is something to merge

    summary = summarise([BatchRecord(**{f.name: record[f.name] for f in fields(BatchRecord)}) for record in records])
    first = parts[0]["shard"]
    shard = {"merged": n, "count": n, "cell": first["cell"], "batches": [0, n_batches], "n_batches": n_batches,
             "images": [0, int(first["n_images"])], "n_images": int(first["n_images"])}
    cost = sum_costs(p.get("cost") for p in parts)
    return {**parts[0], **summary, "batch_records": records, "shard": shard, "cost": cost}


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


def _labels(result: dict[str, Any]) -> tuple[str, str, str]:
    """(row as the experiment labels it, the ``[threat]`` suffix the grid adds to it or "", column)."""
    t = result.get("table") or {}
    row, col = str(t.get("row", result["defense"])), str(t.get("column", result["attack"]))
    suffix = f" [{result['threat']}]" if "threat" not in (t.get("row_includes") or "threat") else ""
    return row, suffix, col


def _config_paper(result: dict[str, Any], key: str = "paper") -> dict[str, Any]:
    """``config[key]`` of a result (the experiment's ``paper`` / ``paper_quoted`` block), {} when absent."""
    block = (result.get("config") or {}).get(key)
    return block if isinstance(block, dict) else {}


def paper_quoted(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The union of the runs' ``config["paper_quoted"]`` blocks, {row: {column: paper value}}, first seen wins."""
    quoted: dict[str, dict[str, Any]] = {}
    for r in results:
        for row, by_col in _config_paper(r, "paper_quoted").items():
            if isinstance(by_col, dict):
                target = quoted.setdefault(str(row), {})
                for col, value in by_col.items():
                    target.setdefault(str(col), value)
    return quoted


def seeds_cell(runs: list[dict[str, Any]]) -> str:
    """``mean ± std (k seeds) (paper)`` of one cell run under k seeds (``seed=0,1,2``; JATP's tables report
    mean ± std): the sample standard deviation of the robust accuracy (of its mean over draws for a stochastic
    defense, whose worst case is then shown as the mean over seeds after a slash)."""
    values = [float(r["robust_acc"]) for r in runs]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    cell = f"{_fmt(mean)} ± {_fmt(std)}"
    if any(map(is_stochastic, runs)) and all(r.get("robust_acc_worst") is not None for r in runs):
        cell += f" / {_fmt(sum(float(r['robust_acc_worst']) for r in runs) / len(runs))}"
    cell += f" ({len(runs)} seeds)"
    paper = next((r.get("paper") for r in runs if r.get("paper") is not None), None)
    return cell + (f" ({_fmt(float(paper))})" if paper is not None else "")


def severity_mean_cell(by_severity: dict[int, dict[str, Any]], paper: Any = None) -> str:
    """``mean [/ mean worst] [(k/5 severities)] [(paper)]`` over the results of one (row prefix, column)."""
    runs = [r for _, r in sorted(by_severity.items()) if r.get("robust_acc") is not None]
    if not runs:
        return ""
    value = _fmt(sum(float(r["robust_acc"]) for r in runs) / len(runs))
    if any(map(is_stochastic, runs)) and all(r.get("robust_acc_worst") is not None for r in runs):
        value += f" / {_fmt(sum(float(r['robust_acc_worst']) for r in runs) / len(runs))}"
    if len(runs) < N_SEVERITIES:
        value += f" ({len(runs)}/{N_SEVERITIES} severities)"
    if paper is not None:
        value += f" ({_fmt(float(paper))})"
    return value


def grid_table(results: list[dict[str, Any]]) -> str:
    """Rows × columns of robust accuracy ``ours (paper)`` (``mean / worst (paper)`` for stochastic defenses),
    grouped by the experiment's labels; then a ``<prefix> mean`` row after each group of severity rows, and the
    experiment's ``paper_quoted`` rows last (see the module docstring)."""
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    # (prefix, threat suffix) → {column: {severity: result}}; row label → ((prefix, suffix), severity)
    groups: dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]] = {}
    severity_of: dict[str, tuple[tuple[str, str], int]] = {}
    by_cell: dict[tuple[str, str], dict[Any, dict[str, Any]]] = {}
    for r in results:
        raw, suffix, col = _labels(r)
        row = raw + variant_suffix(r) + suffix
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[(row, col)] = robust_cell(r)
        by_cell.setdefault((row, col), {})[r.get("seed")] = r
        if len(by_cell[(row, col)]) > 1 and r.get("robust_acc") is not None:
            cells[(row, col)] = seeds_cell([x for x in by_cell[(row, col)].values() if x.get("robust_acc") is not None])
        m = SEVERITY_ROW.match(raw)
        if m:
            key = (m["prefix"], suffix)
            groups.setdefault(key, {}).setdefault(col, {})[int(m["k"])] = r
            severity_of[row] = (key, int(m["k"]))
    if groups:
        ordered: list[str] = []
        for row in rows:
            if row not in severity_of:
                ordered.append(row)
                continue
            key = severity_of[row][0]
            mean_row = f"{key[0]} mean{key[1]}"
            if mean_row in ordered:
                continue
            ordered += [label for label, _ in sorted(((lb, k) for lb, (g, k) in severity_of.items() if g == key), key=lambda x: x[1])]
            ordered.append(mean_row)
            for col, by_severity in groups[key].items():
                paper_row = next((_config_paper(r).get(f"{key[0]} mean") for r in by_severity.values() if _config_paper(r)), None) or {}
                cells[(mean_row, col)] = severity_mean_cell(by_severity, paper_row.get(col) if isinstance(paper_row, dict) else None)
        rows = ordered
    for row, by_col in paper_quoted(results).items():
        label = row + QUOTED_SUFFIX
        quoted = {c: f"– ({_fmt(float(by_col[c]))})" for c in cols if by_col.get(c) is not None}
        if quoted and label not in rows:
            rows.append(label)
            cells.update({(label, c): v for c, v in quoted.items()})
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cells.get((row, c), "") for c in cols) + " |")
    return "\n".join(lines)


def grid_notes(results: list[dict[str, Any]]) -> list[str]:
    """Lines explaining the grid's added rows and merged shards, when it has any."""
    notes = []
    for r in results:
        shard = r.get("shard") or {}
        if shard.get("merged"):
            notes.append(f"{_cell_name(r)}: merged {shard['merged']}/{shard['count']} shards "
                         f"({shard['n_batches']} batches, {shard['n_images']} images).")
    if any(SEVERITY_ROW.match(_labels(r)[0]) for r in results):
        notes.append(f"Rows `… mean`: the mean over corruption severities 1–{N_SEVERITIES} of the `… s<k>` rows above it "
                     f"(`(k/{N_SEVERITIES} severities)` when only k ran); the paper's number is the one it states at the mean.")
    if any(paper_quoted(results).values()):
        notes.append("Rows `… (quoted)`: rows of the paper's table this framework does not run (`paper_quoted`); "
                     "`–` = not run here, the paper's number in parentheses.")
    return notes


def _shard_label(result: dict[str, Any]) -> str:
    shard = result.get("shard") or {}
    if shard.get("merged"):
        return f"{shard['merged']}/{shard['count']} merged"
    return f"{shard['index']}/{shard['count']}" if "index" in shard else "–"


def _wall_label(result: dict[str, Any]) -> str:
    wall = (result.get("cost") or {}).get("wall_s")
    return "–" if wall is None else f"{float(wall):.4g}"


def table_cost(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The summed cost of the jobs behind ``results`` (a merged row counts its shards): ``evaluation.cost.sum_costs``,
    plus ``unknown_seconds``, the attack-loop ``seconds`` of the jobs without a cost record (what is known of them)."""
    total = sum_costs(r.get("cost") for r in results)
    unknown = [r for r in results if not isinstance(r.get("cost"), dict)]
    seconds = [float(r["seconds"]) for r in unknown if isinstance(r.get("seconds"), (int, float))]
    total["unknown_seconds"] = sum(seconds) if seconds and len(seconds) == len(unknown) else None
    return total


def _weights_paths(node: Any) -> list[str]:
    """Every ``weights`` path in a result's resolved config (victim, surrogate, denoiser, adapter …)."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "weights" and isinstance(v, str)]
        return found + [p for v in node.values() for p in _weights_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _weights_paths(v)]
    return []


def training_cost(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The summed training cost (``sum_costs``; ``jobs`` = weights files) of the distinct weights files the runs load that
    exist on this machine, read from the ``<weights>.train.json`` train.py writes beside them; None when they load none."""
    files = sorted({p for r in results for p in _weights_paths(r.get("config") or {}) if Path(p).is_file()})
    if not files:
        return None
    costs = []
    for f in files:
        try:
            costs.append(json.loads(training_record_path(f).read_text(encoding="utf-8")).get("cost"))
        except (OSError, json.JSONDecodeError, AttributeError):
            costs.append(None)
    return sum_costs(costs)


def cost_lines(results: list[dict[str, Any]]) -> list[str]:
    """The lines printed under a table: its evaluation cost and, where recorded, its weights' training cost."""
    total = table_cost(results)
    line = f"**Cost** of this table: {format_cost(total)}"
    if total["unknown_jobs"] and total.get("unknown_seconds") is not None:
        line += f" (the attack loops of the unknown ones alone took {total['unknown_seconds']:.4g} s, their `seconds`)"
    lines = [line + ". Wall times summed over the jobs; CPU-minutes = wall minutes of the machine, GPU-hours = wall "
                    "hours × GPUs (docs/decisions.md \"Cost unit\"); training not included."]
    trained = training_cost(results)
    if trained is not None:
        text = format_cost(trained, noun="weights file", missing="no training record: trained before cost reporting, or not by train.py")
        lines.append(f"Training of the weights these runs load (`<weights>.train.json`): {text}.")
    return lines


def long_table(results: list[dict[str, Any]]) -> str:
    timing = tuple(k for k in TIMING_COLUMNS if any(r.get(k) is not None for r in results))
    # "n/n merged" beside a merged row (so it reads apart from an unsharded run of the same cell), when there is one.
    shards = ("shards",) if any(r.get("shard") for r in results) else ()
    # The job's wall time (cost.wall_s, summed over shards for a merged row), when some run recorded one.
    cost = ("wall_s",) if any(isinstance(r.get("cost"), dict) for r in results) else ()
    # What tells apart runs that share a cell (tell_apart), when some do.
    variant = ("variant",) if any(r.get("variant") for r in results) else ()
    keys = ("dataset", "victim", "victim_training", "defense") + variant + ("attack", "threat", "eps") + METRIC_COLUMNS + timing + shards + cost + ("paper",)
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    order = ("dataset", "victim", "victim_training", "defense", "variant", "threat", "attack")
    for r in sorted(results, key=lambda r: tuple(str(r.get(k)) for k in order)):
        fmt = lambda k: (_shard_label(r) if k == "shards" else _wall_label(r) if k == "wall_s" else  # noqa: E731
                         f"{r[k]:.4g}" if k in timing and isinstance(r.get(k), float) else _fmt(r.get(k)))
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
        *(line for note in grid_notes(results) for line in (note, "")),
        *(line for note in cost_lines(results) for line in (note, "")),
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
    except (FileNotFoundError, ShardMergeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_text_atomic(run_dir / "tables.md", text)
    print(text)
    print(f"(written to {run_dir / 'tables.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
