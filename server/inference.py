"""Agent protocol: signed poll and chunk stream (docs/protocol.md)."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("inference", __name__)
