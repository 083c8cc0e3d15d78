"""Every default the README and docs/ name, against the code: both settings tables row by row, and the prose.

The tables are compared both ways (a row the code lacks, a setting the README lacks, a default that differs
on either side); the prose is read for what a newcomer takes as a default: "`NAME=value`" opening a bullet of
a "Why the defaults" section, "`NAME` (value", "(`NAME`, value", "`NAME`, value by default", "`NAME` value"
and "`NAME` ... defaults to value". A value is a number (with a unit: s, ms, MiB) or a `literal`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

import agent.config
import server.config

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "protocol.md", ROOT / "docs" / "benchmark.md"]
SERVER_HEADER = "| Variable | Default | Meaning |"
AGENT_HEADER = "| Variable | Flag | Default | Meaning |"
UNITS = {"s": 1, "ms": 0.001, "MiB": 1024 * 1024, "KiB": 1024}
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[ \u00a0]?(?:ms|s|MiB|KiB)\b)?"
VALUE = rf"(?P<value>`[^`\n]+`|{NUMBER})"


def settings() -> dict[str, tuple[Any, Any]]:
    """Every setting as the documents name it (server ones with ORCH_), with its default and parser."""
    named = {server.config.ENV_PREFIX + s.name: (s.default, s.parse) for s in server.config.SETTINGS}
    return named | {s.name: (s.default, s.parse) for s in agent.config.SETTINGS if not s.required}


def table(text: str, header: str) -> dict[str, str]:
    """The rows of the table under ``header``: variable -> the Default cell as written."""
    lines = text.split(header + "\n", 1)[1].splitlines()[1:]
    column = [c.strip() for c in header.strip("|").split("|")].index("Default")
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[column]
    return rows


def table_problems(text: str) -> list[str]:
    """The two tables against the code's: missing rows, extra rows, and defaults that differ."""
    problems = []
    for header, generated in ((SERVER_HEADER, server.config.markdown_table()),
                              (AGENT_HEADER, agent.config.markdown_table())):
        if header not in text:
            problems.append(f"no table headed {header}")
            continue
        written, code = table(text, header), table(generated, header)
        problems += [f"the table lists {n}, which the code does not have" for n in written.keys() - code.keys()]
        problems += [f"the table lacks {n}" for n in code.keys() - written.keys()]
        problems += [f"the table says {n} defaults to {written[n]}, the code {code[n]}"
                     for n in written.keys() & code.keys() if written[n] != code[n]]
    return problems


def claims(text: str) -> list[tuple[str, str, str]]:
    """(name, value as written, the words around it) for every default the prose claims; table rows excluded."""
    names = "|".join(sorted(map(re.escape, settings()), key=len, reverse=True))
    # The settings tables' rows (| `NAME` | ...) are table_problems' business; other tables are prose here.
    prose = "\n".join("" if re.match(r"\| `[A-Z_]+` \|", line) else line for line in text.splitlines())
    patterns = [
        rf"`(?P<name>{names})`(?: seconds)? \((?:[^()\n]*?\bdefault )?{VALUE}",  # `NAME` (60 s)  (agent, default 0
        rf"\(`(?P<name>{names})`, {VALUE}",                              # (`NAME`, 30 s)
        rf"`(?P<name>{names})`, {VALUE} by default",                     # `NAME`, 60 s by default
        rf"`(?P<name>{names})`(?:'s)?,? (?:is |of )?(?P<value>{NUMBER})(?![\w.])",  # `NAME` 0.1 s**  `NAME`'s 30 s
        rf"`(?P<name>{names})`[^.\n]{{0,60}}?\bdefaults? (?:to |is |stays )?{VALUE}",
        rf"`(?P<name>{names})=(?P<value>[^`]+)`,? is (?:the )?(?:agent's |server's )?default",
    ]
    found = [(m["name"], m["value"], m[0]) for p in patterns for m in re.finditer(p, prose)]
    for section in re.findall(r"\n#*\s*\**Why the defaults[^\n]*\n(.*?)(?=\n#|\Z)", prose, re.S):
        found += [(m["name"], m["value"], m[0])
                  for m in re.finditer(rf"^- \**`(?P<name>{names})=(?P<value>[^`]+)`", section, re.M)]
    return found


def parsed(name: str, written: str) -> Any:
    """A value as the documents write it, parsed by the setting's own parser."""
    value = written.strip("`").replace(",", "").replace("\u00a0", " ")
    number = re.fullmatch(r"(-?[\d.]+) ?(ms|s|MiB|KiB)", value)
    if number:
        value = repr(float(number[1]) * UNITS[number[2]])
    value = re.sub(r"\.0$", "", value) if settings()[name][1] is int else value
    return settings()[name][1](value)


def prose_problems(text: str) -> list[str]:
    problems = []
    for name, written, context in claims(text):
        default, _ = settings()[name]
        try:
            value = parsed(name, written)
        except ValueError:
            problems.append(f"{context!r}: {written} is not a value of {name}")
            continue
        if value != default:
            problems.append(f"{context!r}: says {name} is {written}, the code's default is {default!r}")
    return problems


def unknown_settings(text: str) -> list[str]:
    """ORCH_ names that are not server settings (a renamed or removed one)."""
    known = {server.config.ENV_PREFIX + s.name for s in server.config.SETTINGS}
    return sorted(set(re.findall(r"\bORCH_[A-Z_]*[A-Z]\b", text)) - known)


# --- the documents as they are ---------------------------------------------------

def test_the_readmes_tables_hold_every_setting_with_the_codes_default_and_nothing_else():
    assert table_problems((ROOT / "README.md").read_text()) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_default_the_prose_names_is_the_codes(path):
    assert prose_problems(path.read_text()) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_orch_setting_the_documents_name_exists(path):
    assert unknown_settings(path.read_text()) == []


def test_the_prose_claims_defaults_this_test_reads():
    # If a rewording hid every claim from the patterns, the test above would pass on nothing.
    found = {name for path in DOCUMENTS for name, _, _ in claims(path.read_text())}
    assert {"ORCH_SIGNATURE_SKEW", "ORCH_LEASE_SECONDS", "ORCH_MAX_BODY_BYTES", "ORCH_WORKER_CONNECTIONS",
            "BATCH_MODE", "LONG_POLL", "POLL_INTERVAL", "ORCH_NOTIFIER"} <= found


# --- drift is caught, both ways ---------------------------------------------------

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize(("before", "after", "problem"), [
    ("| `BATCH_MODE` | `--batch-mode` | `adaptive` |", "| `BATCH_MODE` | `--batch-mode` | `fixed` |",
     "BATCH_MODE defaults to `fixed`, the code `adaptive`"),
    ("| `ORCH_LEASE_SECONDS` | `30.0` |", "| `ORCH_LEASE_SECONDS` | `45.0` |",
     "ORCH_LEASE_SECONDS defaults to `45.0`, the code `30.0`"),
    ("| `ORCH_LOG_LEVEL` | `INFO` | Python logging level of the server. |\n", "", "the table lacks ORCH_LOG_LEVEL"),
    ("| `LOG_LEVEL` | `--log-level` | `INFO` |", "| `OLD_KNOB` | `--old-knob` | `1` | Gone. |\n| `LOG_LEVEL` | "
     "`--log-level` | `INFO` |", "the table lists OLD_KNOB, which the code does not have"),
])
def test_a_table_edited_away_from_the_code_fails(before, after, problem):
    assert before in README
    assert any(problem in p for p in table_problems(README.replace(before, after, 1)))


@pytest.mark.parametrize(("before", "after", "name"), [
    ("- `BATCH_MODE=adaptive` (agent, HTTP)", "- `BATCH_MODE=fixed` (agent, HTTP)", "BATCH_MODE"),
    ("- `POLL_INTERVAL=0.1` s", "- `POLL_INTERVAL=0.2` s", "POLL_INTERVAL"),
    ("`LONG_POLL` (agent, HTTP, default 0,", "`LONG_POLL` (agent, HTTP, default 25,", "LONG_POLL"),
    ("`ORCH_WORKER_CONNECTIONS`, 10,000 by default", "`ORCH_WORKER_CONNECTIONS`, 1,000 by default",
     "ORCH_WORKER_CONNECTIONS"),
])
def test_a_default_in_the_readmes_prose_edited_away_from_the_code_fails(before, after, name):
    assert before in README
    assert [p for p in prose_problems(README.replace(before, after, 1)) if name in p]


def test_a_default_in_the_protocols_prose_edited_away_from_the_code_fails():
    text = (ROOT / "docs" / "protocol.md").read_text()
    assert "(`ORCH_LEASE_SECONDS`, 30 s)" in text
    assert [p for p in prose_problems(text.replace("(`ORCH_LEASE_SECONDS`, 30 s)", "(`ORCH_LEASE_SECONDS`, 20 s)"))
            if "ORCH_LEASE_SECONDS" in p]


@pytest.mark.parametrize(("module", "name", "default"), [(server.config, "LEASE_SECONDS", 45.0),
                                                          (agent.config, "BATCH_MODE", "fixed"),
                                                          (agent.config, "POLL_INTERVAL", 0.2)])
def test_a_default_changed_in_the_code_but_not_in_the_readme_fails(monkeypatch, module, name, default):
    changed = tuple(dataclasses.replace(s, default=default) if s.name == name else s for s in module.SETTINGS)
    monkeypatch.setattr(module, "SETTINGS", changed)
    assert table_problems(README) and any(name in p for p in table_problems(README))
    if module is agent.config:
        assert any(name in p for p in prose_problems(README))


def test_a_renamed_setting_left_in_the_documents_fails():
    assert unknown_settings(README.replace("ORCH_QUEUE_TIMEOUT", "ORCH_QUEUE_TIMEOUT_SECONDS")) == [
        "ORCH_QUEUE_TIMEOUT_SECONDS"]
