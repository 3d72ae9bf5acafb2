"""Cost reporting (issue 15 item 4): what a job spent, in the unit of the device it ran on.

Every result file (results.json, audit.json, detection.json, certify.json, a training's <weights>.train.json)
carries ``cost``: what the job that wrote it spent, in the unit of the device it ran on (docs/decisions.md "Cost
unit"): GPU-hours = wall hours × GPUs used on CUDA; CPU-minutes = wall minutes of the machine on CPU (one machine,
whatever the thread count, which is recorded beside it: a job holds the machine it runs on, and 2 cores here cannot
be sold by the thread). The wall time is this invocation's, from the start of the run to its result file: a job
resumed from the cache is charged for what it recomputed, not for the interrupted invocations before it.

Left out of the resume-cache source hash (``evaluation.runner.PRESENTATION_MODULES``): it records time, never numbers.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from evaluation.results import device_name

#: Keys of a cost record (``cost_record``), in the order results.json shows them.
COST_KEYS = ("device", "device_kind", "n_devices", "threads", "cpu_count", "wall_s", "cpu_minutes", "gpu_hours", "finished_at")


def cost_record(device: torch.device | str, wall_s: float, n_devices: int = 1, n_machines: int = 1) -> dict[str, Any]:
    """The ``cost`` block of a result file: ``device`` (``device_name``), ``device_kind`` (cpu | cuda), ``n_devices``
    (GPUs on CUDA; machines on CPU), ``threads`` (torch's intra-op threads) and ``cpu_count`` (the machine's cores),
    ``wall_s``, and ``cpu_minutes`` (CPU runs: wall minutes × machines) or ``gpu_hours`` (CUDA runs: wall hours × GPUs);
    the other of the two is None, so a table sums each over the jobs of its own kind."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    n = int(n_devices if kind == "cuda" else n_machines)
    wall_s = float(wall_s)
    return {
        "device": device_name(device),
        "device_kind": kind,
        "n_devices": n,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "wall_s": wall_s,
        "cpu_minutes": wall_s / 60.0 * n if kind == "cpu" else None,
        "gpu_hours": wall_s / 3600.0 * n if kind == "cuda" else None,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class CostClock:
    """Wall clock of one job, started at construction: ``clock.cost(device)`` → ``cost_record`` up to now
    (CUDA work is synchronised first, so queued kernels count)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def wall_s(self) -> float:
        return time.perf_counter() - self.start

    def cost(self, device: torch.device | str, n_devices: int = 1, n_machines: int = 1) -> dict[str, Any]:
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(device)
        return cost_record(device, self.wall_s(), n_devices=n_devices, n_machines=n_machines)


def sum_costs(costs: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """The total of several jobs' costs: ``jobs`` (how many, a merged record counting its own ``jobs``), ``unknown_jobs``
    (jobs without a cost record: results written before cost reporting), ``wall_s``, ``cpu_minutes`` / ``gpu_hours``
    (None when no job of that kind), ``devices`` (the distinct device names), ``device`` (them joined by "; "),
    ``device_kind`` (cpu, cuda or mixed) and ``n_devices`` (the most any one job used)."""
    jobs = unknown = 0
    wall = 0.0
    cpu_minutes: float | None = None
    gpu_hours: float | None = None
    devices: list[str] = []
    kinds: list[str] = []
    n_devices = 0
    for cost in costs:
        if not isinstance(cost, dict):
            jobs, unknown = jobs + 1, unknown + 1
            continue
        count = int(cost.get("jobs") or 1)
        jobs += count
        if cost.get("wall_s") is None:
            unknown += int(cost.get("unknown_jobs") or count)
            continue
        unknown += int(cost.get("unknown_jobs") or 0)
        wall += float(cost["wall_s"])
        if cost.get("cpu_minutes") is not None:
            cpu_minutes = (cpu_minutes or 0.0) + float(cost["cpu_minutes"])
        if cost.get("gpu_hours") is not None:
            gpu_hours = (gpu_hours or 0.0) + float(cost["gpu_hours"])
        for name in cost.get("devices") or [cost.get("device")]:
            if name and name not in devices:
                devices.append(str(name))
        kind = cost.get("device_kind")
        if kind and kind not in kinds:
            kinds.append(str(kind))
        n_devices = max(n_devices, int(cost.get("n_devices") or 1))
    return {
        "jobs": jobs,
        "unknown_jobs": unknown,
        "wall_s": wall if jobs > unknown else None,
        "cpu_minutes": cpu_minutes,
        "gpu_hours": gpu_hours,
        "devices": devices,
        "device": "; ".join(devices) if devices else None,
        "device_kind": kinds[0] if len(kinds) == 1 else ("mixed" if kinds else None),
        "n_devices": n_devices or None,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_cost(total: dict[str, Any], noun: str = "job",
                missing: str = "no cost record: written before cost reporting") -> str:
    """One line for a ``sum_costs`` total: ``12 jobs: wall 3.4 min, 3.4 CPU-minutes on cpu (…)`` — and, where some
    jobs have no cost record, how many (``missing`` says why), shown as unknown, never as zero."""
    jobs, unknown = int(total.get("jobs") or 0), int(total.get("unknown_jobs") or 0)
    counted = lambda n: f"{n} {noun}{'s' * (n != 1)}"  # noqa: E731
    if jobs - unknown <= 0:
        return f"{counted(jobs)}: cost unknown ({missing})"
    units = []
    if total.get("cpu_minutes") is not None:
        units.append(f"{total['cpu_minutes']:.4g} CPU-minutes")
    if total.get("gpu_hours") is not None:
        units.append(f"{total['gpu_hours']:.4g} GPU-hours")
    text = f"{counted(jobs)}: wall {_duration(float(total['wall_s']))}"
    text += (", " + ", ".join(units)) if units else ""
    text += f" on {total['device']}" if total.get("device") else ""
    if unknown:
        text += f"; {unknown} of the {counted(jobs)} unknown ({missing}), not counted"
    return text


def training_record_path(weights: str | Path) -> Path:
    """Where a training's record (its cost, metrics, world size) lies: beside the exported weights,
    ``<folder>/<name>.train.json`` (``checkpoints/fashion_mnist/classifier_a-standard.train.json``)."""
    weights = Path(weights)
    return weights.with_name(weights.stem + ".train.json")


def accumulate_cost(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """``current`` plus a previous invocation's cost of the same job (a training resumed from ``last.ckpt``): wall time,
    CPU-minutes and GPU-hours add up, ``invocations`` counts the invocations; the device fields are ``current``'s
    (with ``devices`` listing both when they differ). A previous invocation killed before it wrote its record is
    not counted (it left no number)."""
    if not isinstance(previous, dict) or previous.get("wall_s") is None:
        return {**current, "invocations": 1}
    total = dict(current)
    total["wall_s"] = float(previous["wall_s"]) + float(current["wall_s"])
    for key in ("cpu_minutes", "gpu_hours"):
        values = [c[key] for c in (previous, current) if c.get(key) is not None]
        total[key] = sum(values) if values else None
    devices = [d for d in (*(previous.get("devices") or [previous.get("device")]), current.get("device")) if d]
    if len(set(devices)) > 1:
        total["devices"] = list(dict.fromkeys(devices))
    total["invocations"] = int(previous.get("invocations") or 1) + 1
    return total
