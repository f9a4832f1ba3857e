"""``Refusal``: a request answered with a status code and one line that never quotes it.

Every refusal of the server (a malformed body, a body or batch too large, an
unknown model) is raised as a ``Refusal`` and answered as JSON whose detail is
one line of at most ``MAX_DETAIL`` characters. A refusal for want of capacity
(503) also tells the client when to retry (``Retry-After``).
"""

from __future__ import annotations

__all__ = ["Refusal", "MAX_DETAIL"]

MAX_DETAIL = 200


class Refusal(Exception):
    """A request refused with ``status`` and a one-line ``detail`` (at most ``MAX_DETAIL``).

    Args:
        status: The HTTP status code.
        detail: Why, in words that never quote the request.
        retry_after: Seconds after which a retry may succeed (sent as ``Retry-After``).

    Examples:
        >>> Refusal(503, "busy.", retry_after=1).headers
        {'Retry-After': '1'}
        >>> Refusal(413, "x" * 500).detail[-5:]
        'xx...'
    """

    def __init__(self, status: int, detail: str, *, retry_after: int | None = None) -> None:
        line = detail.splitlines()[0] if detail else "bad request."
        if len(line) > MAX_DETAIL:
            line = line[: MAX_DETAIL - 3] + "..."
        super().__init__(line)
        self.status = status
        self.detail = line
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str] | None:
        """The response headers the refusal needs: ``Retry-After`` when it has one."""
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}
