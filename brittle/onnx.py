"""The fitted monitor as one ONNX graph, and ``OnnxMonitor`` to serve it with onnxruntime.

``export_onnx`` writes ``input -> logits, pred, margin, flag`` for every
score kind (logit margin, exact feature margin with its pair-norm table baked
in as a constant, pseudo-margin MLP), with the fail-closed rule inside the
graph and the calibration figures in the file's ``metadata_props``.
``OnnxMonitor`` runs such a file with onnxruntime on numpy arrays; the file
itself needs nothing from brittle or PyTorch, so a server that must not import
torch can open it with a plain ``onnxruntime.InferenceSession``
(``examples/deploy_onnx.py``).

Typical use: ``monitor.export_onnx("monitor.onnx", example_batch)`` next to the
model's training code, then ``brittle.OnnxMonitor("monitor.onnx")(batch)`` (or a
plain ``onnxruntime.InferenceSession``) in the serving process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from brittle._modes import eval_mode
from brittle.errors import NotFittedError
from brittle.head import NO_HEAD_HINT
from brittle.output import MonitorOutput

if TYPE_CHECKING:
    from brittle.monitor import Monitor, ScoreKind

__all__ = ["export_onnx", "OnnxMonitor", "INPUT_NAME", "OUTPUT_NAMES", "DEFAULT_OPSET"]

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "pred", "margin", "flag")
# The dynamo exporter's own default; 17 is the oldest opset the design promises.
DEFAULT_OPSET = 18
MIN_OPSET = 17

# onnxruntime's type strings for the input dtypes a monitor can be exported with.
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
}


class _MonitorGraph(nn.Module):
    """What ``Monitor.forward`` computes, minus the Python-side input checks.

    The checks (rank, dtype, device, empty batch) are branches on Python values
    that a graph cannot keep; ``OnnxMonitor`` performs them before calling
    onnxruntime. Everything else goes through the monitor's own ``_run``,
    ``_score`` and ``_finish``, so the graph and the PyTorch module share one
    functional core (``brittle.margins``, ``PseudoMargin``).
    """

    def __init__(self, monitor: Monitor, kind: ScoreKind) -> None:
        super().__init__()
        self.monitor = monitor
        self.kind: ScoreKind = kind

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        monitor = self.monitor
        run = monitor._run(x)
        margin, flag = monitor._finish(monitor._score(self.kind, run), run.bad)
        if flag is None:  # export_onnx checked the threshold; this keeps the type exact
            raise NotFittedError("the monitor lost its threshold during export.")
        logits = run.logits.masked_fill(run.bad[:, None], math.nan)
        pred = run.logits.argmax(dim=1).masked_fill(run.bad, -1)
        return logits, pred, margin, flag


def _check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}. Got {opset!r}.")
    return opset


def _fmt(value: float | None) -> str:
    # repr() round-trips a Python float exactly; operators read "none" for missing values.
    return "none" if value is None or not math.isfinite(value) else repr(float(value))


def _metadata(monitor: Monitor, kind: ScoreKind) -> dict[str, str]:
    """Build the string key/value pairs stored in the file's ``metadata_props``."""
    from brittle import __version__

    meta = {
        "brittle_version": __version__,
        "score": kind,
        "threshold": _fmt(float(monitor.threshold)),
        "eps": _fmt(monitor.eps),
        "norm": monitor.norm,
        "num_classes": str(monitor.num_classes),
        "input_shape": json.dumps(["batch", *(monitor.input_shape or ())]),
        "fitted": str(monitor.is_fitted).lower(),
        "target_tpr": "none",
    }
    # Read the attribute rather than the property: a threshold set by hand
    # (set_threshold) is exportable and simply has no report to describe.
    report = monitor._report
    if report is None:
        return meta
    meta.update(
        {
            "target_tpr": _fmt(report.target_tpr),
            "calibration_tpr": _fmt(report.tpr),
            "calibration_fpr": _fmt(report.fpr),
            "n": str(report.n),
            "accuracy": _fmt(report.accuracy),
            "nonrobust_fraction": _fmt(report.nonrobust_fraction),
            "censored": str(report.censored),
            "chosen": report.chosen,
            "reason": report.reason,
            "metrics": json.dumps({name: m.to_dict() for name, m in report.metrics.items()}),
        }
    )
    metrics = report.metrics.get(kind)
    if metrics is not None:
        meta.update(
            {
                "tau": _fmt(metrics.tau),
                "tau_ci": json.dumps([_fmt(v) for v in metrics.tau_ci]),
                "auroc": _fmt(metrics.auroc),
                "aupr": _fmt(metrics.aupr),
                "fpr_at_tpr": _fmt(metrics.fpr_at_tpr),
            }
        )
    return meta


def export_onnx(
    monitor: Monitor,
    path: str | Path,
    example_input: Tensor,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write a monitor with a threshold as one ONNX graph: input -> logits, pred, margin, flag.

    The graph has input ``input`` of shape ``(batch, ...)`` and outputs ``logits``
    ``(batch, K)``, ``pred`` ``(batch,)`` int64 (``-1`` where the input could not
    be judged), ``margin`` ``(batch,)`` of the active score kind and ``flag``
    ``(batch,)`` bool. A sample containing NaN or Inf gets NaN logits and margin
    and flag True inside the graph, as in PyTorch. The file passes
    ``onnx.checker`` and carries the calibration in ``metadata_props``.

    Args:
        monitor: A ``Monitor`` with a threshold (fitted, or
            ``set_threshold`` called).
        path: Destination ``.onnx`` file; parent folders are created.
        example_input: A non-empty batch of the model's input shape, dtype and device.
        opset: ONNX opset version, at least 17 (default 18).
        dynamic_batch: Keep the batch axis symbolic; with ``False`` the graph only
            accepts the example's batch size.

    Returns:
        The path written.

    Raises:
        NotFittedError: if the monitor has no threshold.
        ValueError: for a bad ``opset`` or ``example_input``, or a feature or
            pseudo score without a linear head.

    Examples:
        >>> import tempfile, torch, brittle
        >>> monitor = brittle.wrap(torch.nn.Linear(8, 4), score="feature", norm="L2", eps=0.1)
        >>> monitor.set_threshold(0.2)
        >>> folder = tempfile.mkdtemp()
        >>> path = brittle.onnx.export_onnx(monitor, folder + "/m.onnx", torch.rand(3, 8))
        >>> import onnx
        >>> [o.name for o in onnx.load(path).graph.output]
        ['logits', 'pred', 'margin', 'flag']

    """
    import onnx

    if not monitor.has_threshold:
        raise NotFittedError(
            "export_onnx needs a flag threshold: call monitor.fit(holdout_loader) "
            "(or monitor.set_threshold(value)) before exporting."
        )
    opset = _check_opset(opset)
    x = monitor._check_input(example_input)
    if x.shape[0] == 0:
        raise ValueError("example_input must hold at least one sample. Got an empty batch.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), eval_mode(monitor):
        if not monitor.discovered:
            monitor(x)  # finds the head and records the input shape
        kind = monitor.score
        if kind != "logit" and monitor.head is None:
            raise ValueError(f"score={kind!r} needs the model's last linear layer. {NO_HEAD_HINT}")
        if kind == "feature" and monitor.pair_norms.numel() == 0:
            # Without the table the margin needs torch.cdist, which the ONNX
            # exporter cannot translate, and a (K, K) constant of this size would
            # not fit in an ONNX file either.
            raise ValueError(
                f"the exact feature margin of a {monitor.num_classes}-class head has no "
                "precomputed pair-norm table (too large), so it cannot be exported to ONNX. "
                "Export with brittle.wrap(model, score='logit') or score='pseudo' instead."
            )
        if dynamic_batch and x.shape[0] < 2:
            # torch.export specialises a dimension whose example size is 1, which
            # would make the batch axis static; two copies keep it symbolic.
            x = x[:1].repeat(2, *([1] * (x.dim() - 1)))
        # The dynamo exporter (torch.export, non-strict) runs the Python forward, so
        # the head's forward hook, which lives only during the call, fires while
        # tracing and hands the traced features to the margin code: no second
        # implementation of feature capture is needed for the graph.
        program = torch.onnx.export(
            _MonitorGraph(monitor, kind).eval(),
            (x,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
            verbose=False,
            optimize=True,
        )
    if program is None:  # only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export returned no ONNX program.")
    program.model.metadata_props.update(_metadata(monitor, kind))
    program.save(path)
    # A path (not a loaded proto) lets the checker handle files with external data.
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _has_nvidia_gpu() -> bool:
    # onnxruntime-gpu lists the CUDA provider even on machines without a GPU, and
    # asking for it there prints a loader error before falling back to the CPU.
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def _default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and _has_nvidia_gpu():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxMonitor:
    """Serve a file written by ``export_onnx`` with onnxruntime and numpy.

    Args:
        path: The ``.onnx`` file.
        providers: onnxruntime execution providers, in order of preference. By
            default the CUDA provider when a GPU is present, else the CPU provider.
        session_options: Optional ``onnxruntime.SessionOptions`` (threads, graph
            optimisation level) for the session.

    Attributes:
        session: The ``onnxruntime.InferenceSession``.
        metadata: The file's ``metadata_props`` (brittle version, score, threshold,
            eps, norm, target TPR and, for fitted monitors, the consistency figures).
        input_shape: Expected input shape, ``None`` for the dynamic batch axis.
        dtype: Expected input dtype.

    Examples:
        >>> import tempfile, numpy as np, torch, brittle
        >>> monitor = brittle.wrap(torch.nn.Linear(8, 4), eps=0.1)
        >>> monitor.set_threshold(0.5)
        >>> path = monitor.export_onnx(tempfile.mkdtemp() + "/m.onnx", torch.rand(2, 8))
        >>> served = brittle.OnnxMonitor(path)
        >>> served(np.full((1, 8), np.nan, dtype=np.float32)).flag
        array([ True])
        >>> served(np.zeros((1, 9), dtype=np.float32))
        Traceback (most recent call last):
        ...
        ValueError: input must have shape (batch, 8). Got (1, 9).

    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        *,
        session_options: Any | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {str(path)!r}.")
        if isinstance(providers, str):
            raise ValueError(f"providers must be a list of provider names. Got {providers!r}.")
        chosen = list(providers) if providers is not None else _default_providers()
        self.path = path
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options, providers=chosen
        )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = tuple(o.name for o in outputs)
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or names != OUTPUT_NAMES:
            raise ValueError(
                f"{str(path)!r} is not a brittle monitor graph: expected input {INPUT_NAME!r} "
                f"and outputs {list(OUTPUT_NAMES)}. "
                f"Got {[i.name for i in inputs]} and {list(names)}."
            )
        if inputs[0].type not in _ORT_DTYPES:
            raise ValueError(f"unsupported input type {inputs[0].type} in {str(path)!r}.")
        self.dtype: np.dtype[Any] = _ORT_DTYPES[inputs[0].type]
        self.input_shape: tuple[int | None, ...] = tuple(
            d if isinstance(d, int) else None for d in inputs[0].shape
        )
        k = outputs[0].shape[1]
        self.num_classes: int | None = k if isinstance(k, int) else None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return list(self.session.get_providers())

    @property
    def threshold(self) -> float:
        """Flag threshold the file was exported with."""
        return float(self.metadata.get("threshold", "nan"))

    @property
    def score(self) -> str | None:
        """Score kind of the ``margin`` output."""
        return self.metadata.get("score")

    def _expected(self) -> str:
        dims = ", ".join("batch" if d is None else str(d) for d in self.input_shape)
        return f"({dims})"

    def _check(self, x: Any) -> np.ndarray:
        expected = f"{self._expected()} {self.dtype}"
        if not isinstance(x, np.ndarray):
            raise ValueError(
                f"input must be a numpy array of shape {expected}. Got {type(x).__name__}."
            )
        if x.dtype != self.dtype:
            raise ValueError(f"input must have dtype {self.dtype}. Got {x.dtype}.")
        if x.ndim != len(self.input_shape) or any(
            want is not None and got != want
            for got, want in zip(x.shape, self.input_shape, strict=True)
        ):
            raise ValueError(f"input must have shape {self._expected()}. Got {tuple(x.shape)}.")
        return np.ascontiguousarray(x)

    def __call__(self, x: np.ndarray) -> MonitorOutput:
        """Logits, prediction, margin and flag for a batch.

        Args:
            x: ``(B, ...)`` array of the exported input shape and dtype.

        Returns:
            ``MonitorOutput`` of numpy arrays; ``flag`` is bool.

        Raises:
            ValueError: if ``x`` is not an array of the expected rank, shape and dtype.

        """
        x = self._check(x)
        if x.shape[0] == 0:
            k = self.num_classes or 0
            return MonitorOutput(
                np.empty((0, k), self.dtype),
                np.empty(0, np.int64),
                np.empty(0, self.dtype),
                np.empty(0, bool),
            )
        logits, pred, margin, flag = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return MonitorOutput(logits, pred, margin, flag.astype(bool, copy=False))

    def __repr__(self) -> str:
        return (
            f"OnnxMonitor({str(self.path)!r}, score={self.score!r}, "
            f"threshold={self.metadata.get('threshold')}, providers={self.providers})"
        )
