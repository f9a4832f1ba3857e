"""brittle: per-sample brittleness monitoring for PyTorch classifiers.

``brittle.wrap(model)`` returns an ``nn.Module`` that emits, in the same forward
pass as the logits, a margin score and a non-robust flag per sample.
``monitor.fit(loader)`` calibrates it offline against input margins from the
FAB minimum-norm attack.

Examples:
    >>> import torch, brittle
    >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), eps=0.1)
    >>> out = monitor(torch.rand(2, 4))
    >>> out.margin.shape
    torch.Size([2])
"""

from brittle import functional
from brittle.attack import input_margins
from brittle.errors import NotFittedError
from brittle.io import load
from brittle.metrics import ScoreMetrics
from brittle.monitor import Monitor, wrap
from brittle.onnx import OnnxMonitor
from brittle.output import MonitorOutput
from brittle.report import ConsistencyReport

__version__ = "0.1.0"

__all__ = [
    "wrap",
    "load",
    "Monitor",
    "MonitorOutput",
    "OnnxMonitor",
    "ConsistencyReport",
    "ScoreMetrics",
    "NotFittedError",
    "input_margins",
    "functional",
    "__version__",
]
