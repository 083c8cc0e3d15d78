"""The agent socket's frames (docs/protocol.md, "The WebSocket protocol"): one home for both sides.

Every frame is one WebSocket text message holding a JSON object whose ``type``
names it.  A job's chunks travel exactly as the HTTP POST body carries them
(``id``, ``seq``, ``chunks``, ``done``, ``stats``, ``error``) with
``"type": "chunks"`` added: ``chunks_frame`` on the agent's side and the
server's ``chunk_post`` on its side are the one place each that knows that body.
"""
from __future__ import annotations

import json
from typing import Any

# Bumped when a frame changes incompatibly; the server's welcome names the one it speaks.
VERSION = 1

# agent -> server
ANNOUNCE = "announce"      # {models, slots, jobs_seen, kinds}: what the agent serves and runs, how many more jobs
CHUNKS = "chunks"          # a job's chunks, a heartbeat or its end: the HTTP POST body
# server -> agent
WELCOME = "welcome"        # {protocol, agent, lease_seconds, ping_interval, max_frame_bytes}
JOB = "job"                # the poll's 200 body
ACK = "ack"                # {id, next_seq, done, cancelled}: cumulative, the server holds every chunk before next_seq
CANCEL = "cancel"          # {id}: the user has gone, stop generating
ERROR = "error"            # {id?, code, message, next_seq?}: a frame refused; the codes of the HTTP protocol's errors

AGENT_TYPES = (ANNOUNCE, CHUNKS)
SERVER_TYPES = (WELCOME, JOB, ACK, CANCEL, ERROR)

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001          # the server shuts down: reconnect with back-off
CLOSE_POLICY_VIOLATION = 1008    # an oversized frame, a flood, a frame that is not a JSON object
CLOSE_INTERNAL_ERROR = 1011


class FrameError(ValueError):
    """A frame that is not a JSON object with a string ``type``; the message says why."""


def encode(frame_type: str, **fields: Any) -> str:
    """One frame as the text to send."""
    return json.dumps({"type": frame_type, **fields}, ensure_ascii=False, separators=(",", ":"))


def decode(text: str | bytes) -> dict[str, Any]:
    """A received frame as a dict with a string ``type``; raises FrameError."""
    if isinstance(text, bytes):
        raise FrameError("frames are text messages holding JSON, not binary")
    try:
        frame = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError("a frame must be a JSON object")
    if not isinstance(frame.get("type"), str):
        raise FrameError("a frame needs a string 'type'")
    return frame


def chunks_frame(body: dict[str, Any]) -> str:
    """A chunk batch (the HTTP POST body: id, seq, chunks, done, stats, error) as a ``chunks`` frame."""
    return encode(CHUNKS, **body)


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259), as for HTTP bodies.
    raise ValueError(f"{name} is not a JSON value")
