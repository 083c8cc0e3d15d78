"""What an agent socket pushes without being asked: jobs, cancels and pings.

A ``Dispatcher`` is one greenlet per socket, parked on the notifier exactly
like a long poll (``inference._wait_for_job``): it reads the versions of its
keys, does its work, then waits for any of them to move.  Its keys: the
queue keys of the agent's models while the agent has a free slot (or the
catch-all key), the ``cancel_key`` of every job it holds, and the socket's own
key, which the frame handler bumps when the agent announces a change.  A
job queued on any worker or host reaches it through the same wake-ups
(PostgreSQL's LISTEN/NOTIFY feeds this process's notifier).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from protocol import frames

from .errors import Unauthorized
from .inference import take_job
from .notifier import cancel_key, queue_keys
from .storage import StorageError, agents, jobs

if TYPE_CHECKING:
    from .agent_socket import AgentSession

log = logging.getLogger(__name__)

# After a database failure, the dispatcher tries again this much later (the listener wakes it sooner).
STORAGE_RETRY_SECONDS = 1.0


class Dispatcher:
    """Pushes ``job`` and ``cancel`` frames to one agent socket, pings it, and closes it when it stops answering."""

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        self.config = session.app.config
        self.notifier = session.storage.notifier
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=f"ws-dispatch-{session.agent_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self.session.wake_dispatcher()
        self._thread.join()

    def _serve(self) -> None:
        try:
            self._run()
        except Exception:
            # A socket nothing is pushed to would look connected and get no work: close it, the agent reconnects.
            log.error("agent %s: its socket's dispatcher failed; closing the socket", self.session.agent_id,
                      exc_info=True)
            self.session.ws.close(frames.CLOSE_INTERNAL_ERROR, "the server failed: reconnect")

    def _run(self) -> None:
        session, ws = self.session, self.session.ws
        interval, timeout = self.config["WS_PING_INTERVAL"], self.config["WS_PING_TIMEOUT"]
        next_ping, pinged_at = time.monotonic() + interval, None
        retry_at = 0.0
        while not self._stopped and ws.closed is None:
            if self.notifier.closed:
                ws.close(frames.CLOSE_GOING_AWAY, "the server is shutting down: reconnect")
                return
            keys = self._keys()
            versions = {key: self.notifier.version(key) for key in keys}
            now = time.monotonic()
            if now >= retry_at:
                try:
                    self._push_cancels(versions)
                    if self._push_job():
                        continue        # the keys changed (a job to watch for cancels): read them again
                except StorageError as exc:
                    log.warning("agent %s: dispatch paused, the database failed: %s", session.agent_id, exc)
                    retry_at = now + STORAGE_RETRY_SECONDS
                except Unauthorized:
                    self._removed()
                    return
            # One ping at a time: the next goes out once the last was answered and the interval has passed.
            outstanding = pinged_at is not None and ws.last_pong < pinged_at
            if outstanding and now - pinged_at >= timeout:
                log.warning("agent %s: no pong %g s after a ping: closing its socket as dead", session.agent_id, timeout)
                ws.abort(1006, f"no pong within {timeout:g} s")
                return
            if not outstanding and now >= next_ping:
                pinged_at, next_ping, outstanding = now, now + interval, True
                ws.ping()
                self._touch()
            wait_until = pinged_at + timeout if outstanding else next_ping
            if retry_at > now:
                wait_until = min(wait_until, retry_at)
            self.notifier.wait_any(versions, max(0.0, wait_until - time.monotonic()))

    def _keys(self) -> list[str]:
        session = self.session
        with session.lock:
            keys = [session.wake_key] + [cancel_key(job_id) for job_id in session.held]
            if session.models and session.free_slots > 0:
                keys += queue_keys(session.models)
        return keys

    def _push_job(self) -> bool:
        """Claim one job for the agent if it has a free slot and push it; True if one was pushed."""
        session = self.session
        with session.lock:
            models, free, kinds = session.models, session.free_slots, session.kinds
        if not models or free <= 0 or session.ws.closed is not None:
            return False
        with session.storage.connection() as conn:
            job, _ = take_job(conn, self.config, session.agent_id, models, free, True, time.time(), kinds=kinds)
        if job is None:
            return False
        with session.lock:
            session.jobs_sent += 1
            session.held[job.id] = 0
        # Written to a socket that turns out dead, the job waits for the delivery lease, as a long poll's does.
        session.send(frames.JOB, **job.to_json())
        return True

    def _push_cancels(self, versions: dict[str, int]) -> None:
        """A ``cancel`` frame for each held job whose user asked to cancel it since the last look."""
        session = self.session
        with session.lock:
            moved = [job_id for job_id, seen in session.held.items() if versions.get(cancel_key(job_id), 0) != seen]
            for job_id in moved:
                session.held[job_id] = versions.get(cancel_key(job_id), 0)
        if not moved:
            return
        with session.storage.connection() as conn:
            # Told of its cancel, the agent stops and sends nothing more: the job ends now, as a POST
            # answered "cancelled" ends it over HTTP.
            cancelled = [job_id for job_id in moved if jobs.close_cancelled(conn, job_id, time.time())]
        for job_id in cancelled:
            with session.lock:
                session.held.pop(job_id, None)
            session.send(frames.CANCEL, id=job_id)

    def _touch(self) -> None:
        """Keep the agent online while its socket is (``ORCH_AGENT_ONLINE_SECONDS``), as its polls would."""
        try:
            with self.session.storage.connection() as conn:
                agents.touch(conn, self.session.agent_id, time.time())
        except StorageError as exc:
            log.warning("agent %s: could not record its presence: %s", self.session.agent_id, exc)
        except Unauthorized:
            self._removed()

    def _removed(self) -> None:
        log.info("agent %s was removed; closing its socket", self.session.agent_id)
        self.session.ws.close(frames.CLOSE_POLICY_VIOLATION, "this agent was removed")
