"""The W&B sweeps (``sweep.yaml``, ``sweeps/*.yaml``) without a W&B server: check them and run them as Hydra multiruns.

``wandb sweep`` registers the sweep with a W&B server and ``wandb agent`` asks that server for each run's parameters;
``WANDB_MODE=offline`` only affects the runs' own logging, so neither command can work on a machine without a server
(here: "No API key configured", and with a key "Failed to verify credentials with <base url>"). What the agent would
do is, however, fully determined by the file for ``method: grid``: run ``command`` with ``${args_no_hyphens}``
replaced by one ``key=value`` per parameter, for every point of the grid. This module does exactly that expansion:

    python -m evaluation.wandb_sweep sweep.yaml --check    # every parameter value composed by Hydra; split pinned to val
    python -m evaluation.wandb_sweep sweep.yaml            # the agent's first command and the equivalent multirun

``--check`` composes ``evaluate``'s config with the command's pinned overrides and each parameter value in turn, so a
parameter that names no config key, a value Hydra cannot take, or a command that does not pin
``dataset.eval_split=val`` (tuning must never read the test set) fails here, not hours into an agent's queue. The
equivalent multirun (``evaluate.py -m <pinned> key=v1,v2,…``) runs the same grid through Hydra's launchers; its
results aggregate with ``make tables``, each job also an offline W&B run (``logger=wandb``, ``wandb sync`` later).
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
#: W&B's command macros that are not arguments of the program.
_LAUNCH_MACROS = {"${env}": "/usr/bin/env", "${interpreter}": "python"}
#: The one split a tuning sweep may read (conf/dataset/*.yaml: eval_split).
TUNING_SPLIT = "val"


class SweepError(ValueError):
    """A sweep file that W&B or Hydra would reject, or that would tune on the test split: one line."""


def load_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep file as a dict, with the keys every check below relies on."""
    sweep = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(sweep, dict):
        raise SweepError(f"{path}: not a W&B sweep (a YAML mapping)")
    missing = [k for k in ("program", "method", "metric", "parameters", "command") if k not in sweep]
    if missing:
        raise SweepError(f"{path}: missing {', '.join(missing)}")
    return sweep


def parameter_values(sweep: dict[str, Any]) -> dict[str, list[Any]]:
    """{parameter: its values}: ``values: [...]`` or a fixed ``value: x`` (a grid takes no distributions)."""
    found: dict[str, list[Any]] = {}
    for name, spec in sweep["parameters"].items():
        if isinstance(spec, dict) and "values" in spec:
            found[name] = list(spec["values"])
        elif isinstance(spec, dict) and "value" in spec:
            found[name] = [spec["value"]]
        else:
            raise SweepError(f"parameter {name!r}: a grid sweep needs `values: [...]` or `value: x`, got {spec!r}")
    return found


def grid(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of the grid, in W&B's order (the cartesian product of the parameters as listed)."""
    values = parameter_values(sweep)
    return [dict(zip(values, point)) for point in itertools.product(*values.values())]


def _value(v: Any) -> str:
    """A parameter value as W&B writes it on the command line (``key=value``; booleans lower-case as YAML reads them)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def expand_command(sweep: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """The argv an agent runs for ``point``: W&B's macros replaced (``${program}``, ``${args_no_hyphens}`` …)."""
    argv: list[str] = []
    for item in sweep["command"]:
        if item in _LAUNCH_MACROS:
            argv.append(_LAUNCH_MACROS[item])
        elif item == "${program}":
            argv.append(str(sweep["program"]))
        elif item == "${args_no_hyphens}":
            argv += [f"{k}={_value(v)}" for k, v in point.items()]
        elif item == "${args}":
            argv += [f"--{k}={_value(v)}" for k, v in point.items()]
        else:
            argv.append(str(item))
    return argv


def pinned_overrides(sweep: dict[str, Any]) -> list[str]:
    """The command's fixed Hydra overrides (what is neither a macro nor the program)."""
    macros = set(_LAUNCH_MACROS) | {"${program}", "${args_no_hyphens}", "${args}"}
    return [str(item) for item in sweep["command"] if item not in macros]


def multirun_command(sweep: dict[str, Any]) -> list[str]:
    """The same grid as one Hydra multirun of ``evaluate.py`` (the launcher decides where the jobs run). The sweep's
    ``logger.wandb.mode=online`` (an agent's run must reach its server) is dropped: the W&B logger's default,
    offline, is what a machine without a server can write."""
    values = parameter_values(sweep)
    pinned = [o for o in pinned_overrides(sweep) if not o.startswith("logger.wandb.mode=")]
    return ["python", str(sweep["program"]), "-m", *pinned,
            *(f"{k}={','.join(_value(v) for v in vs)}" for k, vs in values.items())]


def check(sweep: dict[str, Any], conf_dir: Path = CONF_DIR) -> int:
    """Compose ``evaluate`` with the pinned overrides and grid points that between them hold every value of every
    parameter (point i takes each parameter's i-th value, its last when it has fewer); raise ``SweepError`` for
    anything W&B's agent would run into. Returns the number of compositions (composing reads the config files only:
    no data, weights or output folder is touched)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if "${args_no_hyphens}" not in sweep["command"]:
        raise SweepError("command must pass the parameters as Hydra overrides: ${args_no_hyphens}")
    if Path(str(sweep["program"])).name != "evaluate.py" or sweep["method"] != "grid":
        raise SweepError(f"expected program evaluate.py and method grid, got {sweep['program']!r} / {sweep['method']!r}")
    values = parameter_values(sweep)
    split_keys = [k for k in values if k.endswith("eval_split")]
    if split_keys or f"dataset.eval_split={TUNING_SPLIT}" not in pinned_overrides(sweep):
        raise SweepError(f"a tuning sweep must pin dataset.eval_split={TUNING_SPLIT} in its command and never sweep it "
                         f"(never tune on test); found parameters {split_keys or 'none'}")
    pinned = pinned_overrides(sweep)
    n_points = max(map(len, values.values()))
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for i in range(n_points):
            point = {k: vs[min(i, len(vs) - 1)] for k, vs in values.items()}
            args = " ".join(f"{k}={_value(v)}" for k, v in point.items())
            try:
                cfg = compose("evaluate", pinned + [f"{k}={_value(v)}" for k, v in point.items()])
            except (HydraException, OmegaConfBaseException) as e:
                raise SweepError(f"{args}: Hydra rejects it: {str(e).splitlines()[0]}") from e
            for name, v in point.items():
                if (conf_dir / name).is_dir():  # a config group: the chosen option's name
                    got = OmegaConf.select(cfg, f"{name}.name")
                else:
                    got = OmegaConf.select(cfg, name, throw_on_missing=False)
                if str(got) != _value(v) and got != v:
                    raise SweepError(f"{name}={_value(v)} composes to {got!r}: the parameter does not reach the config")
            if cfg.dataset.eval_split != TUNING_SPLIT:
                raise SweepError(f"{args} evaluates on dataset.eval_split={cfg.dataset.eval_split}, not {TUNING_SPLIT}")
    return n_points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default=str(ROOT / "sweep.yaml"), help="sweep file (default: sweep.yaml)")
    parser.add_argument("--check", action="store_true", help="compose every parameter value with Hydra")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        points = grid(sweep)
        checked = check(sweep) if args.check else None
    except (SweepError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.sweep}: {sweep['method']} over {len(points)} runs, metric {sweep['metric']['name']} ({sweep['metric'].get('goal')})")
    if checked is not None:
        print(f"checked: {checked} compositions hold every parameter value; each reaches evaluate's config; split pinned to {TUNING_SPLIT}")
    print("agent's first run:   " + shlex.join(expand_command(sweep, points[0])))
    print("as a Hydra multirun: " + shlex.join(multirun_command(sweep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
