"""The one door through which the project imports RobustBench.

PyPI ``robustbench==1.1.1`` does ``from autoattack import AutoAttack`` (and ``autoattack.state``) at
import time, but its PyPI dependency ``pyautoattack`` installs that code as the package
``pyautoattack``. Without an alias, ``import robustbench`` fails with ``No module named 'autoattack'``.
We alias it here, once, rather than sprinkling ``sys.modules`` hacks through the code base; the alias is
only installed when no real ``autoattack`` (e.g. a git install of fra31/auto-attack) is importable, so
such an install always wins. RobustBench also imports ``pkg_resources`` (setuptools<81, pinned in
pyproject.toml).
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from types import ModuleType

# pyautoattack submodules that import TensorFlow (helpers for TF models); the project never uses them,
# and importing them would either fail or load TensorFlow for nothing.
_TENSORFLOW_ONLY = frozenset({"utils_tf", "utils_tf2"})


def _alias_pyautoattack() -> None:
    """Make ``autoattack`` and ``autoattack.<sub>`` resolve to ``pyautoattack`` and its submodules."""
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    package = importlib.import_module("pyautoattack")
    sys.modules["autoattack"] = package
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _TENSORFLOW_ONLY:
            continue
        sys.modules[f"autoattack.{info.name}"] = importlib.import_module(f"pyautoattack.{info.name}")


def import_robustbench(submodule: str | None = None) -> ModuleType:
    """Import ``robustbench`` (or ``robustbench.<submodule>``) after aliasing ``autoattack``.

    Use ``import_robustbench("model_zoo.architectures.resnet")`` instead of a plain
    ``from robustbench... import ...`` so that the alias is always in place first.
    """
    _alias_pyautoattack()
    module = importlib.import_module("robustbench")
    if submodule:
        module = importlib.import_module(f"robustbench.{submodule}")
    return module
