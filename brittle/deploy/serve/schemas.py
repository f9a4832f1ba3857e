"""The OpenAPI schemas of the server's bodies, for documentation only.

The server decodes bodies with ``json`` and numpy, never with pydantic: validating
a batch of images float by float would cost more than the model. These schemas
state the contract in ``/openapi.json`` (through ``openapi_extra`` and
``responses``) so that clients and fuzzers (schemathesis) can read it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "sample_schema",
    "predict_request",
    "predict_response",
    "error_response",
    "infer_request",
    "infer_response",
    "json_body",
    "PROMETHEUS_TEXT",
    "DATATYPES",
]

# The numpy dtype names of the Open Inference Protocol's tensor datatypes.
DATATYPES = {
    "BOOL": "bool",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
_NUMBER_OR_NULL = {"anyOf": [{"type": "number"}, {"type": "null"}]}


def sample_schema(dims: tuple[int | None, ...]) -> dict[str, Any]:
    """Nested arrays of numbers of the given shape (``None``: any length).

    ``null`` stands for NaN (JSON has none), as in the responses: such a sample is
    rejected (flag true, margin null), not the request.

    Examples:
        >>> sample_schema((2,))
        {'type': 'array', 'items': {'type': ['number', 'null']}, 'minItems': 2, 'maxItems': 2}
    """
    schema: dict[str, Any] = {"type": ["number", "null"]}
    for d in reversed(dims):
        schema = {"type": "array", "items": schema}
        if d is not None:
            schema.update(minItems=d, maxItems=d)
    return schema


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """An ``openapi_extra`` declaring a required JSON request body of ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def predict_request(input_shape: tuple[int | None, ...], max_batch: int) -> dict[str, Any]:
    """``{"inputs": [sample, ...], "logits": bool}``."""
    return {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {
            "inputs": {
                "type": "array",
                "maxItems": max_batch,
                "items": sample_schema(input_shape[1:]),
                "description": "A batch of samples. NaN, Inf and values outside the input "
                "domain the monitor was fitted on are rejected per sample (flag true, margin "
                "null), not per request.",
            },
            "logits": {"type": "boolean", "default": False},
        },
    }


def predict_response(with_threshold: bool = True) -> dict[str, Any]:
    """``pred``, ``margin`` (null where rejected), ``flag``, ``threshold``, ``logits``."""
    properties: dict[str, Any] = {
        "pred": {"type": "array", "items": {"type": "integer"}},
        "margin": {"type": "array", "items": _NUMBER_OR_NULL},
        "flag": {"type": "array", "items": {"type": "boolean"}},
        "logits": {"type": "array", "items": {"type": "array", "items": _NUMBER_OR_NULL}},
    }
    if with_threshold:
        properties["threshold"] = {"type": "number"}
    return {
        "type": "object",
        "required": ["pred", "margin", "flag", "threshold"],
        "properties": properties,
    }


def error_response(key: str, description: str) -> dict[str, Any]:
    """A JSON error ``{key: "one line"}``."""
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": [key],
                    "properties": {key: {"type": "string", "maxLength": 200}},
                }
            }
        },
    }


def _tensor(
    shape_items: dict[str, Any], data: dict[str, Any], names: list[str], datatypes: list[str]
) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "enum": names},
            "shape": {"type": "array", "items": shape_items},
            "datatype": {"type": "string", "enum": datatypes},
            "parameters": {"type": "object"},
            "data": data,
        },
    }


def infer_request(outputs: list[str]) -> dict[str, Any]:
    """An Open Inference Protocol (KServe v2) inference request with JSON tensors.

    The tensor's ``data`` must hold exactly as many numbers as its ``shape`` says,
    row-major, flat or nested; JSON Schema cannot state that, the server answers
    400 otherwise.
    """
    numeric = [k for k in DATATYPES if k != "BOOL"]
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": _tensor(
                    {"type": "integer", "minimum": 0},
                    {
                        "type": "array",
                        "description": "Row-major values, flat or nested; null is NaN "
                        "(a floating-point tensor only), which rejects its sample.",
                    },
                    ["input"],
                    numeric,
                ),
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": outputs},
                        "parameters": {"type": "object"},
                    },
                },
            },
        },
    }


def infer_response() -> dict[str, Any]:
    """An Open Inference Protocol inference response: ``logits``, ``pred``, ``margin``, ``flag``."""
    return {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {
                "type": "array",
                "items": _tensor(
                    {"type": "integer"},
                    {"type": "array", "items": {"anyOf": [_NUMBER_OR_NULL, {"type": "boolean"}]}},
                    ["logits", "pred", "margin", "flag"],
                    list(DATATYPES),
                ),
            },
        },
    }
