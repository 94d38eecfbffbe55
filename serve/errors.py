"""The server's error type: every failure a client can cause becomes one ``ApiError`` with an HTTP status and a
one-line detail, answered as A1111's API answers errors (``{"error", "detail", "body", "errors"}``)."""

from __future__ import annotations

import json


class ApiError(ValueError):
    """A request the server refuses: ``status`` (4xx), ``error`` (a short type name) and a one-line ``detail``."""

    def __init__(self, status: int, detail: str, error: str | None = None, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or type(self).__name__
        self.headers = dict(headers or {})  # e.g. Retry-After on a 503


class BadRequest(ApiError):
    def __init__(self, detail: str, error: str = "BadRequest"):
        super().__init__(422, detail, error)


class NotFound(ApiError):
    def __init__(self, detail: str, error: str = "NotFound"):
        super().__init__(404, detail, error)


class TooLarge(ApiError):
    def __init__(self, detail: str, error: str = "PayloadTooLarge"):
        super().__init__(413, detail, error)


class Busy(ApiError):
    """503: the job queue is full; ``Retry-After`` says when to try again."""

    def __init__(self, detail: str, retry_after_s: int):
        super().__init__(503, detail, "ServiceUnavailable", {"Retry-After": str(retry_after_s)})


def printable(text: str, limit: int = 200) -> str:
    """Untrusted text made safe for one log or error line: control characters escaped, length capped."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def error_body(error: str, detail, message: str | None = None) -> dict:
    """A1111's error JSON (``api.py``'s ``handle_exception``)."""
    return {"error": error, "detail": detail, "body": "", "errors": message if message is not None else str(detail)}


def json_object(body: bytes) -> dict:
    """A request body that must be one JSON object; anything else is a ``BadRequest`` naming why."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the body is not valid JSON ({printable(e, 120)})") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(value).__name__}")
    return value
