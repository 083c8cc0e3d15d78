"""The simulator's emission log: what it sent and when, in memory and optionally in a file."""
from __future__ import annotations

import json
import threading
import time
from collections import deque

DEFAULT_LOG_LIMIT = 100_000


class EmitLog:
    """Thread-safe records of emitted events, bounded in memory, appended as JSON lines to `path`."""

    def __init__(self, path: str | None = None, limit: int = DEFAULT_LOG_LIMIT) -> None:
        self._lock = threading.Lock()
        self._records: deque[dict] = deque(maxlen=limit)
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self._last_req = 0

    def next_request(self) -> int:
        """A fresh request number, counting from 1 for the life of the simulator."""
        with self._lock:
            self._last_req += 1
            return self._last_req

    def record(self, event: str, req: int, t: float | None = None, **fields: object) -> None:
        """Append one record; `t` defaults to now (`time.time()`)."""
        record = {"event": event, "req": req, **fields, "t": time.time() if t is None else t}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._records.append(record)
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

    def snapshot(self) -> list[dict]:
        """The records still held in memory, oldest first."""
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        """Forget the in-memory records (the file keeps its lines)."""
        with self._lock:
            self._records.clear()

    def close(self) -> None:
        """Close the file; later records are kept in memory only."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
