"""The native chat API: SSE streams, resume, history."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("chat", __name__)
