"""Agent settings: environment, then command line; one clear line for anything wrong."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from agent.config import SETTINGS, AgentConfig, ConfigError, load_config, markdown_table
from devtools.processes import ROOT

CREDS = {"AGENT_ID": "agt_1", "AGENT_SECRET": "s3cret"}


def test_defaults_follow_the_issue():
    config = load_config([], CREDS)
    assert config == AgentConfig(agent_id="agt_1", agent_secret="s3cret")
    assert (config.api_base, config.ollama_url) == ("http://127.0.0.1:8000", "http://127.0.0.1:11434")
    assert (config.poll_interval, config.long_poll, config.max_jobs, config.models) == (0.1, 0.0, 1, ())
    assert (config.batch_max_tokens, config.batch_max_delay, config.batch_mode) == (5, 0.05, "adaptive")
    assert (config.shutdown_timeout, config.legacy, config.transport) == (30.0, False, "auto")


def test_the_readmes_agent_table_is_the_one_the_settings_table_prints():
    # The README shows every default; a hand edit there (or a default changed here) must not drift.
    assert markdown_table() in (ROOT / "README.md").read_text(), "run python -m agent.config into README.md"


def test_every_setting_has_a_variable_a_flag_help_and_the_dataclass_default():
    defaults = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
    assert {s.field for s in SETTINGS} == set(defaults)
    for setting in SETTINGS:
        assert setting.help.endswith(".") and setting.flag.startswith("--")
        if not setting.required:
            assert defaults[setting.field] == setting.default, setting.name
        assert f"`{setting.name}`" in markdown_table()


def test_environment_variables_set_everything():
    config = load_config([], {**CREDS, "API_BASE": "https://orch.example/", "OLLAMA_URL": "http://gpu:11434",
                              "POLL_INTERVAL": "0.5", "LONG_POLL": "20", "MAX_JOBS": "4", "MODELS": "a, b,a",
                              "BATCH_MAX_TOKENS": "8", "BATCH_MAX_DELAY": "0", "BATCH_MODE": "Adaptive",
                              "SHUTDOWN_TIMEOUT": "5", "LEGACY": "yes", "LOG_LEVEL": "debug"})
    assert config.api_base == "https://orch.example" and config.ollama_url == "http://gpu:11434"
    assert (config.poll_interval, config.long_poll, config.max_jobs, config.models) == (0.5, 20.0, 4, ("a", "b"))
    assert (config.batch_max_tokens, config.batch_max_delay, config.adaptive) == (8, 0.0, True)
    assert (config.shutdown_timeout, config.legacy, config.log_level) == (5.0, True, "DEBUG")


def test_the_command_line_overrides_the_environment():
    config = load_config(["--max-jobs", "3", "--legacy", "--agent-secret", "from-flag"],
                         {**CREDS, "MAX_JOBS": "2"})
    assert (config.max_jobs, config.legacy, config.agent_secret) == (3, True, "from-flag")


@pytest.mark.parametrize(("ollama_host", "url"), [
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("0.0.0.0:8080", "http://127.0.0.1:8080"),
    (":11500", "http://127.0.0.1:11500"),
    ("gpu-7", "http://gpu-7:11434"),
    ("https://ollama.example", "https://ollama.example"),
    ("http://[::1]:11434", "http://[::1]:11434"),
])
def test_ollama_url_falls_back_to_ollamas_own_ollama_host(ollama_host, url):
    assert load_config([], {**CREDS, "OLLAMA_HOST": ollama_host}).ollama_url == url


def test_ollama_url_wins_over_ollama_host():
    config = load_config([], {**CREDS, "OLLAMA_HOST": "0.0.0.0:1", "OLLAMA_URL": "http://box:2"})
    assert config.ollama_url == "http://box:2"


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {"AGENT_ID": "a"}, "AGENT_SECRET is not set"),
    ([], {"AGENT_SECRET": "s"}, "AGENT_ID is not set"),
    ([], {**CREDS, "AGENT_SECRET": "  "}, "AGENT_SECRET is not set"),
    ([], {**CREDS, "POLL_INTERVAL": "fast"}, "POLL_INTERVAL='fast' is not a number"),
    ([], {**CREDS, "POLL_INTERVAL": "0"}, "POLL_INTERVAL='0' must be above 0"),
    ([], {**CREDS, "LONG_POLL": "-1"}, "LONG_POLL='-1' must be at least 0"),
    (["--max-jobs", "0"], CREDS, "--max-jobs='0' must be at least 1"),
    ([], {**CREDS, "MAX_JOBS": "2.5"}, "MAX_JOBS='2.5' is not a whole number"),
    ([], {**CREDS, "BATCH_MODE": "turbo"}, "BATCH_MODE='turbo' must be 'fixed' or 'adaptive'"),
    ([], {**CREDS, "API_BASE": "localhost:8000"}, "API_BASE='localhost:8000' is not an http:// or https:// URL"),
    ([], {**CREDS, "OLLAMA_HOST": "box:port"}, "OLLAMA_HOST='box:port' has an invalid port"),
    ([], {**CREDS, "LEGACY": "maybe"}, "LEGACY='maybe' is not a boolean"),
    ([], {**CREDS, "TRANSPORT": "grpc"}, "TRANSPORT='grpc' must be 'auto', 'ws' or 'http'"),
    (["--frobnicate"], CREDS, "unrecognized arguments: --frobnicate"),
])
def test_a_bad_setting_is_one_line_naming_it(argv, env, message):
    with pytest.raises(ConfigError) as info:
        load_config(argv, env)
    assert message in str(info.value) and "\n" not in str(info.value)


def run_agent(*command: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {s.name for s in SETTINGS} | {"OLLAMA_HOST"}}
    return subprocess.run([sys.executable, *command], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("command", [("agent/agent.py",), ("-m", "agent")])
def test_a_missing_secret_stops_the_agent_with_one_line_and_no_traceback(command):
    result = run_agent(*command, AGENT_ID="agt_1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "orchestrator-agent: AGENT_SECRET is not set (environment variable AGENT_SECRET or --agent-secret)"]
    assert "Traceback" not in result.stderr + result.stdout


def test_an_unreachable_ollama_stops_the_agent_with_one_line(tmp_path):
    result = run_agent("agent/agent.py", **CREDS, OLLAMA_URL="http://127.0.0.1:9")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "orchestrator-agent: Ollama at http://127.0.0.1:9 is not reachable")


def test_help_lists_every_setting_with_its_variable():
    result = run_agent("-m", "agent", "--help", COLUMNS="300")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.flag in result.stdout and f"env {setting.name}" in result.stdout
