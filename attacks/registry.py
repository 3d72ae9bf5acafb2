"""The attack configs in ``conf/attack`` without a full Hydra run (tests, notebooks, quick checks).

``evaluate.py`` composes ``attack=<name>`` through Hydra as usual; this module only loads one
``conf/attack/<name>.yaml`` on its own, resolving its ``${dataset.…}`` interpolations from the
values given here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf

from attacks.base import Attack

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "attack"


def available() -> list[str]:
    """Names of all attack configs (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def attack_config(
    name: str,
    eps_linf: float = 0.3,
    eps_l2: float = 1.5,
    num_classes: int = 10,
    builder_overrides: dict[str, Any] | None = None,
) -> DictConfig:
    """``conf/attack/<name>.yaml`` with the dataset values it interpolates and optional builder overrides."""
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(available())}")
    root = OmegaConf.merge(
        {"dataset": {"eps": {"linf": eps_linf, "l2": eps_l2}, "num_classes": num_classes}},
        {"attack": OmegaConf.load(path)},
    )
    for key, value in (builder_overrides or {}).items():
        if key not in root.attack.builder:
            raise KeyError(f"attack {name!r}: builder has no argument {key!r}")
        root.attack.builder[key] = value
    return root.attack


def load_attack(name: str, **kwargs: Any) -> Attack:
    """Instantiate ``conf/attack/<name>.yaml`` (see ``attack_config`` for the arguments)."""
    return hydra.utils.instantiate(attack_config(name, **kwargs))
