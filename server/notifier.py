"""In-process wake-ups: a version counter per key and a condition per waiter.

Keys name what changed (``job_key``: a job got chunks or a new state;
``queue_key``: a job of that model entered the queue; ``cancel_key``: a running
job's user asked to cancel it); they are built only by
the helpers below.  A waiter
reads ``version(key)``, checks the database, then ``wait_for(key, version)``:
a notify that lands between the read and the wait bumps the version, so the
wait returns at once and no wake-up is missed.

Each waiter has its own ``Condition`` over the shared lock, so a notify
wakes only the waiters of its key, not every stream in the process.  Under
gevent's monkey-patching the lock and conditions are greenlet-aware; build
the ``Notifier`` after patching.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from protocol.models import canonical_model

# Keys nobody waited on or notified for this long are dropped by ``prune``.
IDLE_KEY_SECONDS = 120.0
# What every long poll of an agent that declared no models waits on.
ANY_MODEL_KEY = "queue:*"


def job_key(job_id: str) -> str:
    """The key a job's streams wait on: its chunks or its state changed."""
    return "job:" + job_id


def cancel_key(job_id: str) -> str:
    """The key an agent socket holding the job waits on: its user asked to cancel it.

    Apart from ``job_key``, which moves with every stored chunk: a socket waiting
    on that would wake, and read the job, once per token.
    """
    return "cancel:" + job_id


def queue_key(model: str) -> str:
    """The key long polls for ``model`` wait on: a job of that model was queued or requeued."""
    return "queue:" + model


def queue_keys(models: list[str] | None) -> list[str]:
    """What an agent serving ``models`` waits on (any model's queue for None): each name and its canonical
    form, since jobs are queued under the canonical name (``m`` is ``m:latest``)."""
    if not models:
        return [ANY_MODEL_KEY]
    return list(dict.fromkeys(queue_key(n) for m in models for n in (m, canonical_model(m))))


class _Waiter:
    __slots__ = ("cond", "woken", "keys")

    def __init__(self, lock: threading.Lock, keys: Iterable[str]) -> None:
        self.cond = threading.Condition(lock)
        self.woken = False
        self.keys = tuple(keys)


class Notifier:
    """Version counters and wake-ups keyed by request or by queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, int] = {}
        self._touched: dict[str, float] = {}
        # dict as an ordered set: wake-one hands a job to the longest waiter.
        self._waiters: dict[str, dict[_Waiter, None]] = {}
        self.closed = False

    def version(self, key: str) -> int:
        with self._lock:
            return self._versions.get(key, 0)

    def notify(self, key: str, *, wake: int | None = None) -> int:
        """Bump ``key``'s version and wake its waiters (``wake=n``: at most n of them)."""
        with self._lock:
            version = self._versions.get(key, 0) + 1
            self._versions[key] = version
            self._touched[key] = time.monotonic()
            waiters = self._waiters.get(key)
            if waiters:
                for waiter in list(waiters)[:wake]:
                    self._wake(waiter)
            return version

    def wait_for(self, key: str, after_version: int, timeout: float) -> int:
        """Block until ``key``'s version exceeds ``after_version`` or ``timeout``; return the version."""
        return self.wait_any({key: after_version}, timeout)[key]

    def wait_any(self, after: dict[str, int], timeout: float) -> dict[str, int]:
        """Like ``wait_for`` over several keys; returns every key's current version."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._changed(after) or self.closed:
                return self._snapshot(after)
            waiter = _Waiter(self._lock, after)
            for key in after:
                self._waiters.setdefault(key, {})[waiter] = None
            try:
                while not waiter.woken and not self.closed and not self._changed(after):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    waiter.cond.wait(remaining)
            finally:
                self._forget_waiter(waiter, after)
            return self._snapshot(after)

    def wake_all(self) -> None:
        """Bump every waited-on key and wake all its waiters: each re-reads once (e.g. after lost wake-ups)."""
        with self._lock:
            now = time.monotonic()
            for key, waiters in self._waiters.items():
                self._versions[key] = self._versions.get(key, 0) + 1
                self._touched[key] = now
                for waiter in list(waiters):
                    waiter.woken = True
                    waiter.cond.notify()

    def close(self) -> None:
        """Wake every waiter for good: used on shutdown so parked polls end at once."""
        with self._lock:
            self.closed = True
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.woken = True
                    waiter.cond.notify()

    def prune(self, idle_seconds: float = IDLE_KEY_SECONDS) -> int:
        """Drop versions of keys idle for ``idle_seconds`` with no waiter; returns how many."""
        cutoff = time.monotonic() - idle_seconds
        with self._lock:
            stale = [k for k, t in self._touched.items() if t < cutoff and not self._waiters.get(k)]
            for key in stale:
                self._versions.pop(key, None)
                self._touched.pop(key, None)
                self._waiters.pop(key, None)
            return len(stale)

    def waiting(self, key: str) -> int:
        with self._lock:
            return len(self._waiters.get(key, ()))

    def keys(self) -> int:
        with self._lock:
            return len(self._versions)

    def _wake(self, waiter: _Waiter) -> None:
        # Remove a woken waiter from every key at once so a second wake-one
        # notify picks a different waiter.
        waiter.woken = True
        for key in waiter.keys:
            self._waiters.get(key, {}).pop(waiter, None)
        waiter.cond.notify()

    def _changed(self, after: dict[str, int]) -> bool:
        # A key missing while the caller saw a version was pruned after a
        # notify the caller has not seen yet: that counts as a change.
        return any(self._versions.get(k, 0) > v or (v > 0 and k not in self._versions)
                   for k, v in after.items())

    def _snapshot(self, keys: Iterable[str]) -> dict[str, int]:
        return {k: self._versions.get(k, 0) for k in keys}

    def _forget_waiter(self, waiter: _Waiter, keys: Iterable[str]) -> None:
        for key in keys:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.pop(waiter, None)
                if not waiters:
                    del self._waiters[key]

