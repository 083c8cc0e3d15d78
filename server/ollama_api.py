"""Ollama-compatible front door."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("ollama_api", __name__)
