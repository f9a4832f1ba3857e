"""The Open Inference Protocol (KServe v2) REST endpoints beside ``/predict``.

``/v2/health/live``, ``/v2/health/ready``, ``/v2`` (server metadata),
``/v2/models/{name}``, ``/v2/models/{name}/ready`` and
``/v2/models/{name}/infer``, each model route also under
``/v2/models/{name}/versions/1`` (the one version the metadata lists), so that
KServe, Triton (``tritonclient.http``) and MLServer clients talk to the monitor.
The model takes one tensor ``input`` and answers ``logits``, ``pred``,
``margin`` and ``flag``; a rejected sample's margin and logits are NaN, written
as JSON ``null`` (JSON has no NaN; MLServer writes ``null`` too, Triton a bare
``NaN`` that strict JSON parsers refuse). Clients that build the tensor with
numpy, as ``tritonclient.http`` and MLServer's codecs do
(``np.array(data, dtype=np.float32)``), read ``null`` back as NaN, and an
infinite margin (``brittle.deploy.serve.numbers``) back as infinity.
Inputs come as JSON tensors or with the binary tensor extension
(``Inference-Header-Content-Length``); bytes after the JSON header that no
input's ``binary_data_size`` claims get 400, as Triton answers them. Outputs
are JSON tensors, or binary where an output's ``binary_data`` (else the
request's ``binary_data_output``) asks for it, as ``tritonclient.http`` does by
default. Every output is answered unless the request names some (an empty list
names none: all of them, as Triton answers), and an output asked for as
classification labels (``class_count``) is refused with 400: the server offers
no such extension. A ``null`` in a floating-point input tensor is NaN, as in
``/predict``: that sample is rejected (reason ``nan``) and the others are judged.
``parameters`` (of the request, a tensor or an output) that are not a JSON object
get 400. Errors follow the protocol: ``{"error": "one line"}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Path, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from brittle.deploy.onnx_monitor import INPUT_NAME, OUTPUT_NAMES, OnnxMonitor
from brittle.deploy.serve import schemas
from brittle.deploy.serve.admission import Admission
from brittle.deploy.serve.body import byte_count, decode_json, read_body, to_batch
from brittle.deploy.serve.numbers import json_floats
from brittle.deploy.serve.refusal import Refusal
from brittle.output import MonitorOutput

__all__ = ["add_open_inference_routes", "MODEL_VERSION"]

MODEL_VERSION = "1"
_BINARY_HEADER = "inference-header-content-length"
_NUMPY_TO_DATATYPE = {np.dtype(v): k for k, v in schemas.DATATYPES.items()}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: schemas.error_response("error", "Malformed request (one line, never the input)."),
    404: schemas.error_response("error", "No model of that name."),
    413: schemas.error_response("error", "Body or batch larger than this server's limit."),
    415: schemas.error_response(
        "error", "A body in a Content-Encoding other than identity (see Accept-Encoding)."
    ),
    503: schemas.error_response(
        "error", "The server holds as many request bodies as it can: retry after Retry-After."
    ),
}


def _error(err: Refusal) -> JSONResponse:
    # The protocol answers every malformed request with 400.
    status = 400 if err.status == 422 else err.status
    return JSONResponse({"error": err.detail}, status_code=status, headers=err.headers)


async def _protocol_errors(request: Request, exc: Exception) -> Response:
    """The router's own errors (404, 405) as ``{"error": ...}`` under ``/v2``.

    Clients of the protocol read the ``error`` key of a failed request: Triton's
    cannot decode FastAPI's ``{"detail": ...}`` (``get_model_config``, a route this
    server does not serve, raised "an exception occurred in the client while
    decoding the response"). The other routes keep FastAPI's body.
    """
    if not isinstance(exc, HTTPException):  # registered for HTTPException alone
        raise exc
    path = request.url.path
    if not (path == "/v2" or path.startswith("/v2/")) or exc.status_code < 400:
        return await http_exception_handler(request, exc)
    status, headers = exc.status_code, exc.headers
    return JSONResponse({"error": str(exc.detail)}, status_code=status, headers=headers)


def _values(array: np.ndarray) -> list[Any]:
    if array.dtype.kind != "f":
        return array.reshape(-1).tolist()
    return json_floats(array)


def _text(value: str) -> bool:
    r"""Whether ``value`` is text UTF-8 can write: no lone surrogate, as JSON's ``"\ud800"``.

    Examples:
        >>> _text("r-1"), _text("\N{SNOWMAN}"), _text("\ud800")
        (True, True, False)
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _split_binary(request_headers: Any, body: bytes) -> tuple[bytes, bytes]:
    header = request_headers.get(_BINARY_HEADER)
    if header is None:
        return body, b""
    n = byte_count(header)
    if n is None or n > len(body):
        raise Refusal(400, f"the {_BINARY_HEADER} header does not fit the body.")
    return body[:n], body[n:]


def _parameters(holder: dict[str, Any], whose: str) -> dict[str, Any]:
    """``holder``'s ``parameters`` (``{}`` where absent or null); 400 for another value.

    The protocol's parameters are a JSON object: another was ignored without a word.
    """
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise Refusal(400, f'{whose} "parameters" must be a JSON object.')
    return parameters


def _tensor(
    request: Any, binary: bytes, monitor: OnnxMonitor, max_batch: int
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The request's input tensor as an array of the model's dtype, and its outputs spec."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise Refusal(400, 'the body must be a JSON object {"inputs": [tensor]}.')
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        # The protocol's id is a string, echoed in the response (null, as pydantic
        # clients send for none, is none); another was dropped without a word.
        raise Refusal(400, 'the request\'s "id" must be a string.')
    if request_id is not None and not _text(request_id):
        # JSON escapes half a surrogate pair ("\ud800") into a string UTF-8 cannot
        # write: the answer echoing it failed (500) after the samples were counted.
        raise Refusal(400, 'the request\'s "id" must be Unicode text: no lone surrogate.')
    _parameters(request, "the request's")
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Refusal(400, f"the model takes exactly one input tensor, {INPUT_NAME!r}.")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise Refusal(400, f"the model's input tensor is named {INPUT_NAME!r}.")
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise Refusal(400, "the tensor's shape must be a list of non-negative integers.")
    if not isinstance(datatype, str) or datatype not in schemas.DATATYPES or datatype == "BOOL":
        raise Refusal(400, "the tensor's datatype must be a numeric Open Inference datatype.")
    # Before the batch's size: the first dimension of a tensor of another shape is no batch.
    error = monitor.shape_error(shape)
    if error is not None:
        raise Refusal(400, error)
    if shape[0] > max_batch:
        raise Refusal(413, f"a batch exceeds this server's limit of {max_batch}.")
    dtype = np.dtype(schemas.DATATYPES[datatype])
    count = math.prod(shape)
    size = _parameters(tensor, "a tensor's").get("binary_data_size")
    if size is not None:
        if (
            not isinstance(size, int)
            or "data" in tensor
            or size != count * dtype.itemsize
            or size != len(binary)
        ):
            raise Refusal(400, "the binary tensor data do not match its shape and datatype.")
        values = np.frombuffer(binary, dtype=dtype)
    else:
        if binary:
            # As Triton refuses it: the bytes were dropped without a word, and the
            # tensor's JSON data judged in their place.
            raise Refusal(
                400, "the body holds binary data that no input claims (binary_data_size)."
            )
        data = tensor.get("data")
        if not isinstance(data, list):
            raise Refusal(400, "the tensor needs its data as a JSON array.")
        # Inferring the dtype first tells numbers from strings and booleans, which
        # numpy would otherwise convert silently.
        found = to_batch(data, np.dtype(object), (None,)) if data else np.empty(0, dtype)
        kinds = {type(v) for v in found.reshape(-1).tolist()}
        if not kinds <= {int, float, type(None)}:
            # Ragged lists leave lists among the values: they are not strings either.
            raise Refusal(
                400,
                "the tensor's data must be numbers, flat or in nested lists of equal "
                "lengths (not strings, booleans or objects).",
            )
        if dtype.kind in "iu" and not kinds <= {int}:
            # numpy would truncate 0.9 to 0 without a word, and an integer has no NaN.
            raise Refusal(400, f"the tensor's data must be integers for datatype {datatype}.")
        # null in a floating-point tensor is NaN, as in /predict and MLServer (and as
        # this server writes NaN): the sample is rejected, the others judged. Clients
        # whose JSON library writes NaN as null (orjson, pydantic) lost whole batches.
        try:
            values = to_batch(found.reshape(-1).tolist(), dtype, (None,))
        except Refusal:  # its words are /predict's, of inputs nested as samples
            raise Refusal(
                400, f"the tensor's data hold a number out of the range of {datatype}."
            ) from None
    if values.size != count:
        raise Refusal(400, "the tensor's data do not fill its shape.")
    try:
        values = values.reshape(shape)
    except (ValueError, OverflowError):  # no data, and a dimension no array can have
        raise Refusal(400, "the tensor's shape is larger than any array can be.") from None
    with np.errstate(over="ignore", invalid="ignore"):  # out of range: Inf, rejected
        x = values.astype(monitor.dtype, copy=False)
    outputs = request.get("outputs")
    if outputs is None or outputs == []:  # none requested: every output, as Triton answers
        return x, None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and o.get("name") in OUTPUT_NAMES for o in outputs
    ):
        raise Refusal(400, f"requested outputs must be among {list(OUTPUT_NAMES)}.")
    for output in outputs:
        classes = _parameters(output, "an output's").get("classification")
        if classes is not None and classes != 0:  # 0 classes: none asked for, the raw tensor
            # The classification extension answers top-k labels: the raw tensor in its
            # place would read as an answer of another shape and datatype.
            raise Refusal(
                400,
                "this server does not offer the classification extension: request the "
                "outputs without class_count (logits are returned whole).",
            )
    return x, {o["name"]: o for o in outputs}


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    """The boolean ``parameters[key]`` (``default`` where absent); 400 for another value."""
    if parameters.get(key) is None:
        return default
    value = parameters[key]
    if not isinstance(value, bool):
        raise Refusal(400, f'the parameter "{key}" must be true or false.')
    return value


def _binary_outputs(request: dict[str, Any], wanted: dict[str, Any] | None) -> set[str]:
    """The outputs to answer in binary (the binary tensor extension), checked before judging.

    Each output's own ``binary_data`` decides, else the request's ``binary_data_output``.
    """
    default = _flag(_parameters(request, "the request's"), "binary_data_output", False)
    names = OUTPUT_NAMES if wanted is None else tuple(wanted)
    specs = wanted or {}
    return {
        name
        for name in names
        if _flag(_parameters(specs.get(name, {}), "an output's"), "binary_data", default)
    }


def _answer(content: dict[str, Any], blobs: list[bytes]) -> Response:
    """The infer response: JSON alone, or its JSON header followed by the binary outputs."""
    if not blobs:
        return JSONResponse(content)
    header = JSONResponse(content).body
    return Response(
        bytes(header) + b"".join(blobs),
        media_type="application/octet-stream",
        headers={_BINARY_HEADER: str(len(header))},
    )


def add_open_inference_routes(
    app: FastAPI,
    monitor: OnnxMonitor,
    judge: Callable[[np.ndarray], MonitorOutput],
    *,
    name: str,
    version: str,
    max_batch: int,
    max_body: int,
    admission: Admission,
) -> None:
    """Add the Open Inference Protocol routes for ``monitor`` served as model ``name``.

    ``judge`` is the function ``/predict`` uses (monitor, telemetry), so both
    protocols give the same numbers and feed the same metrics; ``admission`` is its
    budget of body bytes and workers, shared with ``/predict``.
    """
    tensor_shape = [-1 if d is None else d for d in monitor.input_shape]
    datatype = _NUMPY_TO_DATATYPE[monitor.dtype]
    k = monitor.num_classes or -1
    metadata = {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": datatype, "shape": tensor_shape}],
        "outputs": [
            {"name": "logits", "datatype": datatype, "shape": [-1, k]},
            {"name": "pred", "datatype": "INT64", "shape": [-1]},
            {"name": "margin", "datatype": datatype, "shape": [-1]},
            {"name": "flag", "datatype": "BOOL", "shape": [-1]},
        ],
    }

    app.add_exception_handler(HTTPException, _protocol_errors)
    # The one model's name and version as enums: clients (and fuzzers) see which exist.
    model_name = Path(json_schema_extra={"enum": [name]})
    model_version = Path(json_schema_extra={"enum": [MODEL_VERSION]})

    def known(model: str, model_version: str = MODEL_VERSION) -> None:
        if model != name:
            raise Refusal(404, f"no model of that name; this server serves {name!r}.")
        if model_version != MODEL_VERSION:
            raise Refusal(
                404, f"no version of that name; this server serves version {MODEL_VERSION!r}."
            )

    @app.api_route("/v2/health/live", methods=["GET", "HEAD"], tags=["open inference"])
    def live() -> dict[str, bool]:
        """Open Inference Protocol: the server is live."""
        return {"live": True}

    @app.api_route("/v2/health/ready", methods=["GET", "HEAD"], tags=["open inference"])
    def ready() -> dict[str, bool]:
        """Open Inference Protocol: the server is ready (its one model is loaded)."""
        return {"ready": True}

    @app.api_route("/v2", methods=["GET", "HEAD"], tags=["open inference"])
    def server_metadata() -> dict[str, Any]:
        """Open Inference Protocol: server metadata."""
        return {"name": "brittle", "version": version, "extensions": ["binary_tensor_data"]}

    def metadata_of(model: str, version: str = MODEL_VERSION) -> Response:
        try:
            known(model, version)
        except Refusal as err:
            return _error(err)
        return JSONResponse(metadata)

    def ready_of(model: str, version: str = MODEL_VERSION) -> Response:
        try:
            known(model, version)
        except Refusal as err:
            return _error(err)
        return JSONResponse({"name": name, "ready": True})

    @app.api_route(
        "/v2/models/{model}",
        methods=["GET", "HEAD"],
        tags=["open inference"],
        responses={404: _ERRORS[404]},
    )
    def model_metadata(model: str = model_name) -> Response:
        """Open Inference Protocol: the model's input and output tensors."""
        return metadata_of(model)

    @app.api_route(
        "/v2/models/{model}/versions/{version}",
        methods=["GET", "HEAD"],
        tags=["open inference"],
        responses={404: _ERRORS[404]},
    )
    def model_version_metadata(model: str = model_name, version: str = model_version) -> Response:
        """Open Inference Protocol: the input and output tensors of the model's version."""
        return metadata_of(model, version)

    @app.api_route(
        "/v2/models/{model}/ready",
        methods=["GET", "HEAD"],
        tags=["open inference"],
        responses={404: _ERRORS[404]},
    )
    def model_ready(model: str = model_name) -> Response:
        """Open Inference Protocol: the model is ready."""
        return ready_of(model)

    @app.api_route(
        "/v2/models/{model}/versions/{version}/ready",
        methods=["GET", "HEAD"],
        tags=["open inference"],
        responses={404: _ERRORS[404]},
    )
    def model_version_ready(model: str = model_name, version: str = model_version) -> Response:
        """Open Inference Protocol: the model's version is ready."""
        return ready_of(model, version)

    def infer_body(headers: Any, body: bytes) -> Response:
        header, binary = _split_binary(headers, body)
        request = decode_json(header)
        x, wanted = _tensor(request, binary, monitor, max_batch)
        as_bytes = _binary_outputs(request, wanted)
        out = judge(x)
        outputs, blobs = [], []
        for key, value in zip(OUTPUT_NAMES, out, strict=True):
            if wanted is not None and key not in wanted:
                continue
            array = np.asarray(value)
            tensor: dict[str, Any] = {
                "name": key,
                "datatype": _NUMPY_TO_DATATYPE[array.dtype],
                "shape": list(array.shape),
            }
            if key in as_bytes:  # row-major, little-endian; BOOL one byte each
                blobs.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
                tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                tensor["data"] = _values(array)
            outputs.append(tensor)
        content: dict[str, Any] = {
            "model_name": name,
            "model_version": MODEL_VERSION,
            "outputs": outputs,
        }
        if request.get("id") is not None:
            content["id"] = request["id"]
        return _answer(content, blobs)

    async def infer_of(request: Request, model: str, version: str = MODEL_VERSION) -> Response:
        with admission.hold() as hold:
            try:
                known(model, version)
                body = await read_body(request.headers, request.stream(), max_body, hold)
                return await admission.run(infer_body, request.headers, body, size=len(body))
            except Refusal as err:
                return _error(err)

    infer_route: dict[str, Any] = {
        "tags": ["open inference"],
        "openapi_extra": schemas.json_body(schemas.infer_request(list(OUTPUT_NAMES))),
        "responses": {
            200: {
                "description": "The outputs logits, pred, margin and flag.",
                "content": {
                    "application/json": {"schema": schemas.infer_response()},
                    "application/octet-stream": {
                        "schema": {
                            "type": "string",
                            "format": "binary",
                            "description": "Outputs asked for in binary: the JSON "
                            "response's first Inference-Header-Content-Length bytes, "
                            "then each such output's bytes in its order.",
                        }
                    },
                },
            },
            **_ERRORS,
        },
    }

    @app.post("/v2/models/{model}/infer", **infer_route)
    async def infer(request: Request, model: str = model_name) -> Response:
        """Open Inference Protocol: logits, pred, margin and flag for the ``input`` tensor."""
        return await infer_of(request, model)

    @app.post("/v2/models/{model}/versions/{version}/infer", **infer_route)
    async def infer_version(
        request: Request, model: str = model_name, version: str = model_version
    ) -> Response:
        """Open Inference Protocol: ``infer``, of the model's version."""
        return await infer_of(request, model, version)
