"""The agent protocol's paths, one home for both sides (docs/protocol.md has the bodies)."""
from __future__ import annotations

# GET: a job (200) or nothing (204); query `models=a,b&slots=N&wait=S`.
POLL_PATH = "/api/v1/inference/poll"
# POST: a batch of one job's chunks, a heartbeat, or its end.
STREAM_PATH = "/api/v1/inference/stream"
# GET upgrading to a WebSocket: one long-lived connection per agent (protocol/frames.py has its frames).
CONNECT_PATH = "/api/v1/agents/connect"
