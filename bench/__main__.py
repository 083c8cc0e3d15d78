"""`python -m bench` (`make bench ARGS=...`): how much time the orchestrator adds to a streamed chat.

Prints the Markdown tables on stdout, writes the raw results as JSON, the
tables as Markdown and a PNG into --out, and exits 1 if any token was lost or
duplicated or any chat failed (the tables still show which).
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.configs import CONFIGURATIONS, Configuration, networks, variant
from bench.report import evaluate, git_revision, machine, markdown, now_iso, summaries, write_json
from bench.runner import BenchRun, RunOptions, RunResults
from bench.workload import PROFILES
from devtools.processes import ROOT, HarnessError

NETWORKS = ("loopback", "wan")
DEFAULT_OUT = ROOT / "bench" / "results"


def _names(allowed: tuple[str, ...] | list[str]):
    def parse(value: str) -> list[str]:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return list(dict.fromkeys(names))
    return parse


def _variant(value: str) -> Configuration:
    try:
        return variant(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _concurrency(value: str) -> tuple[int, int]:
    if value.strip() == "0":
        return 0, 1
    try:
        chats, agents = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected CHATSxAGENTS, e.g. 20x4, or 0") from None
    if chats < 1 or agents < 1:
        raise argparse.ArgumentTypeError("chats and agents must be at least 1")
    return chats, agents


DESCRIPTION = """\
Measure how much time the orchestrator adds to a streamed chat. A simulated Ollama answers every chat
with the same timing; the same chats go straight to it (direct) and through the server and an agent in
each configuration below, on this machine's loopback and over an emulated slow network (wan). Prints
Markdown tables; docs/benchmark.md explains every column. About 8 minutes with the defaults."""


def _epilog() -> str:
    lines = ["configurations:"] + [textwrap.fill(c.help, 100, initial_indent=f"  {c.name:15} ",
                                                   subsequent_indent=" " * 18) for c in CONFIGURATIONS.values()]
    lines += ["", "examples:", "  python -m bench --configs after --network loopback --concurrent 0 --requests 40",
              "  python -m bench --profile quick --network loopback --requests 3 --concurrent 0   (a minute)"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION, epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--profile", choices=sorted(PROFILES), default="seed",
        help="how the simulated model answers: " + "; ".join(f"{p.name}: {p.help}" for p in PROFILES.values())
        + " (default: %(default)s)")
    add("--requests", type=int, default=10, help="chats sent one after another to each configuration on each "
        "network (default: %(default)s)")
    add("--network", type=_names(NETWORKS), default=list(NETWORKS),
        help="comma-separated: loopback (agents talk to the server directly), wan (through a proxy that delays "
        "each direction by half of --rtt) (default: loopback,wan)")
    add("--rtt", type=float, default=40.0, help="round trip of the emulated slow network, ms "
        "(default: %(default)s)")
    add("--configs", type=_names(list(CONFIGURATIONS)), default=list(CONFIGURATIONS),
        help=f"comma-separated configurations to run, listed below (default: {','.join(CONFIGURATIONS)})")
    add("--variant", type=_variant, action="append", default=[], metavar="NAME=BASE:KEY=VALUE,...",
        help="also run configuration BASE with other agent (or ORCH_* server) settings under a new NAME, e.g. "
        "batch100=after+longpoll:BATCH_MAX_DELAY=0.1; repeatable")
    add("--concurrent", type=_concurrency, default=(20, 4), metavar="CHATSxAGENTS",
        help="then CHATS chats at once to each configuration, served by AGENTS agents; 0 skips this "
        "(default: 20x4)")
    add("--seed", type=int, default=None, help="seed of the random delay before each chat that makes it arrive "
        "at a random point of the agent's poll cycle (default: a new one each run, recorded in the JSON)")
    add("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON, Markdown and PNG "
        "(default: bench/results)")
    add("--engine", choices=("sqlite", "postgres"), default="sqlite",
        help="the servers' database: a SQLite file each, or a database each on a throwaway PostgreSQL, whose CPU "
        "counts as the server's (default: %(default)s)")
    add("--keep", action="store_true", help="keep the work directory (databases, process logs) even on success")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.rtt < 0:
        parser.error("--rtt must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    options = RunOptions(PROFILES[args.profile], [CONFIGURATIONS[n] for n in args.configs] + args.variant,
                         networks(args.network, args.rtt), args.requests, *args.concurrent, engine=args.engine,
                         seed=seed)
    meta = _meta(args, sys.argv[1:] if argv is None else argv) | {"seed": seed}
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    started = time.monotonic()
    try:
        with BenchRun(options, workdir) as run:
            results = run.run()
    except HarnessError as exc:
        print(f"bench: {exc}\nbench: logs and databases kept in {workdir}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nbench: interrupted; logs kept in {workdir}", file=sys.stderr)
        return 130
    meta.update(duration_s=round(time.monotonic() - started, 1), load_average_after=_load())

    rows = summaries(results.chats, results.windows)
    evaluated = evaluate(rows, args.rtt)
    text = markdown(rows, evaluated, meta, {c.name: c.claims for c in options.configs})
    print(text)
    _write(args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{args.profile}", text, meta, rows, evaluated,
           results, args.network)
    return _verdict(results, workdir, args.keep)


def _meta(args: argparse.Namespace, argv: list[str]) -> dict:
    chats, agents = args.concurrent
    return {"date": now_iso(), "machine": machine(), "revision": git_revision(),
            "command": shlex.join(["python", "-m", "bench", *argv]), "profile": vars(PROFILES[args.profile]),
            "rtt_ms": args.rtt, "requests": args.requests, "engine": args.engine,
            "concurrent": {"chats": chats, "agents": agents},
            "load_average_before": _load()}


def _write(stem: Path, text: str, meta: dict, rows: list[dict], evaluated: list[dict], results: RunResults,
           network_names: list[str]) -> None:
    """The JSON, the Markdown and (with matplotlib) the PNG, side by side."""
    from bench.plot import write_png

    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), meta, rows, evaluated, results.chats, results.windows)
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    png = write_png(stem.with_suffix(".png"), results.chats, network_names)
    print(f"bench: {len(results.chats)} chats in {meta['duration_s']:.0f} s; wrote {stem}.json, .md"
          + (", .png" if png else " (no PNG: install the bench extra, `pip install -e '.[bench]'`)"),
          file=sys.stderr)


def _verdict(results: RunResults, workdir: Path, keep: bool) -> int:
    """1, loudly, if any chat lost or duplicated a token or failed; the work directory stays for its logs."""
    bad = [c for c in results.chats if not c.ok]
    if bad:
        print(f"bench: FAILED: {len(bad)} chat(s) lost or duplicated tokens or failed "
              f"(logs kept in {workdir}):", file=sys.stderr)
        for chat in bad[:20]:
            print(f"  {chat.tag}: {chat.error or ''} lost {chat.lost}, duplicated {chat.duplicated}, "
                  f"delivered {chat.delivered}/{chat.expected}", file=sys.stderr)
        return 1
    if keep:
        print(f"bench: work directory kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
