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

from typing import TYPE_CHECKING

from brittle.lazy import lazy_exports

if TYPE_CHECKING:
    from brittle import functional
    from brittle.attacks.attack import input_margins
    from brittle.calibrate.calibration import Calibration
    from brittle.calibrate.metrics import ScoreMetrics
    from brittle.calibrate.report import ConsistencyReport
    from brittle.deploy.alarm import FlagRateAlarm
    from brittle.deploy.onnx_monitor import OnnxMonitor
    from brittle.deploy.telemetry import Telemetry
    from brittle.errors import CalibrationError, NotFittedError
    from brittle.loading import load
    from brittle.monitor import Monitor, MonitorPass, wrap
    from brittle.output import MonitorOutput

__version__ = "0.1.0"

# Public name -> module that defines it.
_WHERE = {
    "wrap": "brittle.monitor",
    "Monitor": "brittle.monitor",
    "MonitorPass": "brittle.monitor",
    "load": "brittle.loading",
    "MonitorOutput": "brittle.output",
    "NotFittedError": "brittle.errors",
    "CalibrationError": "brittle.errors",
    "Calibration": "brittle.calibrate.calibration",
    "OnnxMonitor": "brittle.deploy.onnx_monitor",
    "ConsistencyReport": "brittle.calibrate.report",
    "ScoreMetrics": "brittle.calibrate.metrics",
    "input_margins": "brittle.attacks.attack",
    "Telemetry": "brittle.deploy.telemetry",
    "FlagRateAlarm": "brittle.deploy.alarm",
}
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
    "CalibrationError",
    "input_margins",
    "functional",
    "__version__",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
