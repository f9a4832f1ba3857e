"""A request body read within a byte limit and turned into a batch, or a short 4xx.

No request may stall the server or make it echo the client's data: the body's
bytes are counted against a limit before anything parses them (Content-Length
first, then while streaming), and every refusal is a ``Refusal`` whose detail
is one line of at most ``MAX_DETAIL`` characters that never quotes the input
(``brittle.deploy.serve.refusal``).
"""

from __future__ import annotations

import codecs
import json
import math
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect

from brittle.deploy.serve.admission import Hold
from brittle.deploy.serve.refusal import Refusal

__all__ = [
    "DEFAULT_MAX_BODY",
    "BYTES_PER_VALUE",
    "body_limit",
    "byte_count",
    "read_body",
    "decode_json",
    "non_numbers",
    "to_batch",
]

# Limit of a body when the input shape has dynamic axes besides the batch.
DEFAULT_MAX_BODY = 64 * 2**20
# JSON bytes one input value may take: "-0.12345678901234567e-300, " is 27 characters.
BYTES_PER_VALUE = 32
# The bytes of JSON numbers, of lists of them and of whitespace between them.
_NUMBER_BYTES = b"0123456789+-.eE,[] \t\r\n"
# Room for the JSON around the values (keys, brackets, a Open Inference Protocol header).
_ENVELOPE = 64 * 2**10


def body_limit(input_shape: tuple[int | None, ...], max_batch: int) -> int:
    """Bytes a body may hold: ``max_batch`` samples of JSON numbers, plus an envelope.

    Examples:
        >>> body_limit((None, 1, 8, 8), 64)
        196608
        >>> body_limit((None, 3, None, None), 64) == DEFAULT_MAX_BODY
        True
    """
    sample = input_shape[1:]
    if any(d is None for d in sample):
        return DEFAULT_MAX_BODY
    return max_batch * math.prod(d or 0 for d in sample) * BYTES_PER_VALUE + _ENVELOPE


def byte_count(text: str) -> int | None:
    """A header's byte count; ``None`` unless it is ASCII digits of at most 18 figures.

    ``str.isdigit`` alone also accepts digits ``int`` cannot read, such as the
    superscript two of Latin-1, the charset HTTP headers are decoded in, and
    ``int`` refuses more than 4,300 digits. No body holds 10**18 bytes.

    Examples:
        >>> byte_count("1024"), byte_count("-1"), byte_count("\N{SUPERSCRIPT TWO}")
        (1024, None, None)
        >>> byte_count("0" * 5000 + "7"), byte_count("9" * 5000)
        (7, None)
    """
    if not (text.isascii() and text.isdigit()):
        return None
    figures = text.lstrip("0")
    return int(figures or "0") if len(figures) <= 18 else None


def _identity(coding: str) -> bool:
    """Whether a Content-Encoding header names no coding but ``identity`` (any case).

    Examples:
        >>> _identity("identity"), _identity("Identity, identity"), _identity("gzip")
        (True, True, False)
    """
    return all(c.strip().lower() in ("identity", "") for c in coding.split(","))


def _too_large(limit: int) -> Refusal:
    return Refusal(413, f"the body exceeds this server's limit of {limit} bytes.")


async def read_body(
    headers: Any, stream: AsyncIterator[bytes], limit: int, hold: Hold | None = None
) -> bytes:
    """The body's bytes, refused with 413 as soon as it is known to exceed ``limit``.

    A body in a content coding (``Content-Encoding: gzip``, or any but ``identity``)
    gets 415 with ``Accept-Encoding: identity`` before a byte of it is read: the
    server reads plain JSON only (RFC 9110, 15.5.16). A body announced larger than
    the limit is refused before a byte of it is read; one without a Content-Length
    (chunked) is counted while it streams in. With a
    ``hold`` on the server's budget of body bytes (``brittle.deploy.serve.admission``),
    each chunk is held as it arrives, and a body that does not fit gets 503: before
    a byte is read when its Content-Length says so. A connection that closes before
    the whole body arrived (the client left, or the server's request deadline
    closed it: ``brittle.deploy.serve.connections``) is a 400, counted like any
    other, instead of a logged traceback.
    """
    coding = headers.get("content-encoding")
    if coding is not None and not _identity(coding):
        raise Refusal(
            415,
            "the body's Content-Encoding is not one this server reads; send it uncompressed.",
            accept_encoding="identity",
        )
    header = headers.get("content-length")
    if header is not None:
        length = byte_count(header)
        if length is None:
            raise Refusal(400, "the Content-Length header is not a byte count.")
        if length > limit:
            raise _too_large(limit)
        if hold is not None:
            hold.check(length)
    chunks, total = [], 0
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            if hold is not None:
                hold.add(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refusal(400, "the connection closed before the whole body arrived.") from None
    return b"".join(chunks)


class _Decoders(threading.local):
    """Each thread's JSON decoder, built once.

    ``json.loads`` with a hook builds a decoder (and its scanner) per call: about
    2.5 µs of a small request's fixed cost. One per thread, so that no two parses
    share a scanner's state.
    """

    def __init__(self) -> None:
        self.decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)


def decode_json(body: bytes) -> Any:
    """The body as JSON; 400 for anything else, nesting too deep and repeated keys included.

    JSON leaves an object that names a key twice to the parser (Python's keeps the
    last value, others the first): such a body is refused rather than read one way.
    The body must be UTF-8 (RFC 8259; a byte order mark is ignored): ``json.loads``
    also reads UTF-16 and UTF-32 bytes, whose ``true`` and ``false`` are not the
    bytes ``non_numbers`` searches for, so booleans would pass as numbers.
    """
    not_utf8 = Refusal(400, "the body is not valid JSON: it is not UTF-8 text.")
    if 0 in body[:4]:  # UTF-16 or UTF-32 without a byte order mark (RFC 4627's test)
        raise not_utf8
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise not_utf8 from err
    try:
        return _DECODERS.decoder.decode(text)
    except RecursionError as err:
        raise Refusal(
            400, "the body is not valid JSON for this server: nested too deeply."
        ) from err
    except json.JSONDecodeError as err:
        # Some of json's messages end in "at" ("Unterminated string starting at").
        what = err.msg.removesuffix(" at")
        # json counts characters of the decoded text; a client counts the bytes it sent.
        bom = len(codecs.BOM_UTF8) if body.startswith(codecs.BOM_UTF8) else 0
        where = bom + len(text[: err.pos].encode())
        raise Refusal(400, f"the body is not valid JSON: {what} at byte {where}.") from err
    except ValueError as err:  # Python reads integers of at most 4300 digits
        raise Refusal(
            400, "the body is not valid JSON for this server: a number has too many digits."
        ) from err


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One decoded JSON object; a ``Refusal`` when it names a key twice."""
    decoded = dict(pairs)
    if len(decoded) != len(pairs):
        raise Refusal(400, "the body is not valid JSON for this server: an object repeats a key.")
    return decoded


_DECODERS = _Decoders()


def non_numbers(body: bytes, payload: dict[str, Any]) -> str:
    """Why the values of a JSON object hold a string or a boolean; ``""`` when they do not.

    numpy converts ``"0.5"`` and ``true`` to numbers without a word, and a walk
    over a batch's values would cost more than the model, so the body's bytes
    are searched instead. ``payload`` is ``body`` decoded: its keys are the only
    strings allowed and each of its boolean values the only literal. ``null``,
    ``NaN`` and ``Infinity`` count as numbers (the monitor rejects them).

    Examples:
        >>> import json
        >>> body = b'{"inputs": [[0.5, 1e-3]], "logits": true}'
        >>> non_numbers(body, json.loads(body))
        ''
        >>> body = b'{"inputs": [[0.5, "1"]]}'
        >>> non_numbers(body, json.loads(body))
        'inputs must be numbers: strings are not numbers.'
    """
    literals = sum(isinstance(value, bool) for value in payload.values())
    if _only_numbers(body, len(payload), literals):
        return ""
    # One pass drops what numbers, lists and whitespace are made of; what is left is
    # a few bytes of keys and literals ("true" and "false" lose their "e").
    rest = body.translate(None, _NUMBER_BYTES)
    if rest.count(b'"') != 2 * len(payload):
        return "inputs must be numbers: strings are not numbers."
    if rest.count(b"tru") + rest.count(b"fals") != literals:
        return "inputs must be numbers: booleans are not numbers."
    return ""


def _only_numbers(body: bytes, keys: int, literals: int) -> bool:
    """Whether every quote of ``body`` is a key's and every literal one of ``literals``.

    Each ``t`` or ``f`` outside the keys starts a ``true`` or ``false``. Each
    search is a ``memchr`` over the body (about 20 GB/s): a 1 MB batch costs
    20 µs, where the ``bytes.translate`` pass of ``non_numbers`` costs 250.
    ``False`` may be wrong (``Infinity`` holds an ``f``), never ``True``.
    """
    find = body.find
    quotes: list[int] = []
    at = find(b'"')
    while at >= 0:
        if len(quotes) == 2 * keys:
            return False
        quotes.append(at)
        at = find(b'"', at + 1)
    if len(quotes) != 2 * keys:
        return False
    spans = list(zip(quotes[::2], quotes[1::2], strict=True))
    for letter in (b"t", b"f"):
        at = find(letter)
        while at >= 0:
            if not any(start < at < end for start, end in spans):
                literals -= 1
                if literals < 0:
                    return False
            at = find(letter, at + 1)
    return literals == 0


def _shape_text(input_shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("batch" if d is None else str(d) for d in input_shape) + ")"


def to_batch(values: Any, dtype: np.dtype[Any], input_shape: tuple[int | None, ...]) -> np.ndarray:
    """Nested lists of numbers as an array of ``dtype``; 422 for anything else.

    The caller has made sure that no string or boolean is among the values
    (numpy would convert ``"0.5"`` and ``true`` silently). Numbers beyond the
    dtype's range become infinities, which the monitor rejects fail-closed;
    integers beyond any float's range are refused.
    """
    expected = f"inputs must be nested lists of numbers of shape {_shape_text(input_shape)}"
    try:
        with np.errstate(over="ignore"):  # overflow to Inf is meant: the monitor rejects it
            return np.asarray(values, dtype=dtype)
    except OverflowError as err:
        raise Refusal(422, f"{expected}: a number is too large for {dtype}.") from err
    except RecursionError as err:
        raise Refusal(422, f"{expected}: they nest too deeply.") from err
    except (ValueError, TypeError) as err:
        raise Refusal(422, f"{expected}.") from err
