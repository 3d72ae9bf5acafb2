"""A multirun that outlives its failing jobs: every job runs, the failures are listed at the end, the exit is non-zero.

Hydra's local launcher runs the jobs of a sweep one after another in one process. ``report_user_errors`` used to
turn a bad input into ``sys.exit(2)`` inside the job; ``SystemExit`` is not an ``Exception``, so it escaped Hydra's
``run_job`` and ended the whole sweep at the first bad job (``evaluate.py -m 'dataset.eval_subset=-5,100'`` never ran
its second job). In a multirun the error is now raised as an ordinary exception, which ``run_job`` records in the
job's ``JobReturn`` (status FAILED), and ``JobSummary`` — a Hydra ``Callback`` named in ``conf/hydra/default.yaml`` —

* ``on_job_end``: prints one line for a failed job, writes its traceback to ``<job dir>/error.txt`` and the job's
  outcome to ``<job dir>/job_status.json``, and hands the sweeper a completed ``JobReturn`` whose value is a
  ``JobFailure``. Hydra's ``BasicSweeper`` re-raises the first FAILED return once its batch is over, which would skip
  every later batch (``hydra.sweeper.max_batch_size``) and ``on_multirun_end``; the failure is reported here instead.
* ``on_multirun_end``: reads the statuses of this invocation's jobs (stamped with the token it wrote into the sweep
  folder, so job folders of an earlier invocation do not count), prints the list of failed jobs with their one-line
  errors and how to rerun only what is missing, and exits with status 1.

The statuses go through files, not the callback's memory, because with ``hydra/launcher=submitit_slurm`` (or
``submitit_local``) ``on_job_end`` runs in the job's own process on the cluster and ``on_multirun_end`` in the
submitting one; the sweep folder is the one place both see. Single runs are left alone: a user error is one line
and exit status 2 (``evaluation.cli.report_user_errors``), anything else Hydra's usual traceback.
"""
from __future__ import annotations

import json
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from evaluation.results import write_json_atomic, write_text_atomic

#: Per job folder: the outcome of the job's latest run.
STATUS_FILE = "job_status.json"
#: Per job folder: the full traceback of a failed job (the console gets one line).
ERROR_FILE = "error.txt"
#: Per sweep folder: the token of the latest invocation, stamped into each job status it produced.
TOKEN_FILE = ".multirun_token"
#: Exit status of a multirun in which some job failed (a single run's user error keeps 2).
EXIT_FAILED_JOBS = 1


def in_multirun() -> bool:
    """True inside a job of a ``-m`` sweep (any launcher), False in a single run or outside Hydra."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def one_line(exc: BaseException) -> str:
    """The error as one line: a user error's own message (``error: …`` as single runs print it), otherwise the
    exception type and the first line of its message (the traceback goes to the job's ``error.txt``)."""
    from evaluation.cli import USER_ERRORS, root_cause  # cli imports this module: import at call time

    cause = root_cause(exc)
    lines = str(cause).strip().splitlines()
    message = lines[0] if lines else ""
    if isinstance(cause, USER_ERRORS):
        return f"error: {message}"
    return f"{type(cause).__name__}: {message}" if message else type(cause).__name__


@dataclass(frozen=True)
class JobFailure:
    """The return value of a failed job after ``JobSummary.on_job_end`` (picklable: submitit sends it back)."""

    num: int
    overrides: tuple[str, ...]
    error: str


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def job_statuses(sweep_dir: str | Path, token: str | None = None) -> list[dict[str, Any]]:
    """Every ``job_status.json`` under ``sweep_dir`` (of invocation ``token`` only, when given), by job number."""
    found = (_read_json(p) for p in Path(sweep_dir).rglob(STATUS_FILE))
    return sorted((s for s in found if s and (token is None or s.get("token") == token)), key=lambda s: int(s.get("num", -1)))


def summary_lines(statuses: list[dict[str, Any]], sweep_dir: str | Path) -> list[str]:
    """The end-of-sweep report: one line of counts, then one line per failed job, then how to rerun the rest."""
    failed = [s for s in statuses if s.get("status") == "failed"]
    if not failed:
        return [f"multirun: all {len(statuses)} jobs done → {sweep_dir}"]
    lines = [f"multirun: {len(failed)} of {len(statuses)} jobs FAILED ({len(statuses) - len(failed)} done) → {sweep_dir}"]
    for s in failed:
        lines.append(f"  #{s.get('num')} {' '.join(s.get('overrides') or []) or '(no overrides)'}: {s.get('error')}")
    lines.append(f"fix the cause, then rerun the same command with hydra.sweep.dir={sweep_dir}: jobs already done are skipped")
    return lines


class JobSummary(Callback):
    """Hydra callback: failed multirun jobs do not stop the sweep; they are listed at its end (module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self.token = uuid.uuid4().hex
        write_text_atomic(sweep_dir / TOKEN_FILE, self.token + "\n")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        out_dir = Path(config.hydra.runtime.output_dir)
        token_file = Path(config.hydra.sweep.dir) / TOKEN_FILE
        token = token_file.read_text(encoding="utf-8").strip() if token_file.is_file() else None
        num = int(config.hydra.job.num)
        overrides = tuple(job_return.overrides or ())
        status: dict[str, Any] = {"num": num, "overrides": list(overrides), "token": token, "status": "done", "error": None}
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value  # the property would re-raise it
            error = one_line(exc)
            write_text_atomic(out_dir / ERROR_FILE, "".join(traceback.format_exception(exc)))
            status.update(status="failed", error=error)
            print(f"[job #{num}] FAILED ({' '.join(overrides)}): {error}", file=sys.stderr, flush=True)
            # Completed from the sweeper's point of view, so the sweep goes on; the failure travels as the value.
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = JobFailure(num, overrides, error)
        write_json_atomic(out_dir / STATUS_FILE, status)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = job_statuses(sweep_dir, getattr(self, "token", None))
        lines = summary_lines(statuses, sweep_dir)
        failed = any(s.get("status") == "failed" for s in statuses)
        print("\n".join(lines), file=sys.stderr if failed else sys.stdout, flush=True)
        if failed:
            raise SystemExit(EXIT_FAILED_JOBS)

