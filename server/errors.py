"""The one error envelope: ``{"error": {"code": ..., "message": ...}}``.

Views raise an ``ApiError`` subclass; ``init_app`` registers the handlers
that render it, and turns Werkzeug's own HTTP errors (404, 405, 413, ...)
into the same envelope so an API client never gets an HTML page.
"""
from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from .storage.base import StorageBusy, StorageError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client caused or must be told about, with its HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra = extra or {}

    def envelope(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class Gone(ApiError):
    status, code = 410, "gone"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class TooManyRequests(ApiError):
    status, code = 429, "too_many_requests"


class ServiceUnavailable(ApiError):
    status, code = 503, "service_unavailable"


# Seconds a client is told to wait before retrying a 429 or a 503.
RETRY_AFTER_SECONDS = 1


# Werkzeug's names, snake_cased, become the envelope's codes.
def _code_for(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("-", "_")


def _is_ollama_path(path: str) -> bool:
    return path.startswith("/api/") and not path.startswith("/api/v1/")


def render(exc: ApiError):
    response = jsonify(exc.envelope())
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if exc.status in (429, 503):
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def storage_unavailable(exc: Exception) -> ApiError:
    """What a client is told when the database fails under its request: 503, retry (agents do)."""
    why = "busy (locked by another process)" if isinstance(exc, StorageBusy) else "unavailable"
    return ServiceUnavailable(f"the server's database is {why}: retry in a moment", code="storage_unavailable")


def _render_storage_error(exc: Exception):
    # No traceback: the storage's health logs one line per change of state, not one per request.
    log.debug("request refused, storage unavailable: %s", exc)
    if _is_ollama_path(request.path):
        response = jsonify({"error": storage_unavailable(exc).message})
        response.status_code = 503
        return response
    return render(storage_unavailable(exc))


def _render_os_error(exc: OSError):
    if exc.errno not in (errno.EMFILE, errno.ENFILE):
        raise exc
    # Out of file descriptors (a database file, a socket): the server's limit, not the client's fault.
    log.warning("request refused: %s", exc)
    return render(ServiceUnavailable("the server is out of file descriptors: retry in a moment",
                                     code="server_busy"))


def _close_after_unread_body(response):
    # A 408 (whatever the door's error shape) left the body unread: gunicorn would drain it before the
    # next request on the connection, as slowly as the client sends it.  It ignores an application's
    # Connection header, so the reading side is shut: the drain sees the end at once and the connection closes.
    if response.status_code == 408:
        response.headers["Connection"] = "close"
        client = request.environ.get("gunicorn.socket")
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RD)
            except OSError:
                pass            # already gone
    return response


def init_app(app: Flask) -> None:
    """Render every API error, ours and Werkzeug's, as the JSON envelope."""
    app.register_error_handler(ApiError, render)
    app.after_request(_close_after_unread_body)
    app.register_error_handler(StorageError, _render_storage_error)
    app.register_error_handler(OSError, _render_os_error)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        error = ApiError(exc.description or exc.name, code=_code_for(exc), status=exc.code or 500)
        if _is_ollama_path(request.path):
            # Routing errors (unknown /api/show, GET /api/chat) never reach the
            # Ollama blueprint's handlers; Ollama clients expect {"error": "..."}.
            response = jsonify({"error": error.message})
            response.status_code = error.status
        else:
            response = render(error)
        if exc.code == 405 and exc.response is None:
            allowed = getattr(exc, "valid_methods", None)
            if allowed:
                response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # Only truly unexpected errors reach here (HTTPException has its own
        # handler above); log the traceback and give the client the envelope.
        log.error("unhandled error: %s", exc, exc_info=True)
        return render(ApiError("internal server error", code="internal_error", status=500))
