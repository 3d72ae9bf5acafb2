"""Command-line guard rails shared by train.py and evaluate.py.

Hydra reports an unknown group option with a multi-line message (and a stack trace for errors
raised inside ``instantiate``). Users asked for one line that names the valid choices, and for
bad input (missing data, corrupt checkpoint, wrong shape) to fail with its own message only.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Sequence

from hydra.errors import InstantiationException

from evaluation.multirun import in_multirun
from models.weights import CheckpointError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


#: Exceptions that mean "your input is wrong", not "the code is broken".
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, ValueError, CheckpointError)


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Option names of a config group, nested ones included relative to it (``table3/diffdefense_l5r1``)."""
    folder = conf_dir / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")) if folder.is_dir() else []


def check_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise ``UserError`` for ``group=value`` overrides naming a config that does not exist.

    Handles multirun lists (``attack=fgsm,pgd``) and Hydra's ``+``/``~`` prefixes; groups that
    plugins provide (``hydra/launcher=submitit_slurm``) are left to Hydra.
    """
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if "." in key or key.startswith("hydra") or not (conf_dir / key).is_dir():
            continue
        valid = group_options(key, conf_dir)
        for choice in value.split(","):
            choice = choice.strip()
            if choice in ("", "null") or choice.startswith(("choice(", "range(", "glob(")):
                continue
            if choice not in valid:
                raise UserError(f"unknown {key} {choice!r}; valid {key} names: {', '.join(valid)}")


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap Hydra's InstantiationException to the error the constructor raised."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def report_user_errors(fn: Callable) -> Callable:
    """Run ``fn``; a user error becomes ``error: <message>`` on stderr and exit status 2.

    Not inside a multirun job: there ``sys.exit`` would end the whole sweep (the local launcher runs every job in
    this process, and ``SystemExit`` passes through Hydra's ``run_job``), so the error is re-raised for Hydra to
    record and ``evaluation.multirun.JobSummary`` to report in one line when the other jobs have run.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is the user's input
            cause = root_cause(exc)
            if isinstance(cause, USER_ERRORS) and not in_multirun():
                print(f"error: {cause}", file=sys.stderr)
                sys.exit(2)
            raise

    return wrapper


def guard_command_line(argv: Sequence[str] | None = None) -> None:
    """Validate ``sys.argv`` before Hydra parses it; exit 2 with one line on an unknown option."""
    try:
        check_overrides(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
