"""gunicorn settings for the orchestrator (``gunicorn -c python:server.gunicorn_conf``).

One gevent worker by default: the in-process notifier reaches only streams
and long polls in its own process.  More workers need ``ORCH_NOTIFIER=poll``.
"""
import os

bind = os.environ.get("ORCH_BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("ORCH_WORKERS", "1"))
# Every parked long poll and open stream holds one; 10,000 idle connections
# measured about 135 MB here.  The default of 1,000 is far too low.
worker_connections = int(os.environ.get("ORCH_WORKER_CONNECTIONS", "10000"))
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
accesslog = os.environ.get("ORCH_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("ORCH_LOG_LEVEL", "info").lower()


def post_worker_init(worker):
    """Wake parked long polls and streams at SIGTERM instead of waiting graceful_timeout."""
    import signal

    import gevent

    original = worker.handle_exit

    def handle_exit(sig, frame):
        original(sig, frame)
        notifier = getattr(worker.wsgi, "extensions", {}).get("notifier")
        if notifier is not None:
            # Not in the signal handler itself: taking a lock there can deadlock.
            gevent.spawn(notifier.close)

    signal.signal(signal.SIGTERM, handle_exit)
