"""The agent protocol's paths, one home for both sides (docs/protocol.md has the bodies)."""
from __future__ import annotations

# GET: a job (200) or nothing (204); query `models=a,b&slots=N&wait=S&kinds=chat,features,embed`.
POLL_PATH = "/api/v1/inference/poll"
# POST: a batch of one job's chunks, a heartbeat, or its end.
STREAM_PATH = "/api/v1/inference/stream"
# POST: what the agent's Ollama reports of its models (protocol.models).
MODELS_PATH = "/api/v1/inference/models"
# POST, no body: the agent is leaving (a warm stop): it takes no more jobs and is not offered as online.
LEAVE_PATH = "/api/v1/inference/leave"
# Chunks in one POST: every server accepts at least this many (ORCH_MAX_CHUNKS_PER_POST), and the
# reference agent never sends more in one batch.
MAX_CHUNKS_PER_POST = 1000
# GET upgrading to a WebSocket: one long-lived connection per agent (protocol/frames.py has its frames).
CONNECT_PATH = "/api/v1/agents/connect"
