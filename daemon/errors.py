"""Errors that reach API clients: each carries its HTTP status and a default message."""

from __future__ import annotations


class StepdError(Exception):
    """Base error; rendered as {"error": message} with `status`."""

    status = 500
    message = "internal error"

    def __init__(self, message: str | None = None, **extra: object) -> None:
        super().__init__(message or self.message)
        self.extra = extra

    @property
    def text(self) -> str:
        return str(self.args[0])


class BadRequest(StepdError):
    status = 400
    message = "bad request"


class Unauthorized(StepdError):
    status = 401
    message = "missing or invalid bearer token"


class Forbidden(StepdError):
    status = 403
    message = "token lacks the required permission"


class NotFound(StepdError):
    status = 404
    message = "not found"


class MethodNotAllowed(StepdError):
    status = 405
    message = "method not allowed"


class Conflict(StepdError):
    status = 409
    message = "conflict"


class PayloadTooLarge(StepdError):
    status = 413
    message = "request body too large"


class UnsupportedMediaType(StepdError):
    status = 415
    message = "Content-Type must be application/json"


class Unprocessable(StepdError):
    status = 422
    message = "invalid workflow"


class Unavailable(StepdError):
    status = 503
    message = "service unavailable"


class ConfigError(Exception):
    """The configuration file is invalid; the message says which key and why."""
