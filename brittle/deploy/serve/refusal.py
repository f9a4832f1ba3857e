"""``Refusal``: a request answered with a status code and one line that never quotes it.

Every refusal of the server (a malformed body, a body or batch too large, an
unknown model) is raised as a ``Refusal`` and answered as JSON whose detail is
one line of at most ``MAX_DETAIL`` characters. A refusal for want of capacity
(503) also tells the client when to retry (``Retry-After``), and one of a content
coding the server does not read (415) which codings it accepts (``Accept-Encoding``).
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
        accept_encoding: The content codings a retry may use (sent as ``Accept-Encoding``).

    Examples:
        >>> Refusal(503, "busy.", retry_after=1).headers
        {'Retry-After': '1'}
        >>> Refusal(415, "compressed.", accept_encoding="identity").headers
        {'Accept-Encoding': 'identity'}
        >>> Refusal(413, "x" * 500).detail[-5:]
        'xx...'
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        retry_after: int | None = None,
        accept_encoding: str | None = None,
    ) -> None:
        line = detail.splitlines()[0] if detail else "bad request."
        if len(line) > MAX_DETAIL:
            line = line[: MAX_DETAIL - 3] + "..."
        super().__init__(line)
        self.status = status
        self.detail = line
        self.retry_after = retry_after
        self.accept_encoding = accept_encoding

    @property
    def headers(self) -> dict[str, str] | None:
        """The response headers the refusal needs: ``Retry-After``, ``Accept-Encoding``."""
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.accept_encoding is not None:
            headers["Accept-Encoding"] = self.accept_encoding
        return headers or None
