"""The run's report: Markdown tables (measured beside the diagnosis' claims), the targets, the JSON file."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.configs import Claims
from bench.metrics import SUMMARY_FIELDS, ChatResult, Window, summarize
from devtools.processes import ROOT

# (header, summary field or "claim:<attribute>"), in table order.
LATENCY_COLUMNS = (
    ("configuration", "config"), ("network", "network"), ("case", "case"), ("chats", "chats"),
    ("first token p50", "ttft_p50_ms"), ("claimed", "claim:ttft_ms"), ("first token p95", "ttft_p95_ms"),
    ("first-token overhead p50", "ttft_overhead_p50_ms"), ("overhead p95", "ttft_overhead_p95_ms"),
    ("of which pickup p50", "pickup_p50_ms"),
    ("added/token p50", "added_p50_ms"), ("added p95", "added_p95_ms"), ("added max", "added_max_ms"),
    ("avg gap", "gap_avg_ms"), ("claimed gap", "claim:gap_ms"), ("max gap", "gap_max_ms"),
    ("total p50", "total_p50_ms"), ("claimed total", "claim:total_ms"), ("backlog p50", "backlog_p50_ms"),
)
COST_COLUMNS = (
    ("configuration", "config"), ("network", "network"), ("case", "case"),
    ("agent requests/100 tok", "requests_per_100_tokens"), ("agent frames/100 tok", "frames_per_100_tokens"),
    ("connections/100 tok", "connections_per_100_tokens"),
    ("server CPU s/100 tok", "server_cpu_s_per_100_tokens"), ("agent CPU s/100 tok", "agent_cpu_s_per_100_tokens"),
    ("CPU ms/token", "cpu_ms_per_token"),
    ("tokens", "tokens"), ("lost", "lost"), ("duplicated", "duplicated"), ("failed chats", "failed"),
)


@dataclass(frozen=True)
class Target:
    """A figure the issue asks the retrofit to reach; `limit` in the unit of `field`."""

    text: str
    config: str
    network: str
    field: str
    limit: float
    below: bool = True  # met when measured < limit (False: when measured >= limit)


def targets(rtt_ms: float, direct_total_ms: float | None) -> list[Target]:
    """The issue's targets, for a run whose WAN round trip is `rtt_ms`."""
    found = [
        Target("first-token overhead p50 < 10 ms", "after+longpoll", "loopback", "ttft_overhead_p50_ms", 10),
        Target("added latency per token p50 < 3 ms", "after+longpoll", "loopback", "added_p50_ms", 3),
        Target("first-token overhead p50 < 70 ms", "after", "loopback", "ttft_overhead_p50_ms", 70),
        Target("before: seconds of first-token delay (overhead p50 >= 500 ms)", "before", "loopback",
               "ttft_overhead_p50_ms", 500, below=False),
        Target("before: a growing backlog on the WAN (backlog p50 >= 500 ms)", "before", "wan", "backlog_p50_ms",
               500, below=False),
    ]
    # Issue 13's, for the WebSocket transport.
    found += [
        Target("ws: first-token overhead p50 < 5 ms", "ws", "loopback", "ttft_overhead_p50_ms", 5),
        Target("ws: added latency per token p50 < 1 ms", "ws", "loopback", "added_p50_ms", 1),
        Target("ws: server + agent CPU per token < 1 ms", "ws", "loopback", "cpu_ms_per_token", 1),
        Target("ws: pickup p50 < 25 ms", "ws", "wan", "pickup_p50_ms", 25),
        Target("ws: added latency per token p50 < 25 ms", "ws", "wan", "added_p50_ms", 25),
        Target("ws: added latency per token p95 < 45 ms", "ws", "wan", "added_p95_ms", 45),
    ]
    found += [Target("ws: zero HTTP requests per token", "ws", network, "requests_per_100_tokens", 0.001)
              for network in ("loopback", "wan")]
    if direct_total_ms is not None:
        found.append(Target(f"ws: no backlog: total p50 <= direct + 1 RTT + 30 ms ({direct_total_ms + rtt_ms + 30:.0f} "
                            "ms)", "ws", "wan", "total_p50_ms", direct_total_ms + rtt_ms + 30))
    for config in ("after", "after+longpoll", "adaptive"):
        if direct_total_ms is not None:
            found.append(Target(f"no backlog: total p50 <= direct + 1 RTT + 30 ms "
                                f"({direct_total_ms + rtt_ms + 30:.0f} ms)", config, "wan", "total_p50_ms",
                                direct_total_ms + rtt_ms + 30))
        found.append(Target(f"added latency per token p95 < 2 RTT ({2 * rtt_ms:g} ms)", config, "wan",
                            "added_p95_ms", 2 * rtt_ms))
        found.append(Target("agent requests per 100 tokens <= 25", config, "wan", "requests_per_100_tokens", 25.001))
    return found


def summaries(chats: Sequence[ChatResult], windows: Sequence[Window]) -> list[dict]:
    """One summary row per configuration, network and case, in the run's order."""
    keys = list(dict.fromkeys((c.config, c.network, c.case) for c in chats))
    return [summarize(config, network, case, [c for c in chats if (c.config, c.network, c.case) == key],
                      [w for w in windows if (w.config, w.network, w.case) == key])
            for key in keys for config, network, case in [key]]


def evaluate(rows: Sequence[dict], rtt_ms: float) -> list[dict]:
    """Each target with the measured figure (sequential chats) and whether it is met; absent cells are skipped."""
    sequential = {(r["config"], r["network"]): r for r in rows if r["case"] == "sequential"}
    direct = sequential.get(("direct", "any"))
    evaluated = []
    for target in targets(rtt_ms, direct["total_p50_ms"] if direct else None):
        row = sequential.get((target.config, target.network))
        if row is None or row.get(target.field) is None:
            continue
        measured = row[target.field]
        met = measured < target.limit if target.below else measured >= target.limit
        evaluated.append({"target": target.text, "config": target.config, "network": target.network,
                          "field": target.field, "measured": measured, "limit": round(target.limit, 3), "met": met})
    return evaluated


def markdown(rows: Sequence[dict], evaluated: Sequence[dict], meta: dict, claims: dict[str, Claims]) -> str:
    """The tables printed on stdout; `claims` by configuration name."""
    claims = claims if meta["profile"]["name"] == "seed" else {}
    lines = [f"## Latency (ms), profile `{meta['profile']['name']}`, WAN round trip {meta['rtt_ms']:g} ms",
             "", "Claimed: the diagnosis' figures (for `direct`, the simulated Ollama's own schedule).", "",
             *_table(LATENCY_COLUMNS, rows, claims), "", "## Cost and correctness", "",
             *_table(COST_COLUMNS, rows, claims)]
    if evaluated:
        scope = "" if meta["profile"]["name"] == "seed" else "; the issue sets them for the seed profile"
        lines += ["", f"## Targets (sequential chats{scope})", "", "| target | configuration | measured | limit | met |",
                  "|---|---|---:|---:|---|"]
        for t in evaluated:
            lines.append(f"| {t['target']} | {t['config']}@{t['network']} | {_cell(t['measured'])} | "
                         f"{_cell(t['limit'])} | {'yes' if t['met'] else '**NO**'} |")
    lines += ["", f"{meta['date']}, {meta['machine']['summary']}, `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def _table(columns: Sequence[tuple[str, str]], rows: Sequence[dict], claims: dict[str, Claims]) -> list[str]:
    out = ["| " + " | ".join(header for header, _ in columns) + " |",
           "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        cells = []
        for _, name in columns:
            if name.startswith("claim:"):
                claim = claims.get(row["config"])
                cells.append(_cell(getattr(claim, name[6:]) if claim else None))
            else:
                cells.append(_cell(row[name]))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def machine() -> dict:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    info = {"cores": cores, "arch": platform.machine(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release()}
    info["summary"] = f"{cores} cores {info['arch']} ({cpu or 'unknown CPU'}), Python {info['python']}"
    return info


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+changes' if dirty else ''}" or "unknown"


def write_json(path: Path, meta: dict, rows: Sequence[dict], evaluated: Sequence[dict],
               chats: Sequence[ChatResult], windows: Sequence[Window]) -> None:
    """Everything: the summary, the targets and the raw per-chat and per-window measurements."""
    document = {"meta": meta, "summary": list(rows), "targets": list(evaluated), "fields": list(SUMMARY_FIELDS),
                "chats": [c.to_json() for c in chats], "windows": [w.to_json() for w in windows]}
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def now_iso() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
