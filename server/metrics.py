"""Prometheus metrics and health."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("metrics", __name__)
