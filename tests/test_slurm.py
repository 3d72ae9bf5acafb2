"""Multiruns as Slurm jobs (issue 15) against a REAL Slurm: the single-node cluster of `make slurm-up`.

Skipped, with the reason, where the Slurm tools are absent or the cluster is not up. No test depends on ``sacct``
(there is no slurmdbd): plain ``hydra/launcher=submitit_slurm`` finds results through submitit's result files, the
project's ``hydra/launcher=slurm_local`` (hydra_plugins/purifybench_submitit) also reads job states from ``squeue``.

Tiny jobs: an untrained classifier A (victim.weights=null), no attack, 8 and 16 Fashion-MNIST test images, one CPU
each (``OMP_NUM_THREADS=1``); most of a job's time is Python's imports.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTITION = "debug"
USABLE = ("idle", "mixed", "allocated", "completing")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def cluster_down_reason() -> str | None:
    """Why no job can run on partition ``debug`` here, or None when the cluster is up."""
    missing = [tool for tool in ("sinfo", "sbatch", "squeue", "srun") if shutil.which(tool) is None]
    if missing:
        return f"Slurm client tools absent ({', '.join(missing)}): run `make slurm-up`"
    try:
        res = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s: the Slurm controller is not up (`make slurm-up`)"
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return f"Slurm cluster not up (sinfo: {last}): run `make slurm-up`"
    states = res.stdout.split()
    if not any(s.rstrip("*~#!%$@^-").startswith(USABLE) for s in states):
        return f"no usable node in partition {PARTITION!r} (states: {states or 'none'}): run `make slurm-up`"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    reason = cluster_down_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def job_env(tmp_path: Path, data_dir: Path) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the jobs): everything under tmp_path, one thread."""
    from datamodules.mnist_family import FashionMNISTDataModule

    # Unpack Fashion-MNIST once here: two jobs starting together would otherwise both unpack into the same folder.
    FashionMNISTDataModule(data_dir=str(data_dir))._unpack_system_copy()
    return {**os.environ, "PROJECT_ROOT": str(tmp_path), "PURIFY_DATA_DIR": str(data_dir),
            "PURIFY_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "OMP_NUM_THREADS": "1"}


def evaluate_argv(sweep_dir: Path, *overrides: str) -> list[str]:
    tiny = ("victim.weights=null", "attack=none", "eval.progress=false", "eval.grid=false")
    return [sys.executable, str(ROOT / "evaluate.py"), "-m", *tiny, *overrides, f"hydra.sweep.dir={sweep_dir}"]


def cluster_view(name: str) -> str:
    """sinfo and this sweep's jobs as squeue lists them (finished ones too, for the controller's MinJobAge)."""
    sinfo = subprocess.run(["sinfo"], capture_output=True, text=True, timeout=30).stdout
    squeue = subprocess.run(["squeue", "--states=all", "-r", "-n", name, "-o", "%.12i %.9P %.24j %.8u %.10T %.8M %.4C %R"],
                            capture_output=True, text=True, timeout=30).stdout
    return f"$ sinfo\n{sinfo}$ squeue --states=all -r -n {name}\n{squeue}"


def read_result(job_dir: Path) -> dict:
    path = job_dir / "results.json"
    assert path.is_file(), f"{path} missing; job folder holds {sorted(p.name for p in job_dir.glob('*'))}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("launcher", [
    # The plugin's own launcher, with the overrides this cluster needs.
    ("hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1",
     "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=30"),
    # The project's config for it (conf/hydra/launcher/slurm_local.yaml).
    ("hydra/launcher=slurm_local",),
], ids=["submitit_slurm", "slurm_local"])
def test_two_job_multirun_runs_as_slurm_jobs_and_both_results_come_back(slurm_cluster, job_env, tmp_path, launcher):
    name = f"pb-test-{uuid.uuid4().hex[:8]}"
    sweep = tmp_path / "sweep"
    argv = evaluate_argv(sweep, "dataset.eval_subset=8,16", *launcher, f"hydra.launcher.name={name}")
    start = time.time()
    res = subprocess.run(argv, capture_output=True, text=True, env=job_env, cwd=tmp_path, timeout=800)
    wall = time.time() - start
    view = cluster_view(name)
    print(f"$ {' '.join(argv[1:])}\n(exit {res.returncode}, {wall:.0f} s)\n{res.stdout[-1500:]}\n{view}")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "multirun: all 2 jobs done" in res.stdout

    # Both jobs ran as tasks of one Slurm array job, through submitit (sbatch script and logs in the sweep folder).
    job_folders = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name)  # <array>_<task>
    assert len(job_folders) == 2 and {f.split("_")[1] for f in job_folders} == {"0", "1"}, job_folders
    assert len({f.split("_")[0] for f in job_folders}) == 1, job_folders
    for folder in job_folders:
        assert folder in view, f"squeue does not list Slurm job {folder}:\n{view}"
        assert any((sweep / ".submitit" / folder).glob("*_result.pkl")), folder

    for job, n in (("0", 8), ("1", 16)):
        r = read_result(sweep / job)
        print(f"job {job}: n_images={r['n_images']} clean_acc={r['clean_acc']} robust_acc={r['robust_acc']} device={r.get('device')}")
        assert r["n_images"] == n
        for key in ("clean_acc", "robust_acc"):  # percentages
            assert 0.0 <= r[key] / 100 <= 1.0, (key, r[key])
        assert json.loads((sweep / job / "job_status.json").read_text())["status"] == "done"


def test_failed_and_cancelled_slurm_jobs_are_listed_and_a_rerun_does_only_what_is_missing(slurm_cluster, job_env, tmp_path):
    """Four jobs, one at a time (array_parallelism=1): #0 succeeds, #1 fails inside Python (a bad eval_subset), #2 is
    cancelled by scancel while RUNNING and #3 while PENDING, so neither writes a result (without sacct, plain submitit
    would wait for them forever). The sweep ends with the three listed and exit 1; a rerun into the same folder skips
    #0, fails #1 again and runs #2 and #3."""
    name = f"pb-test-{uuid.uuid4().hex[:8]}"
    sweep = tmp_path / "sweep"
    argv = evaluate_argv(sweep, "dataset.eval_subset=8,-5,16,24", "hydra/launcher=slurm_local",
                         f"hydra.launcher.name={name}", "hydra.launcher.array_parallelism=1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env, cwd=tmp_path)
    cancelled: dict[str, str] = {}  # task → the state it was cancelled in
    deadline = time.time() + 400
    while len(cancelled) < 2 and time.time() < deadline and proc.poll() is None:
        lines = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i %T"], capture_output=True, text=True).stdout
        for job_id, state in (line.split() for line in lines.splitlines()):
            task = job_id.rsplit("_", 1)[-1]
            if task in cancelled:
                continue
            if (task == "3" and state == "PENDING") or (task == "2" and state == "RUNNING"):
                subprocess.run(["scancel", job_id], check=True)
                cancelled[task] = f"{job_id} {state}"
        time.sleep(0.5)
    out, err = proc.communicate(timeout=600)
    print(f"$ {' '.join(argv[1:])}\n(exit {proc.returncode}, cancelled {cancelled})\n{err[-2500:]}\n{cluster_view(name)}")
    assert set(cancelled) == {"2", "3"}, cancelled
    assert proc.returncode == 1, err[-4000:]
    summary = err[err.index("multirun: "):].splitlines()
    assert summary[0].startswith("multirun: 3 of 4 jobs FAILED (1 done)"), summary
    assert summary[1].startswith("  #1 ") and "dataset.eval_subset=-5: error: eval_subset must be" in summary[1], summary
    running, pending = cancelled["2"].split()[0], cancelled["3"].split()[0]
    # Cancelled while running: squeue still lists it, CANCELLED; cancelled while pending: Slurm drops the task at once.
    assert summary[2].startswith("  #2 ") and f"dataset.eval_subset=16: slurm job {running} ended CANCELLED without a result" in summary[2], summary
    assert summary[3].startswith("  #3 ") and f"dataset.eval_subset=24: slurm job {pending} " in summary[3], summary
    assert "without a result" in summary[3], summary
    assert read_result(sweep / "0")["n_images"] == 8
    for job in ("2", "3"):
        assert json.loads((sweep / job / "job_status.json").read_text())["status"] == "failed"
        assert "without a result" in (sweep / job / "error.txt").read_text()

    # The rerun: #0 skipped (its results.json untouched), #1 fails again, #2 and #3 run now.
    stamp = (sweep / "0" / "results.json").stat().st_mtime_ns
    again = subprocess.run(argv, capture_output=True, text=True, env=job_env, cwd=tmp_path, timeout=800)
    print(f"rerun (exit {again.returncode}):\n{again.stderr[-1500:]}")
    assert again.returncode == 1, again.stderr[-4000:]
    assert "multirun: 1 of 4 jobs FAILED (3 done)" in again.stderr
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == stamp
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*_0/*_0_0_log.out"))
    assert "skipped: " in logs
    assert read_result(sweep / "2")["n_images"] == 16 and read_result(sweep / "3")["n_images"] == 24
