"""Production: ONNX export, the ONNX monitor, telemetry, the flag-rate alarm and the server.

The serving path (``OnnxMonitor``, ``Telemetry``, ``FlagRateAlarm``, ``serve``)
imports neither torch nor ``brittle.attacks`` nor ``brittle.calibrate``; only the
export (``export_onnx``) needs torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brittle.lazy import lazy_exports

if TYPE_CHECKING:
    from brittle.deploy.alarm import AlarmState, FlagRateAlarm
    from brittle.deploy.onnx import export_onnx
    from brittle.deploy.onnx_monitor import OnnxMonitor
    from brittle.deploy.telemetry import Telemetry, TelemetrySnapshot

_WHERE = {
    "export_onnx": "brittle.deploy.onnx",
    "OnnxMonitor": "brittle.deploy.onnx_monitor",
    "Telemetry": "brittle.deploy.telemetry",
    "TelemetrySnapshot": "brittle.deploy.telemetry",
    "FlagRateAlarm": "brittle.deploy.alarm",
    "AlarmState": "brittle.deploy.alarm",
}
__all__ = [
    "export_onnx",
    "OnnxMonitor",
    "Telemetry",
    "TelemetrySnapshot",
    "FlagRateAlarm",
    "AlarmState",
]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
