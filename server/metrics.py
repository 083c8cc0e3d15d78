"""Prometheus metrics (``GET /metrics``) and health (``GET /healthz``).

Each app has its own ``CollectorRegistry``: tests build many apps, and the
global registry refuses a second metric of the same name.  No view calls in
here: agent polls and chunk POSTs are counted by an ``after_app_request``
hook keyed by endpoint, lease expiries by a sweeper listener, and the gauges
are read from the database at scrape time by ``DatabaseCollector`` with a few
short indexed queries.  The one call from elsewhere is ``observe_delivery``, made by
the streaming engine as each chunk is handed to a client's stream.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .auth import admin_required
from .errors import ApiError
from .storage import StorageError, agents, get_db, get_storage, migrations, stats

bp = Blueprint("metrics", __name__)

POLL_ENDPOINT = "inference.poll"
CHUNK_ENDPOINT = "inference.stream"
# Token latencies are tens of ms on a LAN; a queued request waits seconds to minutes.
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Requests whose first token was already observed; bounded, and one entry per job in flight is plenty.
FIRST_TOKEN_MEMORY = 10_000
# Finished requests are counted this long after their finished_at: another worker process may
# commit a row stamped a moment before one this process already counted.
SETTLE_SECONDS = 2.0
# /healthz waits this long for a locked database's write lock before it answers 503.
HEALTH_WRITE_DEADLINE = 0.5
# Queue depth is labelled by model only for models online agents declare, at most this many.
MAX_MODEL_LABELS = 100
OTHER_MODELS = "(other)"


class Metrics:
    """One app's metrics: counters and histograms fed by hooks, gauges read at scrape time."""

    def __init__(self, app: Flask) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.chunk_posts = Counter("orchestrator_chunk_posts", "Chunk POSTs from agents, by HTTP status.",
                                   ["status"], registry=registry)
        self.polls = Counter("orchestrator_polls", "Agent polls, by kind (short, long) and outcome (job, empty, error).",
                             ["kind", "outcome"], registry=registry)
        self.lease_expiries = Counter("orchestrator_lease_expiries",
                                      "Jobs whose lease ran out, by what became of them (requeued, failed, cancelled).",
                                      ["outcome"], registry=registry)
        self.queue_timeouts = Counter("orchestrator_queue_timeouts", "Requests no agent took within QUEUE_TIMEOUT.",
                                      registry=registry)
        self.first_token = Histogram("orchestrator_time_to_first_token_seconds",
                                     "From a request's creation to its first token stored.",
                                     buckets=FIRST_TOKEN_BUCKETS, registry=registry)
        self.socket_frames = Counter("orchestrator_agent_socket_frames",
                                     "WebSocket frames on agent sockets, by direction (in, out) and frame type.",
                                     ["direction", "type"], registry=registry)
        self.agent_sockets = Gauge("orchestrator_agent_sockets", "Agent WebSockets open in this worker.",
                                   registry=registry)
        self.delivery = Histogram("orchestrator_token_delivery_seconds",
                                  "From a chunk stored to its write to a client's stream.",
                                  buckets=DELIVERY_BUCKETS, registry=registry)
        # Known label values start at zero, so a rate() never misses its first increment.
        for kind in ("short", "long"):
            for outcome in ("job", "empty", "error"):
                self.polls.labels(kind, outcome)
        for outcome in ("requeued", "failed", "cancelled"):
            self.lease_expiries.labels(outcome)
        registry.register(DatabaseCollector(app))
        self._first_token_seen: OrderedDict[str, None] = OrderedDict()
        self.listening = False

    def sweep_listener(self, changed: list) -> None:
        """Count what a sweep changed (``sweeper.listeners`` entry)."""
        for item in changed:
            if "agent_id" in item.extra:            # only expire_leases names the agent
                self.lease_expiries.labels(item.outcome).inc()
            elif item.outcome == "failed":
                self.queue_timeouts.inc()

    def observe_first_token(self, conn, job_id: str) -> None:
        """Observe a job's time to first token, once, as soon as it has one."""
        if job_id in self._first_token_seen:
            return
        wait = stats.first_token_wait(conn, job_id)
        if wait is None:
            return
        self.first_token.observe(wait)
        self._first_token_seen[job_id] = None
        if len(self._first_token_seen) > FIRST_TOKEN_MEMORY:
            self._first_token_seen.popitem(last=False)


class DatabaseCollector:
    """Gauges and counters that the database already knows, read at scrape time."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.online_window = app.config["AGENT_ONLINE_SECONDS"]
        # Counters of finished requests start at zero with the process, as Prometheus expects.
        self._finished: dict[str, int] = {"done": 0, "failed": 0, "cancelled": 0}
        self._counted_until = time.time()

    def describe(self) -> list[Metric]:
        return []   # no describe-time queries: the registry must not touch the database at start

    def collect(self) -> Iterator[Metric]:
        with get_storage(self.app).connection() as conn:
            yield from self._collect(conn, time.time())

    def _collect(self, conn, now: float) -> Iterator[Metric]:
        states = GaugeMetricFamily("orchestrator_requests", "Requests not finished yet, by state.", labels=["state"])
        for state, count in stats.jobs_by_state(conn).items():
            states.add_metric([state], count)
        yield states

        depth = GaugeMetricFamily("orchestrator_queue_depth", "Queued requests per model (models no online agent "
                                  f"declares are summed under model=\"{OTHER_MODELS}\").", labels=["model"])
        declared = {m for agent in agents.online(conn, now, self.online_window) for m in agent["models"]}
        for model, queued in model_labels(stats.queue_by_model(conn), declared).items():
            depth.add_metric([model], queued)
        yield depth

        totals = stats.agent_totals(conn, now, self.online_window)
        yield GaugeMetricFamily("orchestrator_agents_online", "Agents that polled or posted within "
                                "AGENT_ONLINE_SECONDS and have not said they are leaving.", value=totals["online"])
        yield CounterMetricFamily("orchestrator_tokens_streamed", "Tokens (chunks) agents have streamed in.",
                                  value=totals["tokens_streamed"])
        yield CounterMetricFamily("orchestrator_jobs_done", "Jobs agents have finished.", value=totals["jobs_done"])
        yield self._finished_family(conn, now)

    def _finished_family(self, conn, now: float) -> Metric:
        # Only the rows finished since the last scrape: one range over the finished_at index.
        until = now - SETTLE_SECONDS
        if until > self._counted_until:
            for status, count in stats.finished_between(conn, self._counted_until, until).items():
                self._finished[status] = self._finished.get(status, 0) + count
            self._counted_until = until
        family = CounterMetricFamily("orchestrator_requests_finished",
                                     "Requests that reached a final state (done, failed, cancelled) since start; "
                                     "counted ~2 s after they finish.", labels=["state"])
        for status, count in self._finished.items():
            family.add_metric([status], count)
        return family


def model_labels(queues: list[dict[str, Any]], declared: set[str]) -> dict[str, int]:
    """Queued jobs per model label: a model no online agent declares folds into ``OTHER_MODELS``.

    When an agent declares no models, any name is queued; as label values those names would
    let any client grow the scrape (and Prometheus' series) without bound.
    """
    labels: dict[str, int] = {}
    for entry in queues:
        if not entry["queued"]:
            continue
        known = entry["model"] in declared and len(labels) < MAX_MODEL_LABELS
        label = entry["model"] if known else OTHER_MODELS
        labels[label] = labels.get(label, 0) + entry["queued"]
    return labels


def current_metrics() -> Metrics:
    return current_app.extensions["metrics"]


@bp.record_once
def _install(state) -> None:
    state.app.extensions["metrics"] = Metrics(state.app)


@bp.before_app_request
def _listen_to_sweeper() -> None:
    # The sweeper is built after the blueprints are registered, so join it on the first request.
    metrics = current_metrics()
    if not metrics.listening:
        sweeper = current_app.extensions.get("sweeper")
        if sweeper is not None:
            sweeper.listeners.append(metrics.sweep_listener)
            metrics.listening = True


@bp.after_app_request
def _count_agent_requests(response: Response) -> Response:
    endpoint = request.endpoint
    if endpoint == POLL_ENDPOINT:
        current_metrics().polls.labels(_poll_kind(), _poll_outcome(response.status_code)).inc()
    elif endpoint == CHUNK_ENDPOINT:
        metrics = current_metrics()
        metrics.chunk_posts.labels(str(response.status_code)).inc()
        job_id, stored = g.get("chunks_stored", (None, 0))
        if stored:
            metrics.observe_first_token(get_db(), job_id)
    return response


def _poll_kind() -> str:
    try:
        return "long" if float(request.args.get("wait") or 0) > 0 else "short"
    except ValueError:
        return "short"


def _poll_outcome(status: int) -> str:
    return {200: "job", 204: "empty"}.get(status, "error")


def observe_delivery(app: Flask, stored_at: float, now: float | None = None) -> None:
    """Record that a chunk stored at ``stored_at`` was written to a client's stream."""
    metrics = app.extensions.get("metrics")
    if metrics is not None:
        metrics.delivery.observe(max(0.0, (time.time() if now is None else now) - stored_at))


@bp.get("/metrics")
@admin_required
def metrics_page() -> Response:
    return Response(generate_latest(current_metrics().registry), content_type=CONTENT_TYPE_LATEST)


@bp.get("/healthz")
def healthz() -> dict[str, Any]:
    """200 when the database answers, takes a write and its schema is current; 503 saying why otherwise."""
    store = get_storage()
    try:
        conn = get_db()
        conn.execute("SELECT 1").fetchone()
        waiting = migrations.pending_on(store, conn)
    except (StorageError, OSError) as exc:
        raise ApiError(f"the database is unreachable: {exc}", code="database_unreachable", status=503) from None
    except migrations.MigrationError as exc:
        raise ApiError(str(exc), code="migrations_mismatch", status=503) from None
    if waiting:
        raise ApiError(f"{len(waiting)} migration(s) pending: {', '.join(m.name for m in waiting)}",
                       code="migrations_pending", status=503)
    try:
        # A real write, waited for briefly: a locked database or a full disk must not pass as healthy.
        with conn.patience(HEALTH_WRITE_DEADLINE):
            store.probe_write(conn)
    except StorageError as exc:
        raise ApiError(f"storage cannot write: {exc}", code="storage_unavailable", status=503) from None
    if not store.health.ok:
        raise ApiError(f"storage cannot write: {store.health.failing}", code="storage_unavailable", status=503)
    return {"status": "ok", "database": "ok", "migrations": "current"}
