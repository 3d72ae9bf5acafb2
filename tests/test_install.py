"""The install traps the Makefile solves stay solved (a fresh `make install` must pass these)."""
from __future__ import annotations

import importlib.metadata as md

from packaging.version import Version


def test_requests_not_downgraded_by_torchattacks_pin():
    # torchattacks 3.5.1 declares requests~=2.25.1; `make install` installs it with --no-deps.
    assert Version(md.version("requests")) >= Version("2.32")
    import torchattacks

    assert Version(torchattacks.__version__) >= Version("3.5.1")


def test_robustbench_imports_with_pkg_resources_and_autoattack_alias():
    assert Version(md.version("setuptools")) < Version("81")  # robustbench 1.1.1 imports pkg_resources
    from models.robustbench_compat import import_robustbench

    rb = import_robustbench()
    import autoattack
    import pyautoattack

    assert autoattack is pyautoattack and hasattr(rb, "load_model")
