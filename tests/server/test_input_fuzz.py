"""Fuzzing the inputs that once gave a 500 (issue 14): lone surrogates anywhere in options, chunk numbers
past 64 bits, non-ASCII digits, model names of any length and character.  An agent serving any model is
online, so an accepted chat really is queued and stored: what fails to store shows up as a 5xx."""
from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.storage import jobs
from server.storage.agents import add_agent, touch

# Every code point, lone surrogates (category Cs) included: Hypothesis leaves them out by default.
ANY_TEXT = st.text(st.characters(codec=None, categories=("Cs", "L", "N", "P", "Z", "Cc")), max_size=20)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | ANY_TEXT,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                           max_leaves=8)
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
DOORS = {"/api/v1/chat/stream": "messages", "/v1/chat/completions": "messages", "/api/chat": "messages"}


def _online_agent_serving_anything(dbconn) -> None:
    touch(dbconn, add_agent(dbconn, "any-model").id, time.time(), None)


def _post(client, path: str, payload: dict):
    # json.dumps escapes lone surrogates as \\udXXX: valid JSON the server must refuse with a 400.
    response = client.post(path, data=json.dumps(payload), content_type="application/json")
    response.close()          # an accepted chat streams: stop following it
    return response.status_code


@given(options=st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=3), stop=ANY_TEXT, model=ANY_TEXT)
@example(options={"stop": ["\ud800"]}, stop="x", model="m")
@example(options={}, stop="a\udfff", model="m")
@example(options={}, stop="x", model=("x" * 99 + "\n") * 100)
@FUZZ
def test_fuzzed_options_stop_and_model_names_get_a_4xx_or_a_stream_never_a_5xx(app, client, dbconn, options, stop,
                                                                               model):
    _online_agent_serving_anything(dbconn)
    hello = [{"role": "user", "content": "hi"}]
    for path in DOORS:
        payload = {"model": model or "m", "messages": hello, "options": options, "stream": True}
        if path == "/v1/chat/completions":
            payload["stop"] = stop or "x"
        assert _post(client, path, payload) < 500, payload


HEADER_TEXT = st.text(st.characters(codec="latin-1", categories=("L", "N", "P", "S", "Zs")), max_size=12)


@given(after=st.integers(min_value=-(2**70), max_value=2**70) | HEADER_TEXT)
@example(after=2**63)
@example(after=2**64)
@FUZZ
def test_fuzzed_resume_points_get_a_4xx_or_a_stream_never_a_5xx(app, client, dbconn, after):
    job = jobs.create_job(dbconn, "m", [{"role": "user", "content": "hi"}], {}, time.time())
    jobs.cancel_job(dbconn, job, time.time())      # a final job: an accepted resume ends at once
    for response in (client.get(f"/api/v1/chat/stream/{job}", query_string={"after": str(after)}),
                     client.get(f"/api/v1/chat/stream/{job}", headers={"Last-Event-ID": str(after)})):
        body = response.get_data()
        assert response.status_code < 500 and (response.status_code != 200 or body.endswith(b"\n\n")), body


@given(minutes=st.text(max_size=6))
@example(minutes="\u00b2")         # '²': str.isdigit() says yes, int() says no
@example(minutes="\u0663")         # Arabic-Indic three: int() reads it
@FUZZ
def test_fuzzed_status_windows_get_a_400_or_the_status_never_a_5xx(client, minutes):
    response = client.get("/api/v1/status", query_string={"minutes": minutes})
    assert response.status_code in (200, 400)
