"""Errors the model server turns into HTTP answers.

They live here, not in ``uniframe.errors``, because ``serve`` ships inside
images and imports nothing else of ours.
"""

from __future__ import annotations


class ServeError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status and a metrics kind."""

    status = 500
    kind = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServeError):
    """The request is malformed or does not match the model (HTTP 400)."""

    status = 400
    kind = "bad_request"


class NotFound(ServeError):
    """Unknown path, model or version (HTTP 404)."""

    status = 404
    kind = "not_found"


class MethodNotAllowed(ServeError):
    status = 405
    kind = "method_not_allowed"


class TooLarge(ServeError):
    """The body is larger than ``--max-body-size`` (HTTP 413)."""

    status = 413
    kind = "too_large"


class HeadersTooLarge(ServeError):
    status = 431
    kind = "headers_too_large"


class InferenceFailed(ServeError):
    """The runtime failed on input that passed validation (HTTP 500)."""

    status = 500
    kind = "inference_failed"


class ModelLoadError(Exception):
    """A model file cannot be served; raised at start-up, before the port opens."""
