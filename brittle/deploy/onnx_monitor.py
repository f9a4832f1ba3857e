"""``OnnxMonitor``: a monitor exported by ``export_onnx``, served with onnxruntime and numpy.

This module imports neither torch nor anything of brittle that does, so a
server that loads it (``python -m brittle.serve``) keeps torch out of its
process.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brittle.arguments import are_bounds, is_range
from brittle.deploy.alarm import OLD_REFERENCE_WARNING, parse_reference
from brittle.output import MonitorOutput

__all__ = ["OnnxMonitor", "INPUT_NAME", "OUTPUT_NAMES"]

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "pred", "margin", "flag")
# onnxruntime's type strings for the input dtypes a monitor can be exported with.
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
}


def _has_nvidia_gpu() -> bool:
    # onnxruntime-gpu lists the CUDA provider even on machines without a GPU, and
    # asking for it there prints a loader error before falling back to the CPU.
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


# The metadata values OnnxMonitor parses (its properties of the same names).
# The name the exporter gives the monitor's threshold buffer in the graph.
_THRESHOLD_CONSTANT = "monitor.threshold"
_READ_METADATA = (
    "threshold",
    "reference_flag_rate",
    "reference_counts",
    "margin_buckets",
    "input_domain",
)


def _in_range(key: str, value: Any) -> bool:
    """Whether a parsed metadata value is one an export could have written."""
    if value is None:
        return True
    if key == "reference_flag_rate":
        return bool(0.0 <= value <= 1.0)
    if key == "reference_counts":  # the alarm's own check of counts (ValueError if bad)
        return isinstance(parse_reference(value), tuple)
    if key == "margin_buckets":
        # margin_buckets (brittle.deploy.telemetry) writes finite, strictly increasing bounds.
        return are_bounds(value)
    if key == "input_domain":
        low, high = value
        return is_range(low, high)
    return True


def _json_numbers(text: str, *, count: int | None = None, integers: bool = False) -> list[Any]:
    """A JSON list of numbers (of ``count`` entries, integers only when asked), as exported.

    Raises ``ValueError`` for anything else: a string, an object, booleans, or floats
    where counts belong (json reads ``"12"`` as a string whose characters are digits,
    and ``1.5`` or ``true`` would pass ``int()``).
    """
    value = json.loads(text)
    kinds: tuple[type, ...] = (int,) if integers else (int, float)
    if not isinstance(value, list) or (count is not None and len(value) != count):
        raise ValueError(f"expected a JSON list of {count or 'any number of'} numbers.")
    if any(isinstance(v, bool) or not isinstance(v, kinds) for v in value):
        raise ValueError("expected numbers only.")
    return value


def _graph_checks(path: Path) -> tuple[float | None, tuple[np.ndarray, np.ndarray] | None]:
    """What the graph does: the threshold it flags at and the input bounds it rejects outside.

    onnxruntime reads the graph's constants but does not show them; the metadata
    is what the file says, these are what it does. The threshold is the graph's
    ``monitor.threshold`` constant, ``None`` when it holds none (a float64 export
    folds it into a cast) or keeps it as external data. The bounds are the
    constant ``Clip`` of the input (``brittle.scores.finite.judged_rows``), as
    arrays of the input's dtype, ``None`` when the graph has no such node (no
    domain, or a brittle that tested the bounds otherwise). Both are ``None``
    when the onnx package cannot parse the file.
    """
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnxruntime read it: a file the onnx package cannot is left unchecked
        return None, None
    constants = {i.name: i for i in model.graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        """The first value of the constant ``name``; ``None`` without one (or outside the file)."""
        if name not in constants:
            return None
        try:
            return numpy_helper.to_array(constants[name]).reshape(-1)[:1]
        except Exception:  # stored outside the file (external data): not read here
            return None

    found = constant(_THRESHOLD_CONSTANT)
    threshold = None if found is None or not found.size else float(found[0])
    clips = [
        n
        for n in model.graph.node
        if n.op_type == "Clip" and n.input[:1] == [INPUT_NAME] and len(n.input) == 3
    ]
    bounds = None
    if len(clips) == 1:
        low, high = (constant(name) for name in clips[0].input[1:])
        if low is not None and high is not None:
            bounds = (low, high)
    return threshold, bounds


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

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is not a readable ONNX file, not a brittle monitor
            graph, or carries metadata (threshold, reference rate and counts,
            histogram buckets, input domain) that no export could have written, or a
            threshold or input domain that its graph does not flag or reject by.

    Examples:
        >>> import shutil, tempfile, numpy as np, torch, brittle
        >>> monitor = brittle.wrap(torch.nn.Linear(8, 4), eps=0.1)
        >>> monitor.set_threshold(0.5)
        >>> folder = tempfile.mkdtemp()
        >>> path = monitor.export_onnx(folder + "/m.onnx", torch.rand(2, 8))
        >>> served = brittle.OnnxMonitor(path)
        >>> served(np.full((1, 8), np.nan, dtype=np.float32)).flag
        array([ True])
        >>> served(np.zeros((1, 9), dtype=np.float32))
        Traceback (most recent call last):
        ...
        ValueError: input must have shape (batch, 8). Got (1, 9).
        >>> shutil.rmtree(folder)

    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        *,
        session_options: Any | None = None,
    ) -> None:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {str(path)!r}.")
        if isinstance(providers, str):
            raise ValueError(f"providers must be a list of provider names. Got {providers!r}.")
        chosen = list(providers) if providers is not None else _default_providers()
        self.path = path
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=session_options, providers=chosen
            )
        except Exception as err:  # onnxruntime's own exception types, one per failure
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            if isinstance(err, OrtNotImplemented):
                # A sound graph with an operator these providers lack (a float64 convolution).
                raise ValueError(
                    f"onnxruntime cannot run {str(path)!r} with the providers {chosen}: "
                    f"{first}. The graph needs an operator, or an operator's dtype, that they "
                    "lack; a float32 export runs on every provider."
                ) from err
            raise ValueError(
                f"{str(path)!r} is not a readable ONNX file (empty, truncated or damaged): "
                f"onnxruntime says {first}"
            ) from err
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
        self._check_metadata()
        # The onnx package parses the whole file: only when there is something to check.
        checked = self.has_threshold or self.input_domain is not None
        graph, bounds = _graph_checks(path) if checked else (None, None)
        if self.has_threshold and graph is not None and graph != self.threshold:
            raise ValueError(
                f"{str(path)!r} flags at threshold {graph!r} in its graph, but its metadata "
                f"says {self.threshold!r}: the metadata was edited. Change the threshold with "
                "Monitor.set_threshold and export the monitor again."
            )
        domain = self.input_domain
        if (
            domain is not None
            and bounds is not None
            and not all(
                np.array_equal(np.asarray([value], dtype=b.dtype), b)
                for value, b in zip(domain, bounds, strict=True)
            )
        ):
            shown = [float(b[0]) for b in bounds]
            raise ValueError(
                f"{str(path)!r} rejects inputs outside {shown} in its graph, but its metadata "
                f"says the input domain is {list(domain)}: the metadata was edited. The domain "
                "is the fit's; refit the monitor on a holdout of the inputs to accept and "
                "export it again."
            )
        if self.reference_flag_rate is not None and self.reference_counts is None:
            warnings.warn(OLD_REFERENCE_WARNING, UserWarning, stacklevel=2)
        if self.metadata.get("fitted") == "true" and "input_domain" not in self.metadata:
            warnings.warn(
                f"{path.name} was exported without an input domain (by an older brittle): "
                "inputs far outside the holdout's range are judged instead of rejected. Refit "
                "the monitor and export it again.",
                stacklevel=2,
            )

    def _check_metadata(self) -> None:
        """Raise ``ValueError`` unless every metadata value this class reads is well formed.

        The values are read once here, so a malformed file fails when it is opened,
        with the key named, and never later in a server's request path.
        """
        for key in _READ_METADATA:
            try:
                value = getattr(self, key)
                well_formed = _in_range(key, value)
            except (TypeError, ValueError, OverflowError):  # float() of a 400-digit integer
                well_formed = False
            if not well_formed:
                shown = self.metadata[key][:60]
                raise ValueError(
                    f"{str(self.path)!r} carries malformed metadata {key}={shown!r}: export the "
                    "monitor again with brittle (Monitor.export_onnx)."
                )

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return list(self.session.get_providers())

    @property
    def threshold(self) -> float:
        """Flag threshold the file was exported with."""
        return float(self.metadata.get("threshold", "nan"))

    @property
    def has_threshold(self) -> bool:
        """Whether the file carries a finite flag threshold."""
        return math.isfinite(self.threshold)

    @property
    def reference_flag_rate(self) -> float | None:
        """The calibration holdout's flag rate (the flag-rate alarm's reference), if known.

        ``None`` for files exported with a hand-set threshold or by a brittle older
        than the alarm.
        """
        value = self.metadata.get("reference_flag_rate", "none")
        return None if value == "none" else float(value)

    @property
    def reference_counts(self) -> tuple[int, int] | None:
        """``(flagged, n)`` calibration samples behind ``reference_flag_rate``, if known.

        ``None`` for files exported with a hand-set threshold or by a brittle that
        stored the rate alone (such a file warns when opened).
        """
        value = self.metadata.get("reference_counts", "none")
        if value == "none":
            return None
        flagged, n = _json_numbers(value, count=2, integers=True)
        return flagged, n

    @property
    def margin_buckets(self) -> tuple[float, ...] | None:
        """Margin histogram bounds from the calibration holdout (``Telemetry``), if known."""
        value = self.metadata.get("margin_buckets", "none")
        return None if value == "none" else tuple(float(b) for b in _json_numbers(value))

    @property
    def input_domain(self) -> tuple[float, float] | None:
        """The input values the graph accepts, ``(low, high)``; outside them it rejects.

        ``None`` for files exported before the monitor recorded its holdout's input
        range, or from a monitor that was never fitted.
        """
        value = self.metadata.get("input_domain", "none")
        if value == "none":
            return None
        low, high = (float(b) for b in _json_numbers(value, count=2))
        return low, high

    @property
    def score(self) -> str | None:
        """Score kind of the ``margin`` output."""
        return self.metadata.get("score")

    def _expected(self) -> str:
        dims = ", ".join("batch" if d is None else str(d) for d in self.input_shape)
        return f"({dims})"

    def shape_error(self, shape: Sequence[int]) -> str | None:
        """Why an input of ``shape`` does not fit the exported input shape; ``None`` if it does.

        Args:
            shape: The input's shape, batch first.

        Returns:
            A one-line message naming the expected shape, or ``None``.
        """
        if len(shape) != len(self.input_shape) or any(
            want is not None and got != want
            for got, want in zip(shape, self.input_shape, strict=True)
        ):
            return f"input must have shape {self._expected()}. Got {tuple(shape)}."
        return None

    def _check(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise ValueError(
                f"input must be a numpy array of shape {self._expected()} {self.dtype}. "
                f"Got {type(x).__name__}."
            )
        if x.dtype != self.dtype:
            raise ValueError(f"input must have dtype {self.dtype}. Got {x.dtype}.")
        error = self.shape_error(x.shape)
        if error is not None:
            raise ValueError(error)
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
