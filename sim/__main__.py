"""`python -m sim`: the Ollama simulator on a port, until SIGTERM or SIGINT (prints `simulator listening on URL`)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import sim
from sim.log import EmitLog
from sim.plan import (
    DEFAULT_FIRST_TOKEN_MS,
    DEFAULT_INTERVAL_MS,
    DEFAULT_JITTER_MS,
    DEFAULT_LOAD_MS,
    DEFAULT_MODELS,
    DEFAULT_SEED,
    DEFAULT_TOKENS,
    SimConfig,
)
from sim.server import SimulatorServer

DEFAULT_PORT = 11434  # Ollama's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: every setting once, with its default and help."""
    parser = argparse.ArgumentParser(prog="python -m sim", description=sim.__doc__.splitlines()[0])
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default: %(default)s)")
    add("--models", default=DEFAULT_MODELS, help="comma-separated model names (default: %(default)s)")
    add("--load-ms", type=float, default=DEFAULT_LOAD_MS,
        help="extra delay before the first token of a model's first request (default: %(default)s)")
    add("--first-token-ms", type=float, default=DEFAULT_FIRST_TOKEN_MS,
        help="delay before the first token (default: %(default)s)")
    add("--interval-ms", type=float, default=DEFAULT_INTERVAL_MS, help="delay between tokens (default: %(default)s)")
    add("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per answer (default: %(default)s)")
    add("--jitter-ms", type=float, default=DEFAULT_JITTER_MS,
        help="uniform +/- jitter on each interval, seeded (default: %(default)s)")
    add("--seed", type=int, default=DEFAULT_SEED, help="seed for tokens and jitter (default: %(default)s)")
    add("--emit-log", metavar="PATH", help="append one JSON record per emitted event to PATH")
    add("--verbose", action="store_true", help="log every HTTP request to stderr")
    args = parser.parse_args(argv)
    for flag in ("load_ms", "first_token_ms", "interval_ms", "tokens", "jitter_ms"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then exit 0."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    models = tuple(name.strip() for name in args.models.split(",") if name.strip())
    config = SimConfig(models, args.load_ms, args.first_token_ms, args.interval_ms, args.tokens,
                       args.jitter_ms, args.seed)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before any thread starts, so every thread inherits the mask and sigwait gets them.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    emit_log = EmitLog(args.emit_log)
    server = SimulatorServer((args.host, args.port), config, emit_log)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="simulator")
    serving.start()
    host, port = server.server_address[:2]
    print(f"simulator listening on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.shutdown()
        server.server_close()
        emit_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
