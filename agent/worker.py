"""The poll loop: take jobs while a slot is free, run each on its own thread, stop on signals.

Shaped like rq's worker: `try: while True: ... finally: teardown()`. The first
SIGTERM/SIGINT requests a warm stop (no new polls, the server is told the
agent is leaving so its models stop being offered at once, running jobs get
SHUTDOWN_TIMEOUT to finish); a second one exits at once and the server's
leases give the jobs back.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from enum import StrEnum

from agent.backend import Backend, BackendError
from agent.backoff import SERVER_BACKOFF
from agent.client import ServerClient
from agent.config import AgentConfig
from agent.exceptions import (
    AgentError,
    AgentRevoked,
    ClockSkew,
    JobGone,
    MalformedJob,
    ProtocolError,
    SignatureRejected,
    TransportError,
    UpgradeRefused,
)
from agent.job import Job, JobRun, Poster
from agent.transport import HttpTransport, Transport
from protocol.models import EMBED, canonical_model
from protocol.wire import POLL_PATH

log = logging.getLogger(__name__)

MODELS_REFRESH_SECONDS = 60.0
# An unreachable or confused server is polled again after 0.1 s, 0.2 s, ... up to 10 s.
DEFAULT_BACKOFF = SERVER_BACKOFF
# After the shutdown deadline, the aborted jobs get this long to post their final error.
SHUTDOWN_FINISH_GRACE = 5.0
SHUTDOWN_REASON = "the agent shut down before the answer was complete"
# After a job, the next model report (what /api/ps shows as loaded) is due within this many seconds,
# instead of at the next minutely refresh; a busy agent still reports at most this often.
REPORT_AFTER_JOB_SECONDS = 2.0
# Embedding vectors per POST: 8 vectors of 4,096 dimensions are ~650 KB of JSON, under the server's 1 MiB.
EMBED_VECTORS_PER_POST = 8
# Exit status once an operator removed the agent (`orchestrator agents remove`): a supervisor should not restart it.
EXIT_REVOKED = 3
# How long reporting a malformed job as failed may take before the worker moves on.
REPORT_TIMEOUT = 15.0


class StopRequested(BaseException):
    """Raised by a stop signal in the main thread to cut a poll short (BaseException: no library swallows it)."""


class StartupError(Exception):
    """A setting the outside world rejected at start; the message is one line for the operator."""


class ServerState(StrEnum):
    OK = "reachable"
    UNREACHABLE = "unreachable"
    REJECTED = "rejecting our signature"
    CONFUSED = "answering the poll oddly"


class Wakeup:
    """A self-pipe: `wake()` is safe in a signal handler (no lock), `wait()` sleeps until woken.

    Never closed: a late job thread may still wake it, and a closed fd number can be reused.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def wake(self) -> None:
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # already full of wake-ups

    def wait(self, timeout: float) -> None:
        if select.select([self._read], [], [], max(0.0, timeout))[0]:
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass


class Worker:
    """One agent: asks the server for jobs its backend can run and streams the answers back.

    How it reaches the server is its `transport` (`agent.transport`): the HTTP protocol over `client` unless
    another is given.
    """

    backoff = DEFAULT_BACKOFF
    models_refresh = MODELS_REFRESH_SECONDS

    def __init__(self, config: AgentConfig, client: ServerClient, backend: Backend,
                 transport: Transport | None = None) -> None:
        self.config = config
        self.client = client
        self.backend = backend
        self.transport = transport if transport is not None else HttpTransport(client, config)
        self.name = config.agent_id
        self.models: list[str] = list(config.models)
        self._models_due = 0.0
        self._reported: dict | None = None
        self._running: dict[str, JobRun] = {}
        self._lock = threading.Lock()
        self._wakeup = Wakeup()
        self._stop_requested = False
        self._cold = False
        self._interruptible = False
        self._answered = False
        self._loop_thread: threading.Thread | None = None
        self._server_state = ServerState.OK
        self._failures = 0
        self._revoked: AgentRevoked | None = None

    def work(self) -> int:
        """Serve until a stop signal; returns the exit status. Raises `StartupError`."""
        self._loop_thread = threading.current_thread()
        self._install_signal_handlers()
        self._check_backend()
        try:
            while not self._stop_requested:
                if not self._wait_for_slot():
                    break
                self._refresh_models()
                self._wakeup.wait(self._poll_once())
        except StopRequested:
            pass
        finally:
            self._teardown()
        return EXIT_REVOKED if self._revoked is not None else 0

    def request_stop(self, signum: int = signal.SIGTERM, frame: object = None) -> None:
        """Warm stop (a signal handler, also callable from tests); a second call is a cold stop."""
        if self._stop_requested:
            if threading.current_thread() is not self._loop_thread:
                return
            self._cold = True
            log.warning("%s: %s again: stopping at once; the server's leases give %d job(s) back",
                        self.name, signal.Signals(signum).name, len(self._running))
            raise SystemExit(128 + signum)
        self._stop_requested = True
        log.info("%s: %s: warm stop: no new jobs, %d running get up to %g s (signal again to stop at once)",
                 self.name, signal.Signals(signum).name, len(self._running), self.config.shutdown_timeout)
        self._wakeup.wake()
        if self._interruptible and threading.current_thread() is self._loop_thread:
            raise StopRequested

    @property
    def running_jobs(self) -> int:
        with self._lock:
            return len(self._running)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)

    def _check_backend(self) -> None:
        try:
            available = self.backend.models()
        except BackendError as exc:
            raise StartupError(str(exc)) from None
        if self.config.models:
            missing = sorted(set(self.config.models) - set(available))
            if missing:
                log.warning("%s: MODELS names %s, which %s does not list", self.name, ", ".join(missing),
                            self.backend.url)
        else:
            self.models = available
            self._models_due = time.monotonic() + self.models_refresh
        self._report_models()
        if not self.models:
            log.warning("%s: no models to serve: pull one (`ollama pull NAME`) or set MODELS", self.name)
        log.info("%s: serving %s from %s for %s with %d slot(s), TRANSPORT=%s (HTTP: %s poll, %s batches)",
                 self.name, ",".join(self.models) or "nothing", self.backend.url, self.transport.api_base,
                 self.config.max_jobs, self.config.transport,
                 f"{self.config.long_poll:g} s long" if self.config.long_poll else f"{self.config.poll_interval:g} s",
                 "legacy per-token" if self.config.legacy else self.config.batch_mode)

    def _refresh_models(self) -> None:
        if time.monotonic() < self._models_due:
            return
        self._models_due = time.monotonic() + self.models_refresh
        self._report_models()
        if self.config.models:
            return
        try:
            models = self.backend.models()
        except BackendError as exc:
            log.warning("%s: keeping models %s: %s", self.name, ",".join(self.models), exc)
            return
        if models != self.models:
            log.info("%s: now serving %s", self.name, ",".join(models) or "nothing")
            self.models = models

    def _report_models(self) -> None:
        """Tell the server what the engine says of its models (for /api/show, /api/ps), when it changed."""
        if self.config.legacy:
            return
        try:
            report = self.backend.describe()
            if report is not None and report != self._reported:
                self.client.report(report)
                self._reported = report
        except (BackendError, AgentError) as exc:
            log.warning("%s: could not report the models' details: %s", self.name, exc)
    def _wait_for_slot(self) -> bool:
        """True once a job slot is free; False when a stop was requested meanwhile."""
        while not self._stop_requested:
            if self.running_jobs < self.config.max_jobs:
                return True
            self._wakeup.wait(1.0)  # a finishing job wakes us sooner
        return False

    def _poll_once(self) -> float:
        """Poll once and start the job if there is one; returns the seconds to wait before the next poll."""
        started = time.monotonic()
        try:
            self._interruptible = True
            if self._stop_requested:
                raise StopRequested
            job = self.transport.next_job(self.models, self.config.max_jobs - self.running_jobs,
                                          None if self.config.legacy else self.backend.kinds)
        except TransportError as exc:
            return self._server_trouble(ServerState.UNREACHABLE, exc)
        except AgentRevoked as exc:
            self._revoke(exc)
            return 0.0
        except ClockSkew as exc:
            if not self._answered:
                raise StartupError(f"the server refused our timestamp: {exc}") from None
            return self._server_trouble(ServerState.REJECTED, exc)
        except SignatureRejected as exc:
            if not self._answered:
                raise StartupError(f"server rejected our signature: check AGENT_ID/AGENT_SECRET ({exc})") from None
            return self._server_trouble(ServerState.REJECTED, exc)
        except MalformedJob as exc:
            self._server_ok()
            self._report_malformed(exc)
            return 0.0
        except UpgradeRefused as exc:
            if not self._answered:
                raise StartupError(f"TRANSPORT={self.config.transport}: the WebSocket upgrade was refused ({exc}); "
                                   "TRANSPORT=auto falls back to HTTP polls") from None
            return self._server_trouble(ServerState.CONFUSED, exc)
        except (JobGone, ProtocolError) as exc:
            if not self._answered and exc.status == 404:
                raise StartupError(f"{self.client.api_base} answered 404 to {POLL_PATH}: check API_BASE") from None
            return self._server_trouble(ServerState.CONFUSED, exc)
        finally:
            self._interruptible = False
        self._server_ok()
        if job is not None:
            self._start(job)
            return 0.0
        return self.transport.idle_delay(started)

    def _server_ok(self) -> None:
        if self._server_state is not ServerState.OK:
            log.info("%s: server reachable again after %d failed poll(s)", self.name, self._failures)
        self._server_state, self._failures, self._answered = ServerState.OK, 0, True

    def _server_trouble(self, state: ServerState, exc: AgentError) -> float:
        """Back off exponentially with jitter; log once per change of state, not per failure."""
        self._failures += 1
        if state is not self._server_state:
            log.warning("%s: server %s (%s); retrying with back-off up to %g s",
                        self.name, state.value, exc, self.backoff.cap)
            self._server_state = state
        return self.backoff.delay(self._failures - 1)

    def _report_malformed(self, exc: MalformedJob) -> None:
        log.error("%s: the server sent a malformed job (%s)%s", self.name, exc,
                  f"; reporting job {exc.job_id} as failed" if exc.job_id else "")
        if exc.job_id is None:
            return
        poster = self.transport.poster(exc.job_id, None)
        try:
            if not poster.finish(error=f"the agent got a malformed job: {exc}", timeout=REPORT_TIMEOUT):
                log.warning("%s: could not report job %s as failed", self.name, exc.job_id)
        finally:
            poster.close(timeout=1.0)

    def _start(self, job: Job) -> None:
        with self._lock:
            running = job.id in self._running
        if running:
            # Our acknowledgement came too late: the server requeued the job and handed it back to us. The run
            # here still holds it (same agent), and a second one would interleave two generations by seq.
            log.warning("%s: job %s handed out again while it runs here; the running one carries on",
                        self.name, job.id)
            return
        model = self._engine_name(job.model)
        if job.kind == EMBED:
            stream = self.backend.embed(model, job.request["input"], job.options, job.request)
        else:
            stream = self.backend.chat(model, job.messages, job.options, job.request)
        make_poster = self._make_poster if job.kind != EMBED else self._make_embed_poster
        run = JobRun(job, stream, make_poster, self._job_finished, name=self.name)
        with self._lock:
            self._running[job.id] = run
        log.info("%s: job %s started (model %s)", self.name, job.id, job.model)
        run.start()

    def _engine_name(self, model: str) -> str:
        """The engine's own spelling of `model`: the server names models as Ollama does (`m` is `m:latest`)."""
        if model in self.models:
            return model
        wanted = canonical_model(model)
        return next((name for name in self.models if canonical_model(name) == wanted), model)

    def _make_embed_poster(self, job_id: str, on_cancel: Callable[[], None]) -> Poster:
        return self.transport.poster(job_id, on_cancel, max_items=EMBED_VECTORS_PER_POST)

    def _make_poster(self, job_id: str, on_cancel: Callable[[], None]) -> Poster:
        return self.transport.poster(job_id, on_cancel)

    def _job_finished(self, run: JobRun, outcome: str) -> None:
        with self._lock:
            self._running.pop(run.job.id, None)
            self._models_due = min(self._models_due, time.monotonic() + REPORT_AFTER_JOB_SECONDS)
        if isinstance(run.failure, AgentRevoked):
            self._revoke(run.failure)
        self._wakeup.wake()

    def _revoke(self, exc: AgentRevoked) -> None:
        """The server says an operator removed us: stop polling and exit with ``EXIT_REVOKED``."""
        if self._revoked is None:
            self._revoked = exc
            log.error("%s: revoked by the server (%s): exiting with status %d; register a new agent to serve again",
                      self.name, exc, EXIT_REVOKED)
        self._stop_requested = True
        self._wakeup.wake()
        self.transport.wake()

    def _teardown(self) -> None:
        try:
            if self._cold:
                return
            self._say_goodbye()
            if self.running_jobs:
                log.info("%s: waiting up to %g s for %d running job(s)",
                         self.name, self.config.shutdown_timeout, self.running_jobs)
                self._wait_for_jobs(self.config.shutdown_timeout)
                with self._lock:
                    late = list(self._running.values())
                for run in late:
                    log.warning("%s: job %s still running at the deadline: ending it", self.name, run.job.id)
                    run.abort(SHUTDOWN_REASON)
                if late:
                    self._wait_for_jobs(SHUTDOWN_FINISH_GRACE)
            log.info("%s: stopped", self.name)
        finally:
            self.transport.close()

    def _say_goodbye(self) -> None:
        """Tell the server we take no more jobs, unless it never accepted us (then there is no one to tell)."""
        if not self._answered:
            return
        try:
            self.client.leave()
        except AgentError as exc:
            log.warning("%s: could not tell the server we are leaving (%s): it lists us as online until "
                        "ORCH_AGENT_ONLINE_SECONDS pass", self.name, exc)
            return
        log.info("%s: told the server we are leaving: our models are no longer offered", self.name)

    def _wait_for_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.running_jobs and (left := deadline - time.monotonic()) > 0:
            self._wakeup.wait(min(left, 1.0))
