"""The status page's live figures, in-process: each agent's current tokens/s, and the series behind the
charts (GET /api/v1/status/series): its buckets, an empty window, and what it reads from the database."""
from __future__ import annotations

import time

import pytest
from test_pages import finished_request, online_agent

from server import operators
from server.series import bucket_series
from server.storage import agents, chunks, jobs
from server.storage.agents import current_token_rates
from server.storage.stats import streamed_jobs

# --- current tokens/s ---------------------------------------------------------------------------------

def running_request(db, agent_id: str, posts: list[tuple[float, int]], created: float) -> str:
    """A request still streaming: claimed at ``created``, then one POST of ``n`` chunks at each ``(time, n)``."""
    request_id = jobs.create_job(db, "sim", [{"role": "user", "content": "hi"}], {}, created)
    assert jobs.claim_job(db, agent_id, None, created, 5, 30) is not None
    seq = 0
    for at, n in posts:
        chunks.append_chunks(db, agent_id, request_id, seq, ["tok"] * n, False, at, 30)
        seq += n
    return request_id


def test_an_agent_streaming_fifty_tokens_a_second_shows_fifty_not_its_one_minute_average(dbconn):
    busy = online_agent(dbconn, "busy", ["sim"])
    online_agent(dbconn, "idle", ["sim"])
    now = 10_000.0
    # Five tokens every 0.1 s for the last 10 s, and an older answer a minute ago.
    running_request(dbconn, busy.id, [(now - 9.95 + 0.1 * i, 5) for i in range(100)], created=now - 11)
    finished_request(dbconn, busy.id, created=now - 70, first_token=now - 69, finished=now - 68, tokens=100)

    assert current_token_rates(dbconn, now) == {busy.id: 50.0}
    assert agents.CURRENT_RATE_SECONDS == 5


def test_an_answer_that_ended_a_moment_ago_still_counts_and_one_that_ended_long_ago_does_not(dbconn):
    agent = online_agent(dbconn, "gpu-1", ["sim"])
    now = 10_000.0
    finished_request(dbconn, agent.id, created=now - 3, first_token=now - 2, finished=now - 1, tokens=21)
    finished_request(dbconn, agent.id, created=now - 30, first_token=now - 29, finished=now - 28, tokens=40)

    assert current_token_rates(dbconn, now) == {agent.id: 4.2}


def test_status_lists_each_agents_current_rate_and_its_window(client, dbconn):
    agent = online_agent(dbconn, "gpu-1", ["sim"])
    now = time.time()
    running_request(dbconn, agent.id, [(now - 1, 10)], created=now - 2)

    status = client.get("/api/v1/status").get_json()

    assert status["current_rate_seconds"] == 5
    assert status["agents"][0]["current_tokens_per_second"] == 2.0


# --- the charts' series --------------------------------------------------------------------------------

def test_series_of_an_empty_window_has_every_bucket_and_no_latency(client):
    before = time.time()
    series = client.get("/api/v1/status/series").get_json()

    assert series["window_seconds"] == 900 and series["bucket_seconds"] == 15
    assert series["truncated"] is False
    buckets = series["buckets"]
    assert len(buckets) == 60
    assert [b["start"] % 15 for b in buckets] == [0] * 60
    assert [b2["start"] - b1["start"] for b1, b2 in zip(buckets, buckets[1:], strict=False)] == [15] * 59
    assert buckets[-1]["start"] <= series["now"] < buckets[-1]["start"] + 15 and series["now"] >= before
    assert {(b["tokens_per_second"], b["first_tokens"], b["first_token_p50"], b["first_token_p95"])
            for b in buckets} == {(0.0, 0, None, None)}
    assert all(b["seconds"] == 15 for b in buckets[:-1])


def test_series_window_is_a_query_parameter(client):
    series = client.get("/api/v1/status/series?minutes=1").get_json()
    assert series["window_seconds"] == 60 and series["bucket_seconds"] == 1
    assert len(series["buckets"]) == 60


def test_series_puts_tokens_and_first_token_latencies_in_their_buckets(dbconn):
    agent = online_agent(dbconn, "gpu-1", ["sim"])
    now = 9_000.0 + 7.5  # halfway through the newest 15 s bucket, which starts at 9,000
    # 30 tokens streamed from 8,971 to 8,974, inside the bucket [8,970, 8,985): 2 tokens/s over it.
    for ttft in (0.1, 0.2, 0.4):
        finished_request(dbconn, agent.id, created=8_971 - ttft, first_token=8_971, finished=8_974, tokens=10)
    # 60 tokens from 8,980 to 8,995: a third in [8,970, 8,985), two thirds in [8,985, 9,000).
    finished_request(dbconn, agent.id, created=8_979, first_token=8_980, finished=8_995, tokens=60)
    # Still streaming: 15 tokens since 8,995, spread up to now.
    running_request(dbconn, agent.id, [(8_995, 1), (9_005, 14)], created=8_994.5)
    # Long before the window: ignored.
    finished_request(dbconn, agent.id, created=7_000, first_token=7_001, finished=7_002, tokens=500)

    rows, truncated = streamed_jobs(dbconn, now - 900, 100)
    buckets = {b["start"]: b for b in bucket_series(rows, now, 900, 60)["buckets"]}

    assert not truncated and len(rows) == 5
    assert buckets[8_970]["tokens_per_second"] == pytest.approx((30 + 20) / 15, abs=0.01)
    assert buckets[8_970]["first_tokens"] == 4
    assert buckets[8_970]["first_token_p50"] == pytest.approx(0.2)
    assert buckets[8_970]["first_token_p95"] == pytest.approx(1.0)
    assert buckets[8_985]["tokens_per_second"] == pytest.approx(40 / 15 + 15 * 5 / 12.5 / 15, abs=0.01)
    assert buckets[8_985]["first_token_p50"] == pytest.approx(0.5)
    newest = buckets[9_000]
    assert newest["seconds"] == 7.5
    assert newest["tokens_per_second"] == pytest.approx(15 * 7.5 / 12.5 / 7.5, abs=0.01)
    assert newest["first_tokens"] == 0 and newest["first_token_p50"] is None
    total = sum(b["tokens_per_second"] * b["seconds"] for b in buckets.values())
    assert total == pytest.approx(30 + 60 + 15, abs=0.5)


def test_series_counts_an_answer_sent_in_one_post_in_its_bucket(dbconn):
    agent = online_agent(dbconn, "gpu-1", ["sim"])
    request_id = jobs.create_job(dbconn, "sim", [{"role": "user", "content": "hi"}], {}, 8_990)
    assert jobs.claim_job(dbconn, agent.id, None, 8_990, 5, 30) is not None
    chunks.append_chunks(dbconn, agent.id, request_id, 0, ["tok"] * 9, True, 8_991, 30)

    rows, _ = streamed_jobs(dbconn, 8_000, 100)
    buckets = {b["start"]: b for b in bucket_series(rows, 9_007.5, 900, 60)["buckets"]}

    assert buckets[8_985]["tokens_per_second"] == pytest.approx(9 / 15, abs=0.01)
    assert buckets[8_985]["first_token_p95"] == pytest.approx(1.0)


def test_series_says_when_it_left_older_requests_out(monkeypatch, client, dbconn):
    agent = online_agent(dbconn, "gpu-1", ["sim"])
    now = time.time()
    for i in range(3):
        finished_request(dbconn, agent.id, created=now - 60 + i, first_token=now - 59 + i, finished=now - 58 + i)
    assert client.get("/api/v1/status/series").get_json()["truncated"] is False

    monkeypatch.setattr(operators, "SERIES_REQUEST_LIMIT", 2)
    series = client.get("/api/v1/status/series").get_json()

    assert series["truncated"] is True
    assert sum(b["first_tokens"] for b in series["buckets"]) == 2


def test_status_queries_search_indexes_and_read_chunks_only_by_primary_key(dbconn):
    statements: list[str] = []
    dbconn.raw.set_trace_callback(statements.append)
    try:
        streamed_jobs(dbconn, 0.0, 10)
        current_token_rates(dbconn, 0.0)
    finally:
        dbconn.raw.set_trace_callback(None)
    assert len(statements) == 3
    for sql in statements:
        steps = [row[3] for row in dbconn.execute("EXPLAIN QUERY PLAN " + sql)]
        assert not any(step.startswith("SCAN") and "USING" not in step for step in steps), (sql, steps)
        assert not any(step.startswith("SCAN c") for step in steps), (sql, steps)
