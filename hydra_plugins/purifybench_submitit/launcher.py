"""``hydra-submitit-launcher``'s Slurm launcher, made independent of ``sacct`` and of its first failing job.

Plain ``hydra/launcher=submitit_slurm`` works on a cluster without an accounting database as long as every job ends
normally: submitit polls ``sacct`` (which then fails; submitit logs "Bypassing sacct error" and keeps the state
UNKNOWN) but also checks every second for the job's result pickle, which a finished job writes. Two things break:

* a job that ends **without** a result pickle (killed at its time limit, out of memory, cancelled, a node failure, a
  crash before Python starts) stays UNKNOWN forever without ``sacct``: the sweep waits forever;
* ``launch`` collects results with ``[j.results()[0] for j in jobs]``: the first such job raises, the sweep ends
  there, and the fault-tolerant summary of ``evaluation/multirun.py`` never runs.

``SlurmLauncher`` here keeps everything else of the plugin (same config keys, same sbatch files, same job function)
and changes three things:

1. job states come from ``sacct`` when it answers, otherwise from ``squeue --states=all`` (which lists finished jobs for
   the controller's ``MinJobAge``); a job that was seen and has left the queue counts as finished (state ``GONE``);
2. a job that returns no result becomes a failed job of the sweep: one line on stderr, ``error.txt`` and
   ``job_status.json`` in its folder (what ``JobSummary.on_job_end`` writes for a job that fails inside Python), so
   ``on_multirun_end`` lists it and exits 1, and a rerun into the same ``hydra.sweep.dir`` redoes only what is missing;
3. the project root goes on the jobs' ``PYTHONPATH`` (sbatch exports the submitting environment), so a job imports
   this package and the project whatever its working directory; the jobs' Python is the submitting one (submitit
   runs ``sys.executable``), i.e. the project's virtual environment.

This module is imported by Hydra's plugin scan on every ``train.py`` / ``evaluate.py`` start: it imports nothing heavy.
"""
from __future__ import annotations

import getpass
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

log = logging.getLogger(__name__)

#: The project root (…/hydra_plugins/purifybench_submitit/launcher.py → …).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: State given to a job that squeue saw and no longer lists (finished and purged, or lost).
GONE = "GONE"
#: A job squeue never listed counts as gone after this many seconds (the controller knows a job as soon as sbatch
#: returns, so this only matters if the controller restarted and lost it).
NEVER_SEEN_GRACE_S = 120.0


def _make_queue_watcher(delay_s: int = 30):
    """A submitit ``SlurmInfoWatcher`` that falls back to ``squeue`` when ``sacct`` fails (built lazily: submitit is
    imported only when a sweep launches)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        """Job states from sacct when it answers, else from ``squeue --states=all`` (module docstring)."""

        def __init__(self, delay_s: int) -> None:
            super().__init__(delay_s=delay_s)
            self.sacct_works: Optional[bool] = None  # unknown until the first call
            self._seen: Set[str] = set()
            self._registered_at: Dict[str, float] = {}

        def register_job(self, job_id: str) -> None:
            super().register_job(job_id)
            self._registered_at.setdefault(job_id, time.time())

        def _sacct(self) -> Optional[Dict[str, Dict[str, str]]]:
            command = self._make_command()
            if command is None:
                return {}
            try:
                out = subprocess.run(command, capture_output=True, timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                if self.sacct_works is None:
                    err = getattr(exc, "stderr", b"") or b""
                    detail = err.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
                    log.info(f"sacct unavailable ({detail[0]}): job states come from squeue")
                self.sacct_works = False
                return None
            self.sacct_works = True
            return self.read_info(out)

        def _squeue(self) -> Optional[Dict[str, Dict[str, str]]]:
            command = ["squeue", "-h", "-r", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%N"]
            try:
                out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning(f"squeue failed ({exc}); job states may be stale")
                return None
            return self.read_info("JobID|State|NodeList\n" + out)

        def update(self) -> None:
            if not (self._registered - self._finished):
                return
            self._num_calls += 1
            info = self._sacct() if self.sacct_works is not False else None
            if info is None:
                info = self._squeue()
                if info is not None:
                    now = time.time()
                    for job_id in self._registered - self._finished:
                        if job_id in info:
                            self._seen.add(job_id)
                        elif job_id in self._seen or now - self._registered_at.get(job_id, now) > NEVER_SEEN_GRACE_S:
                            previous = self._info_dict.get(job_id, {})
                            info[job_id] = {**previous, "State": GONE}
            if info:
                self._info_dict.update(info)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return QueueWatcher(delay_s)


def _job_dir(launcher: "SlurmLauncher", overrides: Sequence[str], num: int) -> Path:
    """The job's output folder, as ``run_job`` will name it (``hydra.sweep.dir``/``hydra.sweep.subdir``)."""
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return sweep_dir / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    except Exception:  # an exotic subdir (e.g. one reading HydraConfig): the default layout
        return sweep_dir / str(num)


def record_failure(job_dir: Path, sweep_dir: Path, num: int, overrides: Sequence[str], error: str, details: str) -> Any:
    """What ``JobSummary.on_job_end`` records for a failed job, for a job that never reached it; returns the value the
    sweeper gets (an ``evaluation.multirun.JobFailure``)."""
    from evaluation.multirun import ERROR_FILE, STATUS_FILE, TOKEN_FILE, JobFailure
    from evaluation.results import write_json_atomic, write_text_atomic

    token_file = sweep_dir / TOKEN_FILE
    token = token_file.read_text(encoding="utf-8").strip() if token_file.is_file() else None
    job_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(job_dir / ERROR_FILE, details.rstrip() + "\n")
    write_json_atomic(job_dir / STATUS_FILE,
                      {"num": num, "overrides": list(overrides), "token": token, "status": "failed", "error": error})
    print(f"[job #{num}] FAILED ({' '.join(overrides)}): {error}", file=sys.stderr, flush=True)
    return JobFailure(num, tuple(overrides), error)


def _one_line(job: Any, exc: BaseException) -> str:
    """A job's failure in one line: the Slurm state and where its log is, or the last line of its traceback."""
    from submitit.core.utils import FailedJobError

    if isinstance(exc, FailedJobError):  # the job's Python failed outside Hydra's run_job (e.g. an import error)
        # submitit's message: "Job (task=0) failed during processing with trace:\n----…\n<traceback>\n----…\nYou can…"
        parts = str(exc).split("-" * 22)
        trace = parts[1] if len(parts) >= 3 else str(exc)
        lines = [ln.strip() for ln in trace.splitlines() if ln.strip() and not ln.startswith(" ")]
        return f"slurm job {job.job_id}: {lines[-1] if lines else type(exc).__name__}; its log: {job.paths.stderr}"
    state = job.watcher.get_state(job.job_id, mode="cache")
    if state == GONE:  # e.g. a pending array task cancelled: Slurm drops it at once
        how = "left the queue without a result (cancelled or lost; no sacct to tell which)"
    else:
        how = f"ended {state} without a result"
    return f"slurm job {job.job_id} {how}; its log: {job.paths.stderr}"


class SlurmLauncher(_SubmititSlurmLauncher):
    """``submitit_slurm`` without a dependency on ``sacct`` and without stopping at a failed job (module docstring)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and self.hydra_context is not None
        num_jobs = len(job_overrides)
        assert num_jobs > 0
        root = str(PROJECT_ROOT)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])

        # As the plugin's launch: executor, parameters, one array job for the batch.
        params = self.params
        init_params = {"folder": params["submitit_folder"]}
        specific_init_keys = {"max_num_timeout"}
        init_params.update(**{f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys})
        init_keys = specific_init_keys | {"submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{x if x in baseparams else f"{self._EXECUTOR}_{x}": y
                                      for x, y in params.items() if x not in init_keys})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params: List[Any] = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))

        watcher = _make_queue_watcher()
        for job in jobs:
            job.watcher = watcher  # instance attribute: replaces the class-wide sacct watcher for these jobs only
            watcher.register_job(job.job_id)
        log.info(f"Submitted Slurm job(s) {', '.join(j.job_id for j in jobs)}")

        returns: List[JobReturn] = []
        for idx, (overrides, job) in enumerate(zip(job_overrides, jobs)):
            num = initial_job_idx + idx
            try:
                returns.append(job.results()[0])
            except Exception as exc:  # no result: killed, cancelled, timed out, or failed outside run_job
                error = _one_line(job, exc)
                details = f"{error}\n\n{''.join(traceback.format_exception(exc))}"
                value = record_failure(_job_dir(self, overrides, num), sweep_dir, num, list(overrides), error, details)
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value,
                                         working_dir=os.getcwd(), task_name=str(self.config.hydra.job.name)))
        return returns
