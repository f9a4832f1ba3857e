"""``Refusal``: a request answered with a status code and one line that never quotes it.

Every refusal of the server (a malformed body, a body or batch too large, an
unknown model) is raised as a ``Refusal`` and answered as JSON whose detail is
one line of at most ``MAX_DETAIL`` characters.
"""

from __future__ import annotations

__all__ = ["Refusal", "MAX_DETAIL"]

MAX_DETAIL = 200


class Refusal(Exception):
    """A request refused with ``status`` and a one-line ``detail`` (at most ``MAX_DETAIL``)."""

    def __init__(self, status: int, detail: str) -> None:
        line = detail.splitlines()[0] if detail else "bad request."
        if len(line) > MAX_DETAIL:
            line = line[: MAX_DETAIL - 3] + "..."
        super().__init__(line)
        self.status = status
        self.detail = line
