"""gunicorn settings for the orchestrator (``gunicorn -c python:server.gunicorn_conf``).

Read from the server's settings table (``ORCH_BIND``, ``ORCH_WORKERS``,
``ORCH_WORKER_CONNECTIONS``, ``ORCH_ACCESS_LOG``, ``ORCH_LOG_LEVEL``), like
every other setting.  One gevent worker by default: the in-process notifier
reaches only streams and long polls in its own process.
"""
import sys

from server.config import ConfigError, check_workers, load_config

try:
    _settings = load_config()
    check_workers(_settings)
except ConfigError as exc:
    # gunicorn would print a traceback for an exception raised here: one line and exit instead.
    print(f"orchestrator: {exc}", file=sys.stderr)
    sys.exit(2)

bind = _settings["BIND"]
worker_class = "gevent"
workers = _settings["WORKERS"]
# Every parked long poll and open stream holds one; the default of 1,000 is far too low.
worker_connections = _settings["WORKER_CONNECTIONS"]
# For async workers this is the heartbeat timeout, not a request timeout:
# long streams are never cut by it.
timeout = 30
# Parked polls and streams are woken at SIGTERM (see below), so this is
# only a backstop.
graceful_timeout = 10
# Agents re-poll within POLL_INTERVAL (0.1 s) or at once after a long poll,
# so a few seconds keeps their connections alive; longer would make SIGTERM
# wait for idle keep-alive connections (they count as busy until it ends).
keepalive = 5
control_socket_disable = True
accesslog = _settings["ACCESS_LOG"] or None
errorlog = "-"
loglevel = _settings["LOG_LEVEL"].lower()


def post_worker_init(worker):
    """Wake parked long polls and streams at SIGTERM instead of waiting graceful_timeout."""
    import signal

    import gevent

    original = worker.handle_exit

    def handle_exit(sig, frame):
        original(sig, frame)
        app = getattr(worker, "wsgi", None)
        store = getattr(app, "extensions", {}).get("storage")
        if store is not None:
            # Not in the signal handler itself: taking a lock there can deadlock.
            gevent.spawn(store.notifier.close)

    signal.signal(signal.SIGTERM, handle_exit)
