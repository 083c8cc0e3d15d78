"""The wire form of a chunk (protocol/deltas.py): plain text stays a bare string, the rest an object."""
from __future__ import annotations

import pytest

from protocol.deltas import Delta, WireError, from_parts, from_wire

CALL = {"function": {"name": "get_weather", "arguments": {"location": "Paris"}}}


@pytest.mark.parametrize("delta, wire", [
    (Delta("Hello"), "Hello"),
    (Delta(""), ""),
    (Delta("", thinking="hmm"), {"thinking": "hmm"}),
    (Delta("a", tool_calls=(CALL,)), {"tool_calls": [CALL], "text": "a"}),
    (Delta(embedding=(0.5, -1.0)), {"embedding": [0.5, -1.0]}),
])
def test_every_delta_survives_the_wire_and_storage_unchanged(delta, wire):
    assert delta.to_wire() == wire
    assert from_wire(wire) == delta
    assert from_parts(delta.text, delta.parts()) == delta


@pytest.mark.parametrize("item", [
    5, None, ["a"], {"txt": "a"}, {"thinking": 5}, {"text": None}, {"tool_calls": {}},
    {"tool_calls": [{"function": {"arguments": {}}}]}, {"tool_calls": [{"function": {"name": "f", "arguments": "x"}}]},
    {"embedding": ["x"]}, {"embedding": [True]}, {"embedding": [float("nan")]},
])
def test_anything_else_is_a_wire_error(item):
    with pytest.raises(WireError):
        from_wire(item)
