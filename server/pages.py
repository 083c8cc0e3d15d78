"""The chat and operator pages: static HTML plus a little JavaScript that uses only the public API.

They double as an example for frontend authors; nothing in a page is
rendered from data on the server side.
"""
from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)

# The pages load only their own scripts and styles and talk only to this
# server: even a rendering bug could not run injected script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@bp.get("/")
def chat_page():
    return render_template("chat.html", script="chat.js"), PAGE_HEADERS


@bp.get("/status")
def status_page():
    return render_template("status.html", script="status.js"), PAGE_HEADERS
