"""Reading and checking JSON request bodies: every failure is a 400 envelope."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import ApiError, BadRequest, PayloadTooLarge, UnsupportedMediaType

# Deeper nesting than any valid body of ours: refuse before recursing into it.
MAX_DEPTH = 32
# Model names: Ollama's longest real ones are under 100 characters; each becomes a queue key and a log word.
# No control characters (C0, DEL, C1) and no line or paragraph separators: a name is one line of a log.
# docs/openapi.yaml states the same rule as a pattern.
MAX_MODEL_NAME = 200
_MODEL_NAME = re.compile(rf"[^\x00-\x1f\x7f-\x9f\u2028\u2029]{{1,{MAX_MODEL_NAME}}}")
# Chunk numbers (seq, Last-Event-ID, ?after=) fit SQLite's and PostgreSQL's integers with room to spare.
MAX_SEQ = 2**31


def json_object(*, any_content_type: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413/415 error.

    ``any_content_type``: read the body as JSON whatever its Content-Type, or none, as Ollama does
    (litellm and Ollama's own ``curl -d`` examples send none); a body that is not JSON is still a 400.
    """
    if not (any_content_type or request.is_json):
        raise UnsupportedMediaType("the body must be JSON with Content-Type: application/json")
    raw = raw_body()
    if _too_deep(raw):
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise BadRequest("the body is not valid UTF-8", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return value


def raw_body() -> bytes:
    """The body's bytes; 413 when it is larger than ``MAX_CONTENT_LENGTH``, chunked or not; 408 when it
    takes longer than ``BODY_TIMEOUT`` to arrive."""
    with _deadline(current_app.config["BODY_TIMEOUT"]):
        limit = request.max_content_length
        try:
            raw = request.get_data(cache=True)    # 413 at once for a Content-Length over the limit
        except RequestEntityTooLarge:
            raise too_large(limit) from None
        # A chunked body has no Content-Length: Werkzeug stops reading at the limit
        # and returns a silently truncated body; one byte more means it was too large.
        if limit is not None and request.content_length is None and len(raw) >= limit:
            if request.environ["wsgi.input"].read(1):
                raise too_large(limit)
    return raw


def too_large(limit: int | None) -> PayloadTooLarge:
    """The 413, naming the limit and the setting that sets it (Werkzeug's says only "exceeds the capacity limit")."""
    return PayloadTooLarge(f"the body is larger than {limit} bytes, the server's limit (ORCH_MAX_BODY_BYTES)",
                           code="request_entity_too_large")


class _SlowBody(Exception):
    """Raised into the reading greenlet by gevent when the body's deadline passes."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """A deadline on reading the whole body (gevent only: in-process tests have the body in memory).

    A socket timeout would not do: it bounds each read, and one byte every 2 s kept 300
    connections open for good.  Once the deadline passes the request is answered 408 and
    its connection closed (``Connection: close``: the rest of its body is never read).
    """
    if request.environ.get("gunicorn.socket") is None or not _gevent_patched():
        yield
        return
    import gevent

    timer = gevent.Timeout(seconds, _SlowBody)
    timer.start()
    try:
        yield
    except _SlowBody:
        raise ApiError(f"the request body did not arrive within {seconds:g} s", code="body_timeout",
                       status=408) from None
    finally:
        timer.close()


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (RFC 8259) and Ollama do not.
    raise ValueError(f"{name} is not a JSON value")


def text(value: Any, name: str, *, allow_empty: bool = False) -> str:
    """A string field that can be stored as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string", code="invalid_field")
    if not allow_empty and not value.strip():
        raise BadRequest(f"'{name}' must not be empty", code="invalid_field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{name}' is not valid Unicode (lone surrogate)", code="invalid_field") from None
    return value


def is_model_name(value: str) -> bool:
    """Whether ``value`` is a model name: 1 to ``MAX_MODEL_NAME`` characters, no control characters or line breaks."""
    return _MODEL_NAME.fullmatch(value) is not None


def model_name(value: Any, name: str = "model") -> str:
    """A model name from a chat body (the rule of agents' model lists too), or BadRequest."""
    model = text(value, name)
    if not is_model_name(model):
        raise BadRequest(f"'{name}' must be a name of at most {MAX_MODEL_NAME} characters without control "
                         "characters or line breaks",
                         code="invalid_field")
    return model


def integer(value: Any, name: str, *, minimum: int = 0, maximum: int = MAX_SEQ) -> int:
    # bool is an int subclass: True must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer", code="invalid_field")
    if not minimum <= value <= maximum:
        raise BadRequest(f"'{name}' must be between {minimum} and {maximum}", code="invalid_field")
    return value


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false", code="invalid_field")
    return value


def mapping(value: Any, name: str) -> dict[str, Any]:
    """A JSON object that can be stored as UTF-8, keys and nested strings included."""
    if not isinstance(value, dict):
        raise BadRequest(f"'{name}' must be a JSON object", code="invalid_field")
    try:
        # ensure_ascii=False, as storage writes it: a lone surrogate then fails here, not in the database.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        raise BadRequest(f"'{name}' holds invalid Unicode", code="invalid_field") from None
    return value


def _too_deep(raw: bytes) -> bool:
    # Counting brackets in C first keeps the common small body on the fast path.
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False
