"""SocketPoster, one job's tokens over the agent's WebSocket, against an in-memory socket and server."""
from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.exceptions import ProtocolError, TransportError
from agent.socket_poster import WINDOW, SocketPoster

JOB = "job-1"


class Wire:
    """The socket: records each frame written (or refuses them while `down`); the test plays the server."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.down = False
        self.max_frame_bytes = 1024 * 1024

    def send(self, text: str) -> bool:
        if self.down:
            return False
        self.frames.append(json.loads(text))
        return True

    def poster(self, **kwargs) -> SocketPoster:
        return SocketPoster(JOB, self.send, lambda: self.max_frame_bytes, **kwargs)

    def take(self) -> list[dict]:
        frames, self.frames = self.frames, []
        return frames


def chunks(frames: list[dict]) -> list[tuple[int, list[str]]]:
    return [(f["seq"], f["chunks"]) for f in frames]


def test_each_token_goes_out_at_once_in_a_frame_of_its_own_without_waiting_for_acks():
    wire = Wire()
    poster = wire.poster()
    poster.heartbeat()
    for token in ("Hel", "lo", " world"):
        poster.add(token)
    assert chunks(wire.take()) == [(0, []), (0, ["Hel"]), (1, ["lo"]), (2, [" world"])]
    assert all(f["type"] == "chunks" and f["id"] == JOB and f["done"] is False for f in wire.frames)


def test_the_final_frame_carries_stats_and_finish_returns_once_its_ack_says_done():
    wire = Wire()
    poster = wire.poster()
    poster.add("a")
    result = {}
    finishing = threading.Thread(target=lambda: result.setdefault("ok", poster.finish({"eval_count": 1}, None, 10)))
    finishing.start()
    while len(wire.frames) < 2:
        pass
    final = wire.frames[-1]
    assert (final["seq"], final["chunks"], final["done"], final["stats"]) == (1, [], True, {"eval_count": 1})
    poster.acknowledged(1, done=True, cancelled=False)
    finishing.join(10)
    assert result == {"ok": True}


def test_tokens_beyond_the_window_wait_for_an_ack_and_then_leave_in_one_frame():
    wire = Wire()
    poster = wire.poster()
    for i in range(WINDOW + 5):
        poster.add(str(i))
    assert len(wire.take()) == WINDOW                       # the window is full: five tokens wait
    poster.acknowledged(8, done=False, cancelled=False)     # the server's ack of the first 8 frames
    assert chunks(wire.take()) == [(WINDOW, [str(i) for i in range(WINDOW, WINDOW + 5)])]


def test_after_a_reconnect_everything_unacknowledged_is_resent_from_the_last_ack():
    wire = Wire()
    poster = wire.poster()
    for token in "abcd":
        poster.add(token)
    poster.acknowledged(2, done=False, cancelled=False)
    wire.take()
    wire.down = True
    poster.add("e")                                         # lost with the connection
    wire.down = False
    poster.rewind()
    assert chunks(wire.take()) == [(2, ["c", "d", "e"])]


def test_a_seq_gap_resends_from_the_servers_next_seq():
    wire = Wire()
    poster = wire.poster()
    for token in "abc":
        poster.add(token)
    wire.take()
    poster.refused("seq_gap", "seq 2 leaves a gap: the server has 1 chunks", 1)
    assert chunks(wire.take()) == [(1, ["b", "c"])]


@pytest.mark.parametrize("code", ["not_your_job", "job_not_found", "lease_expired", "job_done"])
def test_a_job_that_is_no_longer_ours_is_cancelled_and_stops_the_backend(code):
    wire, stopped = Wire(), []
    poster = wire.poster(on_cancel=lambda: stopped.append(True))
    poster.add("a")
    poster.refused(code, "gone", None)
    poster.add("b")
    assert poster.cancelled and stopped == [True] and chunks(wire.take()) == [(0, ["a"])]


def test_a_pushed_cancel_stops_the_backend_and_nothing_more_is_sent():
    wire, stopped = Wire(), []
    poster = wire.poster(on_cancel=lambda: stopped.append(True))
    poster.add("a")
    poster.cancel()
    poster.add("b")
    assert poster.finish(timeout=0) is False
    assert stopped == [True] and chunks(wire.take()) == [(0, ["a"])]


@pytest.mark.parametrize(("next_seq", "why"), [(3, "beyond what was sent"), (0, "below the acknowledged")])
def test_an_ack_that_cannot_be_true_gives_the_stream_up(next_seq, why):
    wire = Wire()
    poster = wire.poster()
    poster.add("a")
    poster.acknowledged(1, done=False, cancelled=False)
    poster.add("b")
    poster.acknowledged(next_seq, done=False, cancelled=False)
    assert isinstance(poster.failed, ProtocolError), why


def test_a_refusal_of_our_own_frame_gives_the_stream_up_and_the_retry_deadline_too():
    wire = Wire()
    poster = wire.poster()
    poster.add("a")
    poster.refused("invalid_field", "'chunks' must be a list of strings", None)
    assert isinstance(poster.failed, ProtocolError)
    other = wire.poster()
    other.fail(TransportError("no connection to the server for 60 s"))
    assert isinstance(other.failed, TransportError) and other.finish(timeout=0) is False


def test_frames_stay_under_the_servers_limit_after_a_long_outage():
    wire = Wire()
    wire.max_frame_bytes = 2000
    poster = wire.poster()
    wire.down = True
    for _ in range(100):
        poster.add("x" * 10)
    wire.down = False
    poster.rewind()
    frames = wire.take()
    assert len(frames) > 1 and all(len(json.dumps(f)) <= 2000 for f in frames)
    assert "".join(t for f in frames for t in f["chunks"]) == "x" * 1000


def test_a_heartbeat_goes_out_only_when_no_token_waits_to_be_sent():
    wire = Wire()
    poster = wire.poster()
    poster.add("a")                       # sent, unacknowledged (acks come every 8 frames)
    poster.heartbeat()                    # the model is thinking: the lease must still be renewed
    assert chunks(wire.take()) == [(0, ["a"]), (1, [])]


class Server:
    """Stores by seq like append_chunks and acknowledges every `every` frames; may lose the connection."""

    def __init__(self, every: int) -> None:
        self.stored: list[str] = []
        self.every, self.unacked = every, 0

    def receive(self, frame: dict, poster: SocketPoster) -> None:
        seq, new = frame["seq"], frame["chunks"]
        assert seq <= len(self.stored), "a gap"
        self.stored += new[len(self.stored) - seq:]
        self.unacked += 1
        if self.unacked >= self.every or not new or frame["done"]:
            self.unacked = 0
            poster.acknowledged(len(self.stored), done=frame["done"], cancelled=False)


@settings(max_examples=80, deadline=None)
@given(tokens=st.lists(st.text(max_size=3), max_size=60), every=st.integers(1, 12), lag=st.integers(0, 3),
       losses=st.sets(st.integers(0, 80), max_size=8))
def test_every_token_is_stored_once_in_order_whatever_connections_are_lost(tokens, every, lag, losses):
    """Frames travel with a lag; a lost connection drops every frame still on its way (written, never
    received), and the poster, reset, sends again from the last ack on the next one."""
    server, transit, writes = Server(every), [], [0]
    poster = SocketPoster(JOB, lambda text: transit.append(json.loads(text)) or True, lambda: 1024 * 1024)

    def network(keep: int) -> None:
        writes[0] += 1
        if writes[0] in losses:
            transit.clear()
            poster.reset()
            poster.flush()
        while len(transit) > keep:
            server.receive(transit.pop(0), poster)

    for token in tokens:
        poster.add(token)
        network(lag)
    result = {}
    finishing = threading.Thread(target=lambda: result.setdefault("ok", poster.finish(None, None, 10)))
    finishing.start()
    for _ in range(200):
        network(0)
        finishing.join(0.01)
        if not finishing.is_alive():
            break
    finishing.join(10)
    assert result == {"ok": True} and server.stored == tokens
