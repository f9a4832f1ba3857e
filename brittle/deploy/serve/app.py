"""``create_app``: the FastAPI app of ``python -m brittle.serve`` around an ``OnnxMonitor``.

The request path is onnxruntime and numpy only: nothing here imports torch. The
body is read raw and decoded by ``json`` and ``numpy.asarray`` rather than by a
pydantic model: validating a batch of images float by float would cost more
than the model.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from brittle.deploy.alarm import DEFAULT_RUN_LENGTH
from brittle.deploy.onnx_monitor import OnnxMonitor
from brittle.deploy.serve.metrics import TelemetryCollector
from brittle.deploy.telemetry import Telemetry

__all__ = ["create_app", "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = 64


def _floats(values: np.ndarray) -> list[Any]:
    # JSON has no NaN: a sample that could not be judged gets null.
    return [v if math.isfinite(v) else None for v in values.tolist()]


def _batch(monitor: OnnxMonitor, body: bytes, max_batch: int) -> tuple[np.ndarray, bool]:
    """The request's inputs as an array, and whether it asks for logits; 4xx otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise HTTPException(400, f"the body is not valid JSON: {err}.") from err
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise HTTPException(422, 'the body must be a JSON object {"inputs": [...]}.')
    inputs, want_logits = payload["inputs"], payload.get("logits", False)
    if not isinstance(want_logits, bool):
        raise HTTPException(422, f"logits must be true or false. Got {want_logits!r}.")
    if not isinstance(inputs, list):
        raise HTTPException(422, f"inputs must be a list (a batch). Got {type(inputs).__name__}.")
    if len(inputs) > max_batch:
        raise HTTPException(
            413, f"a batch of {len(inputs)} samples exceeds this server's limit of {max_batch}."
        )
    if not inputs:
        empty = tuple(d or 0 for d in monitor.input_shape[1:])  # a dynamic axis of 0 is fine
        return np.empty((0, *empty), dtype=monitor.dtype), want_logits
    try:
        x = np.asarray(inputs, dtype=monitor.dtype)
    except (ValueError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        shape = ", ".join("batch" if d is None else str(d) for d in monitor.input_shape)
        raise HTTPException(
            422, f"inputs must be nested lists of numbers of shape ({shape}): {reason}."
        ) from err
    return x, want_logits


def create_app(
    monitor: OnnxMonitor,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    telemetry: Telemetry | None = None,
    run_length: float = DEFAULT_RUN_LENGTH,
) -> FastAPI:
    """A FastAPI app serving ``monitor`` with ``/predict``, ``/metrics`` and ``/healthz``.

    Args:
        monitor: The exported monitor, opened with ``brittle.OnnxMonitor``.
        max_batch: Largest batch one request may send (larger ones get 413).
        telemetry: Telemetry to count into; by default
            ``Telemetry.from_monitor(monitor, run_length=run_length)``.
        run_length: The flag-rate alarm's promised expected clean samples between
            false alarms.

    Returns:
        The app; its ``state`` holds ``monitor``, ``telemetry`` and ``registry`` (its own
        ``prometheus_client.CollectorRegistry``, so several apps never share metrics).

    Examples:
        >>> import tempfile, torch, brittle
        >>> from fastapi.testclient import TestClient
        >>> from brittle.deploy.serve.app import create_app
        >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), eps=0.1)
        >>> monitor.set_threshold(0.2)
        >>> path = monitor.export_onnx(tempfile.mkdtemp() + "/m.onnx", torch.rand(2, 4))
        >>> served = brittle.OnnxMonitor(path, ["CPUExecutionProvider"])
        >>> telemetry = brittle.Telemetry.from_monitor(served, warn=False)
        >>> client = TestClient(create_app(served, telemetry=telemetry))
        >>> client.post("/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]]}).json()["pred"]
        [...]
        >>> client.post("/predict", json={"inputs": [[0.1, 0.2]]}).status_code
        422
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer. Got {max_batch!r}.")
    if telemetry is None:
        telemetry = Telemetry.from_monitor(monitor, run_length=run_length)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TelemetryCollector(telemetry))
    app = FastAPI(title="brittle monitor", version=_version())
    app.state.monitor, app.state.telemetry, app.state.registry = monitor, telemetry, registry

    def judge(body: bytes) -> JSONResponse:
        x, want_logits = _batch(monitor, body, max_batch)
        try:
            out = monitor(x)
        except ValueError as err:  # shape or rank: OnnxMonitor names what it expects
            raise HTTPException(422, str(err)) from err
        telemetry.observe(out)  # raises without flags; an exported monitor always has them
        content: dict[str, Any] = {
            "pred": out.pred.tolist(),
            "margin": _floats(out.margin),
            "flag": np.asarray(out.flag).tolist(),
            "threshold": monitor.threshold,
        }
        if want_logits:
            content["logits"] = [_floats(row) for row in out.logits]
        return JSONResponse(content)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """Pred, margin and flag for each sample of ``{"inputs": [...]}``."""
        body = await request.body()
        return await run_in_threadpool(judge, body)

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness, and what is served."""
        return {
            "status": "ok",
            "model": monitor.path.name,
            "providers": monitor.providers,
            "score": monitor.score,
            "threshold": monitor.threshold,
            "alarm_available": telemetry.alarm is not None,
        }

    return app


def _version() -> str:
    brittle = sys.modules.get("brittle")
    return str(getattr(brittle, "__version__", "unknown"))
