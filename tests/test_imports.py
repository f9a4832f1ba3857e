"""Imports follow use: serving loads no offline library, a server of ONNX files no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "sklearn", "torchattacks", "onnx", "onnxruntime", "robustbench", "matplotlib")


def _loaded(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=True,
    ).stdout.split()
    return set(out)


def test_serving_path_loads_no_offline_library() -> None:
    loaded = _loaded(
        "import torch, brittle\n"
        "model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
        "monitor = brittle.wrap(model, score='feature', norm='L2')\n"
        "monitor.set_threshold(0.1)\n"
        "monitor(torch.rand(4, 1, 4, 4))\n"
    )
    assert "brittle.monitor" in loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert (
        not {
            "brittle.attacks.attack",
            "brittle.calibrate.fit",
            "brittle.calibrate.metrics",
            "brittle.calibrate.report",
        }
        & loaded
    )


def test_import_brittle_alone_loads_nothing_heavy() -> None:
    loaded = _loaded("import brittle")
    assert "torch" not in loaded and not loaded & set(HEAVY)


def test_onnx_monitor_needs_no_torch() -> None:
    loaded = _loaded("import brittle.deploy.onnx_monitor")
    assert "torch" not in loaded and "numpy" in loaded


def test_every_public_name_is_listed_by_dir_and_a_dotted_name_is_an_attribute_error() -> None:
    # dir(brittle) left out brittle.functional (in __all__, but a submodule rather than
    # a name of _WHERE) until its first use, and getattr(brittle, "a.b", None) raised
    # ModuleNotFoundError instead of returning the default.
    code = (
        "import brittle, brittle.attacks, brittle.calibrate, brittle.deploy, brittle.scores\n"
        "packages = [brittle, brittle.attacks, brittle.calibrate, brittle.deploy, brittle.scores]\n"
        "missing = [(p.__name__, n) for p in packages for n in p.__all__ if n not in dir(p)]\n"
        "assert not missing, missing\n"
        "assert getattr(brittle, 'no_such.module', None) is None\n"
        "assert not hasattr(brittle.attacks, 'fab.x')\n"
        "names = {}\n"
        "exec('from brittle import *', names)\n"
        "assert set(brittle.__all__) <= set(names), set(brittle.__all__) - set(names)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120, check=True)
