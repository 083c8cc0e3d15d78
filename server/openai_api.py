"""OpenAI-compatible front door."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("openai_api", __name__)
