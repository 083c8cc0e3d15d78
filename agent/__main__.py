"""`python -m agent` and the `orchestrator-agent` console script."""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from agent.backend import Backend
from agent.client import ServerClient
from agent.config import AgentConfig, ConfigError, load_config
from agent.legacy import legacy_config
from agent.ollama import OllamaBackend
from agent.openai_backend import OpenAIBackend
from agent.transport import build_transport
from agent.worker import StartupError, Worker

PROG = "orchestrator-agent"


def build_worker(config: AgentConfig) -> Worker:
    """The agent for `config`: its server client and transport, its backend, its loop."""
    if config.legacy:
        config = legacy_config(config)
    client = ServerClient(config.api_base, config.agent_id, config.agent_secret, keep_alive=not config.legacy)
    return Worker(config, client, build_backend(config), build_transport(config, client, config.agent_id))


def build_backend(config: AgentConfig) -> Backend:
    """The engine `config` names: Ollama's native API, or an OpenAI-compatible server."""
    if config.backend == "openai":
        return OpenAIBackend(config.backend_url, api_key=config.backend_api_key)
    return OllamaBackend(config.backend_url or config.ollama_url)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; a bad setting exits non-zero with one line on stderr."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The reader of Ollama, the batcher's sender and the poll loop are threads;
    # CPython's 5 ms switch interval would let one hold a token back that long.
    sys.setswitchinterval(0.0005)
    try:
        return build_worker(config).work()
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
