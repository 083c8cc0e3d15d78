"""Workload profiles: how the simulated Ollama answers each benchmark chat, and the chat itself."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """One simulated answer: the first token after `first_token_ms`, then one every `interval_ms`."""

    name: str
    first_token_ms: float
    interval_ms: float
    tokens: int
    help: str

    def options(self, tag: str) -> dict:
        """The request's Ollama `options`: the simulator's per-request timing and the tag it logs."""
        return {"sim_first_token_ms": self.first_token_ms, "sim_interval_ms": self.interval_ms,
                "sim_tokens": self.tokens, "sim_tag": tag}

    def chat(self, tag: str) -> dict:
        """A chat body with a prompt of its own (so no two answers are alike) and this profile's timing."""
        return {"model": "sim", "messages": [{"role": "user", "content": f"benchmark request {tag}"}],
                "options": self.options(tag)}


PROFILES = {
    profile.name: profile
    for profile in (
        Profile("seed", 1000, 20, 100, "a model on a GPU: first token after 1,000 ms, then one every 20 ms "
                "(50 tokens/s), 100 tokens; the README's figures"),
        Profile("quick", 50, 2, 100, "short, for tests: first token after 50 ms, then one every 2 ms, "
                "100 tokens"),
    )
}
