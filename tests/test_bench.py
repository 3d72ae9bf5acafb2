"""`make bench`: the figures come out as parseable JSON lines with a reference and a ratio, then a Markdown summary;
the peak-memory probe sees an allocation; checkpointing makes memory grow sub-linearly with the chain's length."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation import bench

KEYS = {"name", "value", "unit", "reference", "reference_label", "ratio", "ratio_meaning", "target", "device", "n", "settings"}


def figures(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_quick_bench_prints_device_json_lines_with_ratios_and_a_summary():
    out = io.StringIO()
    report = bench.run(["--quick", "--device", "cpu", "--only", "none,eot", "--no-memory"], stream=out)
    text = out.getvalue()
    assert text.splitlines()[0].startswith("device: cpu (") and f"on {os.cpu_count()} cores" in text.splitlines()[0]
    rows = figures(text)
    assert [r["name"] for r in rows] == ["none: defended inference", "none: adaptive PGD-5", "EOT-PGD (classifier A + Gaussian noise)"]
    for row in rows:
        assert set(row) == KEYS and row["device"].startswith("cpu") and row["n"] > 0
        assert row["value"] > 0 and row["reference"] > 0 and row["ratio"] == pytest.approx(_expected_ratio(row), rel=1e-3)
    pgd = rows[1]
    assert pgd["settings"]["purifier_calls_per_step"] == 1 and pgd["target"] == "≤ 1.5×"  # no purifier recomputed
    assert "| figure | value | reference | ratio |" in text and len(report.figures) == 3


def _expected_ratio(row: dict) -> float:
    """Speed-ups are reference time / time = value / reference for rates; cost ratios the inverse."""
    if row["ratio_meaning"].startswith("cost ratio"):
        return row["reference"] / row["value"]
    return row["value"] / row["reference"]


def test_unknown_only_name_fails_in_one_line():
    with pytest.raises(SystemExit, match="--only: unknown nonsense; valid: cases"):
        bench.run(["--quick", "--only", "nonsense"], stream=io.StringIO())


def test_peak_memory_sees_an_allocation():
    size = 64 * 2**20
    used, method = bench.peak_memory(lambda: torch.ones(size // 4), torch.device("cpu"))
    assert method.startswith("cpu") and 0.9 * size <= used <= 3 * size


def test_checkpointing_makes_memory_grow_sublinearly():
    out = io.StringIO()
    bench.run(["--quick", "--device", "cpu", "--only", "checkpoint"], stream=out)
    rows = figures(out.getvalue())
    growth = rows[-1]
    assert growth["name"].startswith("memory growth 2 → 8 reverse steps")
    # 4× the steps: checkpointed memory grows well below 4× (measured 1.4–1.6×), plain close to it (3.6–3.8×)
    assert growth["value"] < 2.5 and growth["reference"] > 1.5 * growth["value"] and growth["settings"]["sublinear"]
    assert all(r["ratio"] < 1 for r in rows[:-1] if r["settings"]["steps"] >= 4)


@pytest.mark.slow
@pytest.mark.timeout(660)  # the subprocess has its own 600 s limit; < 1 min quiet, > 5 min beside a 2-thread job
def test_make_bench_quick_runs_every_figure():
    done = subprocess.run([sys.executable, "-m", "evaluation.bench", "--quick"], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    rows = figures(done.stdout)
    names = " ".join(r["name"] for r in rows)
    for case in ("none", "diffdefense", "diffpure", "densepure", "disttrans", "rap", "jatp"):
        assert f"{case}: defended inference" in names and f"{case}: adaptive PGD-5" in names
    for part in ("(L, R) = (5, 5)", "denoiser FLOP/s", "EOT-PGD", "memory growth", "eval.amp=bf16", "eval.channels_last=true"):
        assert part in names
    assert all(r["ratio"] is not None for r in rows)
