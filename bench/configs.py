"""The configurations the benchmark compares, the networks it runs them over, and the diagnosis' claims.

Every agent setting is pinned here, not left to the agent's defaults, so a run
measures what its row says even after a default changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from agent.config import DEFAULTS as AGENT_DEFAULTS
from agent.legacy import LEGACY_POLL_INTERVAL


@dataclass(frozen=True)
class Claims:
    """The diagnosis' figures for one configuration (seed profile, ms); None where it claimed nothing."""

    ttft_ms: float | None = None
    gap_ms: float | None = None
    total_ms: float | None = None


@dataclass(frozen=True)
class Configuration:
    """How the server and its agents run; `direct` has neither (the client reads the simulator)."""

    name: str
    help: str
    server_env: dict[str, str] | None = None
    agent_env: dict[str, str] = field(default_factory=dict)
    agent_args: tuple[str, ...] = ()
    claims: Claims = Claims()

    @property
    def direct(self) -> bool:
        return self.server_env is None

    @property
    def poll_cycle(self) -> float:
        """Seconds between an idle agent's polls; 0 when a chat has no poll to wait for (direct, long poll)."""
        if self.direct:
            return 0.0
        if "--legacy" in self.agent_args:
            return LEGACY_POLL_INTERVAL
        if self.agent_env.get("TRANSPORT") == "ws":
            return 0.0                  # jobs are pushed: nothing waits for a poll
        if float(self.agent_env.get("LONG_POLL", AGENT_DEFAULTS["LONG_POLL"])) > 0:
            return 0.0
        return float(self.agent_env.get("POLL_INTERVAL", AGENT_DEFAULTS["POLL_INTERVAL"]))


# The design card's retrofit: 100 ms short poll, TokenBatcher 5 tokens / 50 ms, keep-alive (the agent's
# client always reuses connections outside --legacy), the in-process condition notifier.
RETROFIT_AGENT = {"TRANSPORT": "http", "POLL_INTERVAL": "0.1", "LONG_POLL": "0", "BATCH_MAX_TOKENS": "5",
                  "BATCH_MAX_DELAY": "0.05", "BATCH_MODE": "fixed"}
# Long enough that an idle agent costs one request per 25 s, short enough to stay under the server's
# ORCH_MAX_LONG_POLL (30 s) and the idle timeouts of common proxies and NATs (60 s and more).
LONG_POLL_SECONDS = "25"

CONFIGURATIONS = {
    c.name: c
    for c in (
        Configuration("direct", "no orchestrator: the client reads the Ollama simulator itself (the floor)",
                      claims=Claims(1000, 20, 2980)),
        Configuration("before", "the old agent (--legacy: asks for work every 1.5 s, one POST per token on a "
                      "new connection) and a server that checks its database for new tokens every 100 ms",
                      {"ORCH_NOTIFIER": "poll"}, {}, ("--legacy",),
                      Claims(2720, 170, 17000)),
        Configuration("after", "the agent asking for work every 100 ms, posting tokens in batches of up to 5 "
                      "tokens or 50 ms (BATCH_MODE=fixed) on one kept-alive connection; the server wakes streams "
                      "at once",
                      {"ORCH_NOTIFIER": "condition"}, RETROFIT_AGENT,
                      claims=Claims(1220, 26, 3600)),
        Configuration("after+longpoll", f"as after, but the agent's request for work waits on the server up to "
                      f"{LONG_POLL_SECONDS} s for a job (LONG_POLL={LONG_POLL_SECONDS})",
                      {"ORCH_NOTIFIER": "condition"}, {**RETROFIT_AGENT, "LONG_POLL": LONG_POLL_SECONDS},
                      claims=Claims(ttft_ms=1000)),
        Configuration("adaptive", "as after+longpoll, but the agent posts each token as soon as no POST is "
                      "under way (BATCH_MODE=adaptive, its default)", {"ORCH_NOTIFIER": "condition"},
                      {**RETROFIT_AGENT, "LONG_POLL": LONG_POLL_SECONDS, "BATCH_MODE": "adaptive"}),
        Configuration("ws", "the WebSocket transport (TRANSPORT=ws): jobs pushed the moment they are queued, "
                      "tokens sent as frames as they come", {"ORCH_NOTIFIER": "condition"}, {"TRANSPORT": "ws"}),
    )
}


def variant(spec: str) -> Configuration:
    """`NAME=BASE:KEY=VALUE,...`: configuration BASE with agent settings changed (`ORCH_*` keys go to the server).

    For example `batch100=after+longpoll:BATCH_MAX_DELAY=0.1`. Raises ValueError with a one-line reason.
    """
    name, _, rest = spec.partition("=")
    base_name, _, settings = rest.partition(":")
    base = CONFIGURATIONS.get(base_name)
    if not name or name in CONFIGURATIONS or base is None or base.direct:
        raise ValueError(f"expected NAME=BASE:KEY=VALUE,... with a new NAME and BASE one of "
                         f"{', '.join(n for n, c in CONFIGURATIONS.items() if not c.direct)}")
    agent_env, server_env = dict(base.agent_env), dict(base.server_env)
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        (server_env if key.startswith("ORCH_") else agent_env)[key.strip()] = value.strip()
    return replace(base, name=name, help=f"{base.name} with {settings}", server_env=server_env,
                   agent_env=agent_env, claims=Claims())


@dataclass(frozen=True)
class Network:
    """The path between agents and the server: loopback, or a WAN emulated by the delay proxy."""

    name: str
    rtt_ms: float


def networks(names: list[str], rtt_ms: float) -> list[Network]:
    return [Network(name, 0.0 if name == "loopback" else rtt_ms) for name in names]
