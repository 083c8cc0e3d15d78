"""The server's own outages (issue 14): down longer than a lease, its database locked or its disk full.

Real processes throughout: gunicorn with the gevent worker, `python -m agent`, the Ollama simulator, and for
the disk a small tmpfs filled for real.  Nobody at fault is blamed: a healthy agent is not declared lost, a
database that cannot write says so (503 `storage_unavailable`, `/healthz` naming it, streams ending with that
code), and everything recovers when the cause goes away.
"""
from __future__ import annotations

import time

import requests

from devtools.processes import wait_until
from tests.e2e.chat_client import EventStream, expected, start_chat
from tests.e2e.flaky_proxy import FlakyProxy
from tests.e2e.test_faults import rows, stored

LEASE = 6


def test_a_server_down_longer_than_the_lease_gives_its_healthy_agents_job_a_full_lease_after_the_restart(
        live_server_factory, simulator, start_agent):
    server = live_server_factory(ORCH_LEASE_SECONDS=LEASE, ORCH_SWEEP_INTERVAL=0.1, ORCH_CANCEL_GRACE=120)
    tokens = 150
    with FlakyProxy(server.url, reset_rate=0).start() as proxy:
        agent = start_agent(server, simulator.url, API_BASE=proxy.url)
        with start_chat(server, "outage", sim_tokens=tokens, sim_interval_ms=40) as response:
            before = EventStream(response).read(stop_after=5)
            server.kill()
        request_id = before.request_id
        # The agent's POSTs are refused until the restarted sweeper has had its chance.
        proxy.refuse("POST /api/v1/inference/stream ")
        wait_until(lambda: " failed (" in agent.log(), 15, message="the agent's POSTs failing")
        wait_until(lambda: rows(server, "SELECT lease_expires FROM jobs WHERE id = ?", request_id)[0][0] < time.time(),
                   LEASE + 10, 0.2, "the job's lease to run out while the server is down")
        server.start()
        # Ten sweeps at 0.1 s: before the fix, the first one failed the job with agent_lost.
        time.sleep(1.0)
        proxy.refuse(None)
        with requests.get(f"{server.url}/api/v1/chat/stream/{request_id}", stream=True, timeout=(5, 60),
                          headers={"Last-Event-ID": str(before.ids[-1])}) as resumed:
            after = EventStream(resumed).read()
    assert after.done, after.error
    assert before.text + after.text == expected("outage", tokens)
    assert stored(server, request_id)["status"] == "done"
