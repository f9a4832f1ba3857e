"""brittle: per-sample brittleness monitoring for PyTorch classifiers.

``brittle.wrap(model)`` returns an ``nn.Module`` that emits, in the same forward
pass as the logits, a margin score and a non-robust flag per sample.
``monitor.fit(loader)`` calibrates it offline against input margins from a
minimum-norm attack (FAB).

Names are imported on first use: ``import brittle`` loads nothing heavy, the
serving path (``wrap`` and a forward pass) loads torch and brittle's own small
modules only, and scipy, scikit-learn, tqdm and the attack and ONNX libraries
load where the offline work starts (``fit``, ``input_margins``, export). A
server of an exported monitor (``brittle.OnnxMonitor``, ``brittle.Telemetry``,
``python -m brittle.serve``) never imports torch.

Examples:
    >>> import torch, brittle
    >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), eps=0.1)
    >>> out = monitor(torch.rand(2, 4))
    >>> out.margin.shape
    torch.Size([2])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brittle import functional
    from brittle.alarm import FlagRateAlarm
    from brittle.attack import input_margins
    from brittle.calibration import Calibration
    from brittle.errors import NotFittedError
    from brittle.loading import load
    from brittle.metrics import ScoreMetrics
    from brittle.monitor import Monitor, MonitorPass, wrap
    from brittle.onnx_monitor import OnnxMonitor
    from brittle.output import MonitorOutput
    from brittle.report import ConsistencyReport
    from brittle.telemetry import Telemetry

__version__ = "0.1.0"

# Public name -> module that defines it.
_WHERE = {
    "wrap": "brittle.monitor",
    "Monitor": "brittle.monitor",
    "MonitorPass": "brittle.monitor",
    "load": "brittle.loading",
    "MonitorOutput": "brittle.output",
    "NotFittedError": "brittle.errors",
    "Calibration": "brittle.calibration",
    "OnnxMonitor": "brittle.onnx_monitor",
    "ConsistencyReport": "brittle.report",
    "ScoreMetrics": "brittle.metrics",
    "input_margins": "brittle.attack",
    "Telemetry": "brittle.telemetry",
    "FlagRateAlarm": "brittle.alarm",
}
_SUBMODULES = ("functional", "analyses", "onnx", "fit", "evaluate", "fab", "attack", "digits")

__all__ = [
    "wrap",
    "load",
    "Monitor",
    "MonitorPass",
    "MonitorOutput",
    "OnnxMonitor",
    "Telemetry",
    "FlagRateAlarm",
    "Calibration",
    "ConsistencyReport",
    "ScoreMetrics",
    "NotFittedError",
    "input_margins",
    "functional",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"brittle.{name}")
    else:
        raise AttributeError(f"module 'brittle' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
