"""The server's search of a body's bytes for strings and booleans, against a walk of its values.

``non_numbers`` decides from the raw bytes (``memchr`` searches, then one
``bytes.translate`` pass when they are in doubt) what a walk over the decoded
values decides exactly: a body is refused when its values hold a string or a
boolean beyond its boolean flags. The bodies are written the ways JSON allows:
keys in escapes, whitespace, ``NaN``, ``Infinity``, ``null``, strings with
escaped quotes.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from brittle.deploy.serve.body import decode_json, non_numbers
from brittle.deploy.serve.refusal import Refusal

STRING = "inputs must be numbers: strings are not numbers."
BOOLEAN = "inputs must be numbers: booleans are not numbers."


def _walk(values: Any) -> str:
    """The reference: the first kind of non-number among the nested values."""
    kinds = set()
    stack = [values]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            kinds.add("string")
        elif isinstance(value, bool):
            kinds.add("boolean")
    return STRING if "string" in kinds else BOOLEAN if kinds else ""


def _leaf(rng: random.Random, odd: float) -> Any:
    if rng.random() >= odd:
        return rng.choice([rng.uniform(-2, 2), rng.randint(-9, 9), 1e-7, -3.5e12, None])
    return rng.choice(
        [
            "0.5",
            "t",
            "f",
            'a"b',
            "",
            True,
            False,
            float("nan"),
            float("inf"),
            float("-inf"),
        ]
    )


def _nested(rng: random.Random, depth: int, odd: float) -> Any:
    if depth == 0:
        return _leaf(rng, odd)
    return [_nested(rng, depth - 1, odd) for _ in range(rng.randint(1, 3))]


def _encode(rng: random.Random, payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, separators=rng.choice([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    if rng.random() < 0.3:  # a key spelt with escapes decodes to the same key
        text = text.replace('"inputs"', '"\\u0069np\\u0075ts"', 1)
    return text.encode()


def test_non_numbers_equals_a_walk_of_the_values() -> None:
    rng = random.Random(0)
    seen = {"": 0, STRING: 0, BOOLEAN: 0}
    for _ in range(3000):
        payload: dict[str, Any] = {"inputs": _nested(rng, rng.randint(1, 4), rng.random() * 0.1)}
        if rng.random() < 0.5:
            payload["logits"] = rng.random() < 0.5
        if rng.random() < 0.5:
            payload = dict(reversed(payload.items()))
        body = _encode(rng, payload)
        expected = _walk(payload["inputs"])
        assert non_numbers(body, json.loads(body)) == expected, body
        seen[expected] += 1
    assert min(seen.values()) >= 100, seen  # each answer is asked for (seeded: 2401, 454, 145)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"inputs": [[Infinity, -Infinity, NaN, null]], "logits": false}', ""),
        (b'{"logits": true, "inputs": [[1, true]]}', BOOLEAN),
        (b'{"logits": true, "inputs": [[1, false]]}', BOOLEAN),
        (b'{"inputs": [[1, "true"]], "logits": false}', STRING),
        (b'{"inputs": [[1, "\\""]]}', STRING),
        (b'{"inputs": [[1, 2]], "logits": true}', ""),
    ],
)
def test_the_literals_that_look_alike(body: bytes, expected: str) -> None:
    assert non_numbers(body, json.loads(body)) == expected


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_bodies_in_other_encodings_than_utf8_are_refused(encoding: str) -> None:
    # json.loads reads UTF-16 and UTF-32 bytes too, where "true" is not the bytes
    # non_numbers searches for: such a body passed its booleans on as numbers.
    body = '{"inputs": [[1, true, false]]}'.encode(encoding)
    assert non_numbers(body, json.loads(body)) == ""  # what made it pass
    with pytest.raises(Refusal, match="not UTF-8 text") as refused:
        decode_json(body)
    assert refused.value.status == 400


def test_a_utf8_byte_order_mark_is_ignored() -> None:
    body = b'\xef\xbb\xbf{"inputs": [[1, 2]]}'
    assert decode_json(body) == {"inputs": [[1, 2]]}
    assert non_numbers(body, decode_json(body)) == ""


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"inputs": "abc', "Unterminated string starting at byte 11."),
        (b'{"inputs": "a\x01"}', "Invalid control character at byte 13."),
        (b'{"inputs": [1] x', "Expecting ',' delimiter at byte 15."),
        # Bytes, not characters: a byte order mark and two-byte characters come before.
        (b'\xef\xbb\xbf{"inputs": "abc', "Unterminated string starting at byte 14."),
        ('{"é": "éé", x'.encode(), "Expecting property name enclosed in double quotes at byte 15."),
    ],
)
def test_a_json_error_says_where_once(body: bytes, detail: str) -> None:
    # Said "Unterminated string starting at at byte 11", and counted characters.
    with pytest.raises(Refusal) as refused:
        decode_json(body)
    assert refused.value.detail == f"the body is not valid JSON: {detail}"
