"""TokenBatcher against an in-memory fake of the server's stream endpoint."""
from __future__ import annotations

import inspect
import random
import threading
import time
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backoff import Backoff
from agent.batcher import ChunkBatch, SendReply, TokenBatcher
from agent.config import load_config
from agent.exceptions import JobGone, ProtocolError, SeqConflict, TransportError
from devtools.processes import wait_until
from protocol.wire import MAX_CHUNKS_PER_POST

JOB = "job-1"


class FakeServer:
    """The server's side of `POST /api/v1/inference/stream`: dedupes by seq, 409 on a gap."""

    def __init__(self, *, fail_rate: float = 0.0, rng: random.Random | None = None,
                 max_latency: float = 0.0) -> None:
        self.cond = threading.Condition()
        self.posts: list[ChunkBatch] = []
        self.stored: list[str] = []
        self.done_batch: ChunkBatch | None = None
        self.done_count = 0
        self.conflicts = 0
        self.violations: list[ChunkBatch] = []
        self.cancel = False
        self.failing = threading.Event()  # while set, every POST fails before it is stored
        self.gate: threading.Event | None = None  # when set to an Event, POSTs wait for it
        self.fail_rate = fail_rate
        self.rng = rng or random.Random(0)
        self.max_latency = max_latency

    def send(self, batch: ChunkBatch) -> SendReply:
        with self.cond:
            self.posts.append(batch)
            self.cond.notify_all()
        if self.gate is not None:
            assert self.gate.wait(10), "test never released the gate"
        if self.max_latency:
            time.sleep(self.rng.uniform(0, self.max_latency))  # network time, not synchronisation
        fault = self.rng.choice(["before", "after"]) if self.rng.random() < self.fail_rate else None
        if self.failing.is_set() or fault == "before":
            raise TransportError("connection reset")
        with self.cond:
            reply = self._store(batch)
        if fault == "after":
            raise TransportError("stored, but the reply was lost")
        return reply

    def _store(self, batch: ChunkBatch) -> SendReply:
        if self.done_batch is not None and batch != self.done_batch:
            self.violations.append(batch)
        if batch.seq > len(self.stored):
            self.conflicts += 1
            raise SeqConflict(len(self.stored))
        self.stored.extend(batch.chunks[len(self.stored) - batch.seq:])
        if batch.done and self.done_batch is None:
            self.done_batch = batch
            self.done_count += 1
        return SendReply(cancelled=self.cancel, next_seq=len(self.stored))

    def wait_for_posts(self, count: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.posts) >= count, timeout)


@pytest.fixture
def make_batcher():
    made: list[TokenBatcher] = []

    def make(send, **kwargs) -> TokenBatcher:
        # Fixed mode unless a test asks for adaptive: most tests here pin down its coalescing.
        kwargs = {"backoff": Backoff(base=0.001, cap=0.005), "adaptive": False, **kwargs}
        made.append(TokenBatcher(JOB, send, **kwargs))
        return made[-1]

    yield make
    for batcher in made:
        batcher.close(timeout=5)


def test_full_batch_is_posted_without_waiting_for_the_delay(make_batcher):
    server = FakeServer()
    batcher = make_batcher(server.send, max_tokens=3, max_delay=60)
    for token in "abc":
        batcher.add(token)
    assert server.wait_for_posts(1)
    assert server.posts[0] == ChunkBatch(JOB, 0, ("a", "b", "c"))


def test_lone_token_is_posted_after_max_delay_without_another_token(make_batcher):
    server = FakeServer()
    batcher = make_batcher(server.send, max_tokens=100, max_delay=0.02)
    batcher.add("hello")
    assert server.wait_for_posts(1)
    assert server.posts[0] == ChunkBatch(JOB, 0, ("hello",))


@pytest.mark.parametrize("stats, error", [({"eval_count": 2}, None), (None, "model crashed")])
def test_finish_posts_remaining_chunks_once_with_done_and_outcome(make_batcher, stats, error):
    server = FakeServer()
    batcher = make_batcher(server.send, max_tokens=100, max_delay=60)
    batcher.add("a")
    batcher.add("b")
    assert batcher.finish(stats=stats, error=error, timeout=5)
    assert server.posts == [ChunkBatch(JOB, 0, ("a", "b"), done=True, stats=stats, error=error)]
    body = {"id": JOB, "chunks": ["a", "b"], "seq": 0, "done": True}
    body.update({"stats": stats} if stats else {"error": error})
    assert server.posts[0].to_json() == body


def test_a_batcher_built_without_settings_batches_like_an_agent_with_default_settings():
    # The settings table is the one home of these defaults: a literal in TokenBatcher would drift.
    config = load_config([], {"AGENT_ID": "agt_1", "AGENT_SECRET": "s3cret"})
    defaults = {name: p.default for name, p in inspect.signature(TokenBatcher).parameters.items()}
    assert (defaults["max_tokens"], defaults["max_delay"], defaults["adaptive"]) == (
        config.batch_max_tokens, config.batch_max_delay, config.adaptive)


@pytest.mark.parametrize("attempt", range(12))
def test_backoff_doubles_from_its_base_up_to_its_cap_keeping_at_least_half_after_jitter(attempt):
    backoff = Backoff(base=0.05, cap=2.0)
    full = min(2.0, 0.05 * 2 ** attempt)
    delays = [backoff.delay(attempt) for _ in range(50)]
    assert all(full / 2 <= delay <= full for delay in delays)
    assert len(set(delays)) > 1  # jittered: agents that failed together do not retry together


def test_to_json_omits_stats_and_error_when_unset():
    assert ChunkBatch(JOB, 4, ("x",)).to_json() == {"id": JOB, "chunks": ["x"], "seq": 4, "done": False}


def test_tokens_arrive_in_order_with_contiguous_seq(make_batcher):
    server = FakeServer()
    batcher = make_batcher(server.send, max_tokens=7, max_delay=0.001)
    tokens = [f"t{i} " for i in range(200)]
    for token in tokens:
        batcher.add(token)
    assert batcher.finish(timeout=5)
    assert server.stored == tokens
    assert server.posts[0].seq == 0
    assert all(cur.seq == prev.end_seq for prev, cur in pairwise(server.posts))
    assert [p.done for p in server.posts].count(True) == 1 and server.posts[-1].done
    assert batcher.delivered_tokens == 200


def test_failed_post_is_retried_with_same_seq_and_chunks_while_new_tokens_wait(make_batcher):
    server = FakeServer()
    server.failing.set()
    batcher = make_batcher(server.send, max_tokens=2, max_delay=60)
    batcher.add("a")
    batcher.add("b")
    assert server.wait_for_posts(2)
    batcher.add("c")
    assert server.wait_for_posts(4)
    server.failing.clear()
    assert batcher.finish(timeout=5)
    retries = [p for p in server.posts if p.seq == 0]
    assert len(retries) >= 4
    assert all(p == ChunkBatch(JOB, 0, ("a", "b")) for p in retries)
    assert server.posts[-1] == ChunkBatch(JOB, 2, ("c",), done=True)
    assert server.stored == ["a", "b", "c"]


def test_retries_stop_at_the_deadline_and_mark_the_stream_failed(make_batcher):
    server = FakeServer()
    server.failing.set()
    batcher = make_batcher(server.send, max_tokens=1, retry_deadline=0.05)
    batcher.add("a")
    assert not batcher.finish(timeout=5)
    assert isinstance(batcher.failed, TransportError)
    assert batcher.sent_requests >= 2
    batcher.add("ignored")  # a no-op once failed, even after finish
    assert not batcher.cancelled


def test_conflict_resends_from_expected_seq(make_batcher):
    server = FakeServer()
    refused: list[ChunkBatch] = []

    def send(batch: ChunkBatch) -> SendReply:
        if not refused:
            refused.append(batch)
            server.stored.extend(batch.chunks[:2])  # the server held only the first two
            raise SeqConflict(2)
        return server.send(batch)

    batcher = make_batcher(send, max_tokens=4, max_delay=60)
    for token in "abcd":
        batcher.add(token)
    assert server.wait_for_posts(1)
    assert refused == [ChunkBatch(JOB, 0, ("a", "b", "c", "d"))]
    assert server.posts[0] == ChunkBatch(JOB, 2, ("c", "d"))
    assert batcher.finish(timeout=5)
    assert server.stored == list("abcd")


@pytest.mark.parametrize("answer", [SeqConflict(99), SendReply(cancelled=False, next_seq=99)],
                         ids=["conflict", "reply"])
def test_server_seq_beyond_what_was_sent_is_fatal(make_batcher, answer):
    def send(batch: ChunkBatch) -> SendReply:
        if isinstance(answer, Exception):
            raise answer
        return answer

    batcher = make_batcher(send, max_tokens=2)
    batcher.add("a")
    batcher.add("b")
    assert not batcher.finish(timeout=5)
    assert isinstance(batcher.failed, ProtocolError)


@pytest.mark.parametrize("how", ["cancelled reply", "job gone"])
def test_cancel_calls_on_cancel_once_and_stops_posting(make_batcher, how):
    server = FakeServer()
    server.cancel = True

    def send(batch: ChunkBatch) -> SendReply:
        if how == "job gone":
            server.posts.append(batch)
            raise JobGone("410", status=410)
        return server.send(batch)

    calls: list[int] = []
    called = threading.Event()
    batcher = make_batcher(send, max_tokens=1, on_cancel=lambda: (calls.append(1), called.set()))
    batcher.add("a")
    assert called.wait(5)
    batcher.add("b")
    batcher.heartbeat()
    assert not batcher.finish(timeout=5)
    batcher.close(timeout=5)
    assert batcher.cancelled
    assert calls == [1]
    assert len(server.posts) == 1


def test_blocked_post_does_not_block_add(make_batcher):
    server = FakeServer()
    server.gate = threading.Event()
    batcher = make_batcher(server.send, max_tokens=1, max_delay=60)
    tokens = [f"{i}," for i in range(1001)]
    batcher.add(tokens[0])
    assert server.wait_for_posts(1)
    adder = threading.Thread(target=lambda: [batcher.add(t) for t in tokens[1:]])
    adder.start()
    adder.join(5)
    blocked = adder.is_alive()
    server.gate.set()
    assert not blocked, "add() waited for the POST in flight"
    assert batcher.finish(timeout=5)
    assert server.stored == tokens
    assert len(server.posts) <= 3


def test_adaptive_posts_the_first_token_alone_at_once(make_batcher):
    server = FakeServer()
    batcher = make_batcher(server.send, adaptive=True, max_tokens=100, max_delay=60)
    batcher.add("a")
    assert server.wait_for_posts(1)
    assert server.posts[0] == ChunkBatch(JOB, 0, ("a",))


def test_adaptive_coalesces_tokens_that_arrive_during_a_post(make_batcher):
    server = FakeServer()
    server.gate = threading.Event()
    batcher = make_batcher(server.send, adaptive=True, max_tokens=100, max_delay=60)
    batcher.add("a")
    assert server.wait_for_posts(1)
    for token in "bcdef":
        batcher.add(token)
    server.gate.set()
    assert server.wait_for_posts(2)
    assert server.posts[1] == ChunkBatch(JOB, 1, tuple("bcdef"))


def test_heartbeat_posts_an_empty_batch_without_moving_seq(make_batcher):
    server = FakeServer()
    batcher = make_batcher(server.send, max_tokens=3, max_delay=60)
    for token in "abc":
        batcher.add(token)
    wait_until(lambda: batcher.delivered_tokens == 3, 5, 0.001, "the first batch acknowledged")
    batcher.heartbeat()
    assert server.wait_for_posts(2)
    assert server.posts[1] == ChunkBatch(JOB, 3, ())
    batcher.add("d")
    assert batcher.finish(timeout=5)
    assert server.posts[-1] == ChunkBatch(JOB, 3, ("d",), done=True)
    assert server.stored == list("abcd")


def test_heartbeat_is_skipped_while_tokens_are_buffered(make_batcher):
    server = FakeServer()
    batcher = make_batcher(server.send, max_tokens=100, max_delay=60)
    batcher.add("a")
    batcher.heartbeat()
    assert batcher.finish(timeout=5)
    assert server.posts == [ChunkBatch(JOB, 0, ("a",), done=True)]


def test_add_after_finish_raises(make_batcher):
    batcher = make_batcher(FakeServer().send)
    assert batcher.finish(timeout=5)
    with pytest.raises(RuntimeError):
        batcher.add("late")


def test_close_drops_the_buffer_and_stops_the_sender(make_batcher):
    server = FakeServer()
    batcher = make_batcher(server.send, max_tokens=100, max_delay=60)
    batcher.add("a")
    batcher.close(timeout=5)
    assert not batcher.finish(timeout=1)
    assert server.posts == []


TOKENS = st.one_of(st.text(max_size=3), st.sampled_from(["", " ", "é", "日本語", "🦙", "\n", "\u200b"]))


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(st.tuples(TOKENS, st.floats(0, 0.003)), max_size=40),
    max_tokens=st.integers(1, 8),
    max_delay=st.sampled_from([0.0, 0.001, 0.005]),
    adaptive=st.booleans(),
    fail_rate=st.sampled_from([0.0, 0.2, 0.4]),
    seed=st.integers(0, 2**32),
)
def test_every_token_is_stored_once_in_order_despite_lost_posts_and_replies(
        steps, max_tokens, max_delay, adaptive, fail_rate, seed):
    # The sender thread must not draw from hypothesis: a plain seeded Random is thread-safe.
    server = FakeServer(fail_rate=fail_rate, rng=random.Random(seed), max_latency=0.001)
    batcher = TokenBatcher("job-p", server.send, max_tokens=max_tokens, max_delay=max_delay,
                           adaptive=adaptive, retry_deadline=30, backoff=Backoff(base=0.0005, cap=0.005))
    try:
        for token, pause in steps:
            batcher.add(token)
            if pause:
                time.sleep(pause)  # the model's pace between tokens, not synchronisation
        assert batcher.finish(stats={"eval_count": len(steps)}, timeout=20)
    finally:
        batcher.close(timeout=5)
    tokens = [token for token, _ in steps]
    assert server.stored == tokens
    assert "".join(server.stored) == "".join(tokens)
    assert server.done_count == 1
    assert server.done_batch.stats == {"eval_count": len(steps)}
    assert server.violations == []
    assert server.conflicts == 0
    assert batcher.delivered_tokens == len(tokens)


def test_a_backlog_larger_than_the_servers_chunk_cap_goes_out_in_posts_under_it():
    server = FakeServer()
    server.gate = threading.Event()
    batcher = TokenBatcher(JOB, server.send, max_tokens=5, max_delay=0.01)
    batcher.add("first")                  # goes out at once, and its POST is held at the gate
    wait_until(lambda: server.posts, message="the first POST")
    tokens = [f"t{i} " for i in range(2 * MAX_CHUNKS_PER_POST + 500)]
    for token in tokens:
        batcher.add(token)
    server.gate.set()
    assert batcher.finish(stats={"eval_count": len(tokens) + 1}, timeout=10)
    assert server.stored == ["first", *tokens]
    assert max(len(post.chunks) for post in server.posts) == MAX_CHUNKS_PER_POST
    assert [post.done for post in server.posts].count(True) == 1 and server.posts[-1].done
