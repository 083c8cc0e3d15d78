"""`/metrics` in Prometheus' text format (read back with prometheus_client's own parser) and `/healthz`."""
from __future__ import annotations

import json
import signal
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from devtools.processes import LiveServer, launch_agent, start_simulator, wait_until
from server import create_app
from server.storage import get_storage, jobs
from server.storage.agents import add_agent, touch
from sim.tokens import chat_prompt, expected_text

FAMILIES = {
    "orchestrator_requests": "gauge", "orchestrator_queue_depth": "gauge", "orchestrator_agents_online": "gauge",
    "orchestrator_time_to_first_token_seconds": "histogram", "orchestrator_token_delivery_seconds": "histogram",
    "orchestrator_tokens_streamed": "counter", "orchestrator_chunk_posts": "counter", "orchestrator_polls": "counter",
    "orchestrator_lease_expiries": "counter", "orchestrator_queue_timeouts": "counter",
    "orchestrator_requests_finished": "counter", "orchestrator_jobs_done": "counter",
}


def parse(text: str) -> dict[tuple, float]:
    """Every sample as {(name, (label, value), ...): value}, via prometheus_client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


def families(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


# --- in process -----------------------------------------------------------------

def test_every_metric_family_is_exposed_in_prometheus_text_format(client):
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    exposed = families(response.get_data(as_text=True))
    assert {name: exposed.get(name) for name in FAMILIES} == FAMILIES


def test_each_app_has_its_own_registry(tmp_path):
    apps = [create_app({"DATABASE": str(tmp_path / f"{n}.db"), "SWEEP_INTERVAL": 0}) for n in range(2)]
    assert all(app.test_client().get("/metrics").status_code == 200 for app in apps)
    assert apps[0].extensions["metrics"].registry is not apps[1].extensions["metrics"].registry


def test_gauges_read_the_queue_and_the_agents_from_the_database(client, dbconn):
    agent = add_agent(dbconn, "gpu-1")
    touch(dbconn, agent.id, time.time(), ["llama3"])
    touch(dbconn, add_agent(dbconn, "gpu-2").id, time.time(), ["qwen"])
    for model in ("llama3", "llama3", "qwen"):
        jobs.create_job(dbconn, model, [{"role": "user", "content": "hi"}], {}, time.time())
    jobs.claim_job(dbconn, agent.id, ["llama3"], time.time(), 5, 30)
    samples = parse(client.get("/metrics").get_data(as_text=True))
    assert samples[("orchestrator_queue_depth", ("model", "llama3"))] == 1
    assert samples[("orchestrator_queue_depth", ("model", "qwen"))] == 1
    assert samples[("orchestrator_requests", ("state", "queued"))] == 2
    assert samples[("orchestrator_requests", ("state", "delivered"))] == 1
    assert samples[("orchestrator_agents_online",)] == 2


def test_models_no_online_agent_declares_fold_into_one_label(client, dbconn):
    touch(dbconn, add_agent(dbconn, "declares").id, time.time(), ["llama3"])
    touch(dbconn, add_agent(dbconn, "serves-anything").id, time.time(), None)
    names = ["llama3", "x" * 5000 + "\nline", *(f"random-{i}" for i in range(50))]
    for model in names:
        jobs.create_job(dbconn, model, [{"role": "user", "content": "hi"}], {}, time.time())
    samples = parse(client.get("/metrics").get_data(as_text=True))
    depth = {labels[0][1]: value for (name, *labels), value in samples.items() if name == "orchestrator_queue_depth"}
    assert depth == {"llama3": 1, "(other)": len(names) - 1}


def test_sweeps_count_lease_expiries_and_queue_timeouts(app, client, dbconn):
    client.get("/healthz")   # the first request hooks the metrics to the sweeper
    agent = add_agent(dbconn, "gpu-1")
    now = time.time()
    jobs.create_job(dbconn, "m", [{"role": "user", "content": "hi"}], {}, now)
    jobs.claim_job(dbconn, agent.id, ["m"], now, app.config["DELIVERY_LEASE_SECONDS"], 30)
    jobs.create_job(dbconn, "other", [{"role": "user", "content": "hi"}], {}, now - app.config["QUEUE_TIMEOUT"])
    app.extensions["sweeper"].sweep(dbconn, now=now + app.config["DELIVERY_LEASE_SECONDS"] + 1)
    samples = parse(client.get("/metrics").get_data(as_text=True))
    assert samples[("orchestrator_lease_expiries_total", ("outcome", "requeued"))] == 1
    assert samples[("orchestrator_queue_timeouts_total",)] == 1


@pytest.mark.parametrize("app_config", [{"ADMIN_TOKEN": "op-secret"}])
def test_metrics_need_the_admin_token_when_one_is_set(client, app_config):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer op-secret"}).status_code == 200
    assert client.get("/healthz").status_code == 200      # load balancers carry no token


def test_healthz_is_ok_on_a_current_database(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "migrations": "current"}


def test_healthz_is_503_when_the_database_is_ahead_of_the_code(client, dbconn):
    dbconn.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_from_the_future.sql', 0)")
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "migrations_mismatch"


def test_healthz_is_503_when_the_database_cannot_be_opened(app, client, tmp_path, monkeypatch):
    store = get_storage(app)
    store.close()                                  # no pooled connection left to borrow
    monkeypatch.setattr(store, "path", str(tmp_path))     # a directory: SQLite cannot open it
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_unreachable"


# --- a real chat ----------------------------------------------------------------

def test_counters_move_as_a_chat_streams(tmp_path):
    server = LiveServer(tmp_path / "server.db", tmp_path / "server.log").start()
    sim = start_simulator(tmp_path, "--first-token-ms", "20", "--interval-ms", "5", "--tokens", "30")
    agent = launch_agent(server, sim.url, tmp_path / "agent.log", "metrics", LONG_POLL="5", TRANSPORT="http")
    try:
        before = scrape(server)
        tokens = 80
        body = {"model": "sim", "messages": [{"role": "user", "content": "count"}],
                "options": {"sim_tokens": tokens, "sim_interval_ms": 25}}
        with requests.post(server.url + "/api/v1/chat/stream", json=body, stream=True, timeout=30,
                           headers={"Connection": "close"}) as response:
            lines = response.iter_lines(chunk_size=1)
            text = ""
            for line in lines:                # the first few tokens, then look at the counters
                if line.startswith(b"data: {"):
                    text += json.loads(line[6:])["delta"]
                    if len(text) > 20:
                        break
            during = scrape(server)
            assert during[("orchestrator_requests", ("state", "running"))] == 1
            assert during[("orchestrator_tokens_streamed_total",)] > before[("orchestrator_tokens_streamed_total",)]
            assert during[("orchestrator_time_to_first_token_seconds_count",)] == 1
            for line in lines:
                if line.startswith(b"data: {"):
                    text += json.loads(line[6:])["delta"]
        assert text == expected_text(0, tokens, "sim", chat_prompt(body["messages"]))

        after = wait_until(lambda: finished(scrape(server)), 15, 0.2, "the request counted as done")
        assert after[("orchestrator_tokens_streamed_total",)] - before[("orchestrator_tokens_streamed_total",)] \
            == tokens
        assert after[("orchestrator_chunk_posts_total", ("status", "200"))] > \
            before.get(("orchestrator_chunk_posts_total", ("status", "200")), 0)
        assert after[("orchestrator_polls_total", ("kind", "long"), ("outcome", "job"))] == 1
        assert after[("orchestrator_token_delivery_seconds_count",)] == tokens
        assert after[("orchestrator_requests", ("state", "running"))] == 0
        assert "model sim" in agent.log() and "tokens/s" in agent.log()
    finally:
        agent.stop(signal.SIGKILL)
        sim.stop()
        server.stop()


def scrape(server: LiveServer) -> dict[tuple, float]:
    with requests.get(server.url + "/metrics", timeout=10, headers={"Connection": "close"}) as response:
        assert response.status_code == 200
        return parse(response.text)


def finished(samples: dict[tuple, float]) -> dict[tuple, float] | None:
    return samples if samples[("orchestrator_requests_finished_total", ("state", "done"))] == 1 else None
