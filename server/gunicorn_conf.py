"""gunicorn settings for the orchestrator (``gunicorn -c python:server.gunicorn_conf``).

Read from the server's settings table (``ORCH_BIND``, ``ORCH_WORKERS``,
``ORCH_WORKER_CONNECTIONS``, ``ORCH_ACCESS_LOG``, ``ORCH_LOG_LEVEL``), like
every other setting.  One gevent worker by default: the in-process notifier
reaches only streams and long polls in its own process.
"""
import os
import resource
import sys

from server.config import ENV_PREFIX, ConfigError, check_workers, load_config

try:
    _settings = load_config()
    check_workers(_settings)
except ConfigError as exc:
    # gunicorn would print a traceback for an exception raised here: one line and exit instead.
    print(f"orchestrator: {exc}", file=sys.stderr)
    sys.exit(2)

# Descriptors a worker needs besides its connections: the listening socket, logs, pipes, PostgreSQL's
# listener, and each pooled SQLite connection's database and WAL files (its -shm is shared).
FD_RESERVE = 64 + 3 * _settings["POOL_SIZE"]
# Connections kept for agents and /healthz however many chat streams are open.
STREAM_HEADROOM = 0.1


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft open-files limit to the hard one (workers inherit it); the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fit_connections(wanted: int, soft_limit: int, max_streams: int) -> tuple[int, int]:
    """Connections and chat streams a worker can hold under ``soft_limit`` open files.

    Past the limit, accept() and SQLite's open() failed with "Too many open files" (500s, tracebacks);
    a worker that never holds more connections than it has descriptors leaves the rest waiting in the
    listen backlog, and streams beyond their share get a clean 429.
    """
    connections = max(1, min(wanted, soft_limit - FD_RESERVE))
    streams = min(max_streams, max(1, connections - max(1, int(connections * STREAM_HEADROOM))))
    return connections, streams


_soft, _hard = raise_fd_limit()
_connections, _streams = fit_connections(_settings["WORKER_CONNECTIONS"], _soft, _settings["MAX_STREAMS"])
if _streams < _settings["MAX_STREAMS"]:
    # The workers build their app after this module ran: they read the lowered figure.
    os.environ[ENV_PREFIX + "MAX_STREAMS"] = str(_streams)

bind = _settings["BIND"]
worker_class = "gevent"
workers = _settings["WORKERS"]
# Every parked long poll and open stream holds one; the default of 1,000 is far too low.
worker_connections = _connections
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


def on_starting(server):
    """Say what the open-files limit allows, and when it is below what ORCH_WORKER_CONNECTIONS asks."""
    server.log.info("open files: limit %d (hard %d); %d connections per worker, %d chat streams", _soft, _hard,
                    _connections, _streams)
    if _connections < _settings["WORKER_CONNECTIONS"]:
        server.log.warning(
            "%sWORKER_CONNECTIONS=%d needs %d open files but the limit is %d (hard %d): serving at most %d "
            "connections and %d chat streams per worker; raise the limit (ulimit -n, systemd LimitNOFILE=)",
            ENV_PREFIX, _settings["WORKER_CONNECTIONS"], _settings["WORKER_CONNECTIONS"] + FD_RESERVE, _soft, _hard,
            _connections, _streams)


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
