"""What a run follows while it goes: the simulator's emissions, the servers' access logs, their frame counters."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

RECORDS_TIMEOUT = 5.0


class EmissionLog:
    """Follows the simulator's emission log file; records grouped by the chat's tag."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._tag_of: dict[int, str] = {}
        self._by_tag: dict[str, list[dict]] = {}

    def records(self, tag: str, timeout: float = RECORDS_TIMEOUT) -> list[dict]:
        """The chat's records once its answer ended (done, error or client gone), or what there is."""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            records = self._by_tag.get(tag, [])
            if any(r["event"] in ("done", "error", "client_gone") for r in records) or time.monotonic() > deadline:
                return records
            time.sleep(0.01)

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        for line in data[:complete].splitlines():
            record = json.loads(line)
            if record["event"] == "start" and "tag" in record:
                self._tag_of[record["req"]] = record["tag"]
            tag = self._tag_of.get(record["req"])
            if tag is not None:
                self._by_tag.setdefault(tag, []).append(record)


class AccessLog:
    """Follows a server's access log: one line per answered request, `METHOD PATH STATUS CLIENT_PORT`.

    gunicorn writes a line once the answer is sent, so the lines that appear
    while a chat runs are the requests answered meanwhile (a long poll counts
    when it returns its job); distinct client ports are distinct connections.
    """

    AGENT_PATHS = "/api/v1/inference/"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def skip(self) -> None:
        """Forget the lines so far (the idle polls between this server's chats)."""
        self._new_lines()

    def agent_requests(self) -> tuple[int, int]:
        """Agent requests answered since the last call, and the connections that carried them."""
        requests, ports = 0, set()
        for line in self._new_lines():
            fields = line.split()
            if len(fields) >= 4 and fields[1].startswith(self.AGENT_PATHS):
                requests += 1
                ports.add(fields[3])
        return requests, len(ports)

    def _new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        return data[:complete].decode(errors="replace").splitlines()


class FrameCounter:
    """Follows a server's count of WebSocket frames its agents sent (`/metrics`): the socket's "requests".

    Read before a chat's CPU window opens and after it closes, so the scrape's own work is not counted.
    """

    METRIC = 'orchestrator_agent_socket_frames_total{direction="in",'

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/metrics"
        self._seen = 0

    def skip(self) -> None:
        self._seen = self._total()

    def agent_frames(self) -> int:
        """Frames the agents sent since the last call."""
        total = self._total()
        frames, self._seen = total - self._seen, total
        return frames

    def _total(self) -> int:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(self.METRIC)))
