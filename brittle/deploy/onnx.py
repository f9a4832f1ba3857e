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
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from brittle._modes import eval_mode
from brittle.arguments import file_path, parent_folders, positive_int
from brittle.deploy.onnx_monitor import INPUT_NAME, OUTPUT_NAMES, OnnxMonitor
from brittle.errors import NotFittedError
from brittle.scores.head import NO_HEAD_HINT

if TYPE_CHECKING:
    from brittle.calibrate.calibration import ScoreKind
    from brittle.protocol import MonitorProtocol

__all__ = ["export_onnx", "OnnxMonitor", "INPUT_NAME", "OUTPUT_NAMES", "DEFAULT_OPSET"]

# The input dtypes an export takes: those ONNX operators and numpy arrays share
# (OnnxMonitor's inputs).
EXPORT_DTYPES = (torch.float32, torch.float16, torch.float64)
# The dynamo exporter's own default; 17 is the oldest opset the design promises.
DEFAULT_OPSET = 18
MIN_OPSET = 17


def _check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    return positive_int("opset", opset, minimum=MIN_OPSET)


def _fmt(value: float | None) -> str:
    # repr() round-trips a Python float exactly; operators read "none" for missing values.
    return "none" if value is None or not math.isfinite(value) else repr(float(value))


def _metadata(monitor: MonitorProtocol, kind: ScoreKind) -> dict[str, str]:
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
    # The flag-rate alarm's reference and the margin histogram's bounds (brittle.Telemetry).
    rate, buckets = monitor.reference_flag_rate, monitor.margin_buckets
    meta["reference_flag_rate"] = _fmt(rate)
    counts = monitor.reference_counts
    meta["reference_counts"] = "none" if counts is None else json.dumps([int(c) for c in counts])
    meta["margin_buckets"] = "none" if buckets is None else json.dumps([float(b) for b in buckets])
    # The accepted input values; the graph rejects samples outside them (fail-closed).
    domain = monitor.input_domain
    meta["input_domain"] = "none" if domain is None else json.dumps([float(b) for b in domain])
    # A threshold set by hand (set_threshold) is exportable and has no report to describe.
    if not monitor.has_report:
        return meta
    report = monitor.report
    # The report's rates describe its own threshold; after set_threshold the graph flags
    # at another one, and those rates would describe nothing in it. The target TPR stays:
    # the fit's FPR at that TPR (fpr_at_tpr, metrics) is measured at it, whatever flags.
    fitted_threshold = torch.tensor(report.threshold, dtype=monitor.threshold.dtype)
    calibrated = bool(fitted_threshold == monitor.threshold.cpu())
    meta.update(
        {
            "target_tpr": _fmt(report.target_tpr),
            "calibration_tpr": _fmt(report.tpr if calibrated else None),
            "calibration_fpr": _fmt(report.fpr if calibrated else None),
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
    monitor: MonitorProtocol,
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
    and flag True inside the graph, as in PyTorch; so does a sample with values
    outside the monitor's fitted input domain (``input_domain``). The file passes
    ``onnx.checker`` and carries the calibration in ``metadata_props``.

    Args:
        monitor: A ``Monitor`` with a threshold (fitted, or
            ``set_threshold`` called).
        path: Destination ``.onnx`` file; parent folders are created. The file
            appears only once it is whole and checked: a failed export leaves no
            file behind, and an existing file at ``path`` is kept.
        example_input: A non-empty batch of the model's input shape, dtype and device.
        opset: ONNX opset version, at least 17 (default 18).
        dynamic_batch: Keep the batch axis symbolic; with ``False`` the graph only
            accepts the example's batch size.

    Returns:
        The path written.

    Raises:
        NotFittedError: if the monitor has no threshold.
        ValueError: for a bad ``opset`` or ``example_input`` (empty, or of a
            bfloat16 model, which ONNX cannot express), an ``opset`` the exporter
            cannot convert this graph to (it exports at 18 and converts, which
            fails for some graphs, a fitted monitor's at 17 among them), or a
            feature or pseudo score without a linear head.
        IsADirectoryError: if ``path`` is a directory.

    Examples:
        >>> import shutil, tempfile, torch, brittle
        >>> monitor = brittle.wrap(torch.nn.Linear(8, 4), score="feature", norm="L2", eps=0.1)
        >>> monitor.set_threshold(0.2)
        >>> folder = tempfile.mkdtemp()
        >>> path = brittle.deploy.onnx.export_onnx(monitor, folder + "/m.onnx", torch.rand(3, 8))
        >>> import onnx
        >>> [o.name for o in onnx.load(path).graph.output]
        ['logits', 'pred', 'margin', 'flag']
        >>> shutil.rmtree(folder)

    """
    import onnx

    if not monitor.has_threshold:
        raise NotFittedError(
            "export_onnx needs a flag threshold: call monitor.fit(holdout_loader) "
            "(or monitor.set_threshold(value)) before exporting."
        )
    opset = _check_opset(opset)
    x = monitor.check_input(example_input)
    if x.shape[0] == 0:
        raise ValueError("example_input must hold at least one sample. Got an empty batch.")
    if x.dtype not in EXPORT_DTYPES:
        # ONNX has no bfloat16 for operators every graph holds (ConstantOfShape, Conv):
        # onnx.checker refused the traced graph with a shape-inference error.
        raise ValueError(
            f"a {x.dtype} model cannot be exported to ONNX (ONNX operators and numpy arrays "
            f"have no such type; an export takes {', '.join(str(d) for d in EXPORT_DTYPES)}). "
            "Save the monitor and load it onto a float16 or float32 copy of the model, "
            "brittle.load(path, copy.deepcopy(model).half()), to export that."
        )
    path = file_path(path, "the ONNX file", "monitor.onnx")
    with torch.no_grad(), eval_mode(monitor):
        if not monitor.discovered:
            monitor(x)  # finds the head and records the input shape
        kind = monitor.score
        if kind == "feature":
            # The traced graph takes an exact head's margin from the logits: inspect
            # checks that the head still produces them. For this score alone: inspect
            # computes every available score, and a head named for another use may
            # give no features (called twice, say) to a monitor that exports another.
            monitor.inspect(x)
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
        # tracing and hands the traced features to the margin code: the graph is the
        # monitor's own forward pass, with no second implementation of it.
        program = torch.onnx.export(
            monitor.graph().eval(),
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
    exported_opset = program.model.opset_imports.get("")
    if exported_opset != opset:
        # The exporter writes opset 18 and converts the graph to the opset asked for;
        # a conversion that fails only logs, and leaves the graph at 18.
        raise ValueError(
            f"torch's ONNX exporter cannot write this monitor's graph at opset {opset} "
            f"(its conversion left opset {exported_opset}). Export with opset={DEFAULT_OPSET}, "
            "the default."
        )
    program.model.metadata_props.update(_metadata(monitor, kind))
    with parent_folders(path):
        # Written and checked in a folder of its own beside the target (with its external
        # data, if any, under the names the graph gives them), then moved in place.
        staging = Path(tempfile.mkdtemp(prefix=".brittle-export-", dir=path.parent))
        try:
            program.save(staging / path.name)
            # A path (not a loaded proto) lets the checker handle files with external data.
            onnx.checker.check_model(str(staging / path.name), full_check=True)
            for written in sorted(staging.iterdir(), key=lambda f: f.name == path.name):
                written.replace(path.parent / written.name)  # the graph itself last
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path
