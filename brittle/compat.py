"""Importing RobustBench 1.1.1 as published on the package registry.

Two packaging problems stop ``import robustbench`` from working out of the box:

* ``robustbench.loaders`` imports ``pkg_resources``, which setuptools 81 removed;
  brittle's dependencies pin ``setuptools<81`` for that reason.
* ``robustbench.eval`` imports the ``autoattack`` module, but the dependency
  RobustBench installs (``pyautoattack``) ships the same code as ``pyautoattack``.
  ``import_robustbench`` registers that package under the old name first.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

__all__ = ["import_robustbench"]


def _alias_autoattack() -> None:
    if "autoattack" in sys.modules:
        return
    try:
        importlib.import_module("autoattack")
        return
    except ImportError:
        pass
    package = importlib.import_module("pyautoattack")
    sys.modules["autoattack"] = package
    for name in ("state", "autoattack", "checks", "other_utils"):
        try:
            sys.modules[f"autoattack.{name}"] = importlib.import_module(f"pyautoattack.{name}")
        except ImportError:
            continue


def import_robustbench() -> ModuleType:
    """Import and return ``robustbench`` with the fixes above applied.

    Examples:
        >>> from brittle.compat import import_robustbench
        >>> rb = import_robustbench()
        >>> callable(rb.utils.load_model)
        True
    """
    _alias_autoattack()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        robustbench = importlib.import_module("robustbench")
        importlib.import_module("robustbench.utils")
    return robustbench
