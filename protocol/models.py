"""Model names, job kinds and the model report: what server and agent agree on about models.

Names follow Ollama's rule: a name without a tag means ``:latest``, so ``sim``
and ``sim:latest`` are one model (``canonical_model``).  Kinds are what an
agent can run: a poll says which (``kinds=chat,features,embed``); a poll
without ``kinds`` is an older agent, which runs plain chats only.

The report (``POST /api/v1/inference/models``, docs/protocol.md) carries what
the agent's Ollama says of its models, for the server's ``/api/tags``,
``/api/show`` and ``/api/ps``::

    {"models": [{"name", "size", "digest", "modified_at", "details", "show": {...}}],
     "running": [{"name", "size", "size_vram", "expires_at", "context_length", ...}],
     "version": "0.12.6"}
"""
from __future__ import annotations

# Job kinds. CHAT: messages of text in, text out; every agent runs those. FEATURES: a chat that
# uses tools, images, format or think, or whose answer may carry them. EMBED: embeddings.
CHAT, FEATURES, EMBED = "chat", "features", "embed"
KINDS = (CHAT, FEATURES, EMBED)
LEGACY_KINDS = (CHAT,)
# What /api/show keeps of Ollama's answer; `license` and `modelfile` (often tens of KB) are dropped.
SHOW_FIELDS = ("details", "model_info", "capabilities", "template", "parameters", "modified_at", "system")
RUNNING_FIELDS = ("name", "model", "size", "size_vram", "digest", "details", "expires_at", "context_length")
TAG_FIELDS = ("name", "model", "size", "digest", "modified_at", "details")
MAX_REPORTED_MODELS = 100


def canonical_model(name: str) -> str:
    """Ollama's full name for ``name``: a missing tag means ``:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
