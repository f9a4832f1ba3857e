"""``create_app``: the FastAPI app of ``python -m brittle.serve`` around an ``OnnxMonitor``.

The request path is onnxruntime and numpy only: nothing here imports torch. The
body is read raw, within a byte limit, and decoded by ``json`` and
``numpy.asarray`` rather than by a pydantic model: validating a batch of images
float by float would cost more than the model. The schemas in ``/openapi.json``
document the contract without enforcing it float by float.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.utils import generate_unique_id
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brittle.arguments import positive_int
from brittle.deploy.alarm import DEFAULT_RUN_LENGTH
from brittle.deploy.onnx_monitor import OnnxMonitor
from brittle.deploy.serve import schemas
from brittle.deploy.serve.admission import Admission, max_bytes_default, max_concurrent_default
from brittle.deploy.serve.body import (
    body_limit,
    decode_json,
    non_numbers,
    read_body,
    to_batch,
)
from brittle.deploy.serve.metrics import (
    AdmissionCollector,
    ClosedConnections,
    RequestCounter,
    TelemetryCollector,
)
from brittle.deploy.serve.numbers import json_floats
from brittle.deploy.serve.oip import add_open_inference_routes
from brittle.deploy.serve.refusal import Refusal
from brittle.deploy.telemetry import Telemetry
from brittle.output import MonitorOutput

__all__ = ["create_app", "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = 64
_PREDICT_KEYS = frozenset({"inputs", "logits"})
_PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: schemas.error_response("detail", "The body is not JSON (one line, never the input)."),
    413: schemas.error_response("detail", "Body or batch larger than this server's limit."),
    415: schemas.error_response(
        "detail", "A body in a Content-Encoding other than identity (see Accept-Encoding)."
    ),
    422: schemas.error_response("detail", "Inputs that are not numbers of the model's shape."),
    503: schemas.error_response(
        "detail", "The server holds as many request bodies as it can: retry after Retry-After."
    ),
}


def _predict_batch(monitor: OnnxMonitor, body: bytes, max_batch: int) -> tuple[np.ndarray, bool]:
    """The request's inputs as an array, and whether it asks for logits; 4xx otherwise."""
    payload = decode_json(body)
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise Refusal(422, 'the body must be a JSON object {"inputs": [...]}.')
    if not payload.keys() <= _PREDICT_KEYS:
        raise Refusal(422, 'the body may hold only "inputs" and "logits".')
    inputs, want_logits = payload["inputs"], payload.get("logits", False)
    if not isinstance(want_logits, bool):
        raise Refusal(422, "logits must be true or false.")
    if not isinstance(inputs, list):
        raise Refusal(422, "inputs must be a list (a batch).")
    if len(inputs) > max_batch:
        raise Refusal(
            413, f"a batch of {len(inputs)} samples exceeds this server's limit of {max_batch}."
        )
    # numpy converts "0.5" and true to numbers without a word.
    why = non_numbers(body, payload)
    if why:
        raise Refusal(422, why)
    if not inputs:
        empty = tuple(d or 0 for d in monitor.input_shape[1:])  # a dynamic axis of 0 is fine
        return np.empty((0, *empty), dtype=monitor.dtype), want_logits
    return to_batch(inputs, monitor.dtype, monitor.input_shape), want_logits


class _CountResponses:
    """ASGI middleware: every response's status code into a ``RequestCounter``."""

    def __init__(self, app: ASGIApp, counter: RequestCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter.count(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # the server's error handler answers 500 outside this one
                self.counter.count(500)
            raise


def create_app(
    monitor: OnnxMonitor,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body: int | None = None,
    body_budget: int | None = None,
    max_concurrent: int | None = None,
    telemetry: Telemetry | None = None,
    run_length: float = DEFAULT_RUN_LENGTH,
) -> FastAPI:
    """A FastAPI app serving ``monitor``: ``/predict``, the Open Inference Protocol, metrics.

    Routes: ``POST /predict``; the Open Inference Protocol (KServe v2) under ``/v2``
    (``brittle.deploy.serve.oip``); ``GET /metrics`` (Prometheus text);
    ``GET /healthz``; every ``GET`` route answers ``HEAD`` too. A body larger than
    ``max_body`` bytes gets 413 before it is parsed; parsing and the model run in a
    worker thread, so the health routes answer while a request is being refused or
    judged (a body of at most 64 KiB is judged on the event loop while such
    requests take at most half a millisecond: ``brittle.deploy.serve.admission``). Every
    malformed body gets a one-line 4xx that never quotes the input. The server holds
    at most ``body_budget`` bytes of bodies at once and judges at most
    ``max_concurrent`` requests at once; a request beyond the budget gets 503 with
    ``Retry-After`` (``brittle.deploy.serve.admission``).

    Args:
        monitor: The exported monitor, opened with ``brittle.OnnxMonitor``; it must
            carry a finite threshold.
        max_batch: Largest batch one request may send (larger ones get 413).
        max_body: Largest body in bytes; by default ``max_batch`` samples of JSON
            numbers (``brittle.deploy.serve.body.body_limit``).
        body_budget: Most bytes of request bodies held at once (received, waiting or
            being judged); by default eight bodies of ``max_body``, and at least 32 MiB.
        max_concurrent: Most requests parsed and judged at once; by default one per
            CPU core, at most four.
        telemetry: Telemetry to count into; by default
            ``Telemetry.from_monitor(monitor, run_length=run_length)``.
        run_length: The flag-rate alarm's promised expected clean samples between
            false alarms.

    Returns:
        The app; its ``state`` holds ``monitor``, ``telemetry``, ``requests`` (the
        ``RequestCounter``), ``admission`` (the ``Admission`` of bodies and
        workers), ``closed_connections`` (a ``ClosedConnections`` for the
        server's connection limits, ``brittle.deploy.serve.connections``) and
        ``registry`` (its own ``prometheus_client.CollectorRegistry``, so several apps
        never share metrics).

    Raises:
        ValueError: if the monitor has no finite threshold (nothing it serves could
            be judged), for a bad ``max_batch``, ``max_body`` or ``max_concurrent``, or a
            ``body_budget`` smaller than ``max_body``.

    Examples:
        >>> import shutil, tempfile, torch, brittle
        >>> from fastapi.testclient import TestClient
        >>> from brittle.deploy.serve.app import create_app
        >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), eps=0.1)
        >>> monitor.set_threshold(0.2)
        >>> folder = tempfile.mkdtemp()
        >>> path = monitor.export_onnx(folder + "/m.onnx", torch.rand(2, 4))
        >>> served = brittle.OnnxMonitor(path, ["CPUExecutionProvider"])
        >>> telemetry = brittle.Telemetry.from_monitor(served, warn=False)
        >>> client = TestClient(create_app(served, telemetry=telemetry))
        >>> client.post("/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]]}).json()["pred"]
        [...]
        >>> client.post("/predict", json={"inputs": [[0.1, 0.2]]}).status_code
        422
        >>> shutil.rmtree(folder)
    """
    max_batch = positive_int("max_batch", max_batch)
    if max_body is None:
        max_body = body_limit(monitor.input_shape, max_batch)
    max_body = positive_int("max_body", max_body, what="a positive number of bytes")
    admission = Admission(
        max_bytes_default(max_body) if body_budget is None else body_budget,
        max_concurrent_default() if max_concurrent is None else max_concurrent,
    )
    if admission.max_bytes < max_body:
        raise ValueError(
            f"body_budget ({admission.max_bytes} bytes) must hold at least one body of "
            f"max_body ({max_body} bytes)."
        )
    if not monitor.has_threshold:
        raise ValueError(
            f"{monitor.path.name} carries no finite flag threshold, so nothing it serves could "
            "be judged: export a fitted monitor (monitor.fit(holdout), then export_onnx)."
        )
    if telemetry is None:
        telemetry = Telemetry.from_monitor(monitor, run_length=run_length)
    requests = RequestCounter()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TelemetryCollector(telemetry))
    registry.register(requests)
    registry.register(AdmissionCollector(admission))
    closed_connections = ClosedConnections()
    registry.register(closed_connections)
    version = _version()
    # Starlette answers a path with a trailing slash by a 307 to the path without it,
    # built from the client's Host header and query: an answer that quotes the request.
    app = FastAPI(title="brittle monitor", version=version, redirect_slashes=False)
    app.add_middleware(_CountResponses, counter=requests)
    app.state.monitor, app.state.telemetry, app.state.registry = monitor, telemetry, registry
    app.state.requests, app.state.closed_connections = requests, closed_connections
    app.state.admission = admission
    threshold = monitor.threshold

    def judge(x: np.ndarray) -> MonitorOutput:
        try:
            out = monitor(x)
        except ValueError as err:  # shape or rank: OnnxMonitor names what it expects
            raise Refusal(422, str(err)) from err
        return telemetry.observe(out, x)

    def predict_body(body: bytes) -> JSONResponse:
        x, want_logits = _predict_batch(monitor, body, max_batch)
        out = judge(x)
        content: dict[str, Any] = {
            "pred": out.pred.tolist(),
            "margin": json_floats(out.margin),
            "flag": np.asarray(out.flag).tolist(),
            "threshold": threshold,
        }
        if want_logits:
            content["logits"] = [json_floats(row) for row in out.logits]
        return JSONResponse(content)

    @app.post(
        "/predict",
        openapi_extra=schemas.json_body(schemas.predict_request(monitor.input_shape, max_batch)),
        responses={
            200: {
                "description": "Pred, margin (null where rejected) and flag per sample.",
                "content": {"application/json": {"schema": schemas.predict_response()}},
            },
            **_PREDICT_ERRORS,
        },
    )
    async def predict(request: Request) -> Response:
        """Pred, margin and flag for each sample of ``{"inputs": [...]}``."""
        with admission.hold() as hold:
            try:
                body = await read_body(request.headers, request.stream(), max_body, hold)
                return await admission.run(predict_body, body, size=len(body))
            except Refusal as err:
                return JSONResponse(
                    {"detail": err.detail}, status_code=err.status, headers=err.headers
                )

    @app.api_route(
        "/metrics",
        methods=["GET", "HEAD"],
        response_class=PlainTextResponse,
        responses=schemas.PROMETHEUS_TEXT,
    )
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    health = {
        "status": "ok",
        "model": monitor.path.name,
        "providers": monitor.providers,
        "score": monitor.score,
        "threshold": threshold,
        "input_domain": None if monitor.input_domain is None else list(monitor.input_domain),
        "alarm_available": telemetry.alarm is not None,
    }

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    def healthz() -> dict[str, Any]:
        """Liveness, and what is served."""
        return health

    add_open_inference_routes(
        app,
        monitor,
        judge,
        name=monitor.path.stem,
        version=version,
        max_batch=max_batch,
        max_body=max_body,
        admission=admission,
    )
    _unique_operation_ids(app)
    return app


def _unique_operation_ids(app: FastAPI) -> None:
    """``app.openapi`` with one operationId per operation, and no warning to silence.

    FastAPI gives every method of a route (``GET`` and ``HEAD /healthz``) the
    route's one id and warns about each duplicate while it writes the schema.
    Silencing that warning swapped the process's warning filters
    (``warnings.catch_warnings``) under requests, which no thread can do safely:
    the schema is written from one copy of such a route per method instead, each
    with an id of its own. Requests still go through the routes themselves, so the
    ``Allow`` of a 405 lists every method of a path.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=_one_method_each(app.routes),
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _one_method_each(routes: list[BaseRoute]) -> list[BaseRoute]:
    """``routes`` with each API route of several methods as one copy per method."""
    out: list[BaseRoute] = []
    for route in routes:
        if not isinstance(route, APIRoute) or len(route.methods or ()) < 2:
            out.append(route)
            continue
        for method in sorted(route.methods or ()):
            one = copy.copy(route)
            one.methods = {method}
            one.unique_id = generate_unique_id(one)
            out.append(one)
    return out


def _version() -> str:
    brittle = sys.modules.get("brittle")
    return str(getattr(brittle, "__version__", "unknown"))
