"""deploy/'s systemd units and environment files name commands and settings that exist, and stop gracefully."""
from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.client import DEFAULT_CONNECT_TIMEOUT, LEAVE_TIMEOUT
from agent.config import DEFAULTS as AGENT_DEFAULTS
from agent.config import SETTINGS as AGENT_SETTINGS
from agent.worker import SHUTDOWN_FINISH_GRACE
from server import cli, gunicorn_conf
from server.config import ENV_PREFIX
from server.config import SETTINGS as SERVER_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL_DIR = "/opt/ollama-orchestrator"
SERVER_UNIT, AGENT_UNIT = DEPLOY / "orchestrator.service", DEPLOY / "orchestrator-agent.service"
# Each unit, the environment file it reads, the example in deploy/ for it, and the settings that file may name.
UNITS = {
    SERVER_UNIT: (DEPLOY / "orchestrator.env.example", {ENV_PREFIX + s.name for s in SERVER_SETTINGS}),
    AGENT_UNIT: (DEPLOY / "orchestrator-agent.env.example", {s.name for s in AGENT_SETTINGS}),
}


def unit(path: Path) -> dict[str, dict[str, str]]:
    """A unit file's sections and keys (the last value of a key wins, as systemd reads these)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str
    parser.read_string(path.read_text())
    return {name: dict(parser[name]) for name in parser.sections()}


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value.strip())
    assert match, f"not a time span this test reads: {value!r}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def entry_points() -> dict[str, str]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=", 1) for line in lines)


def env_file_names(path: Path) -> tuple[set[str], set[str]]:
    """Variables an environment file sets, and the ones it shows commented out."""
    set_, commented = set(), set()
    for line in path.read_text().splitlines():
        if match := re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=.*", line.strip()):
            (commented if match[1] else set_).add(match[2])
    return set_, commented


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_each_unit_runs_an_installed_entry_point_with_a_command_that_exists(path):
    argv = shlex.split(unit(path)["Service"]["ExecStart"])
    program = Path(argv[0])
    assert program.parent == Path(INSTALL_DIR, ".venv", "bin")
    assert program.name in entry_points()
    if program.name == "orchestrator":
        subcommands = next(a for a in cli.parser()._actions if a.dest == "command").choices
        assert argv[1] in subcommands and argv[1] == "serve"
    else:
        assert entry_points()[program.name] == "agent.__main__:main" and argv[1:] == []


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_each_environment_file_names_only_settings_of_its_programs_table(path):
    example, known = UNITS[path]
    service = unit(path)["Service"]
    assert Path(service["EnvironmentFile"]).parent == Path("/etc/orchestrator")
    set_, commented = env_file_names(example)
    assert set_ and not (set_ | commented) - known, f"{example.name} names settings that do not exist"


def test_the_agent_environment_file_sets_what_the_agent_requires():
    set_, _ = env_file_names(UNITS[AGENT_UNIT][0])
    assert {"API_BASE", "AGENT_ID", "AGENT_SECRET"} <= set_
    assert {s.name for s in AGENT_SETTINGS if s.required} <= set_


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_each_unit_restarts_on_failure_and_stops_with_sigterm(path):
    service = unit(path)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert unit(path)["Install"]["WantedBy"] == "multi-user.target"


def test_the_agents_stop_timeout_fits_its_warm_stop():
    # The goodbye (connect + answer), the running jobs' SHUTDOWN_TIMEOUT, then the grace to post their end.
    warm_stop = DEFAULT_CONNECT_TIMEOUT + LEAVE_TIMEOUT + AGENT_DEFAULTS["SHUTDOWN_TIMEOUT"] + SHUTDOWN_FINISH_GRACE
    assert seconds(unit(AGENT_UNIT)["Service"]["TimeoutStopSec"]) > warm_stop
    # The agent exits 2 for a bad setting: restarting cannot fix the environment file.
    assert unit(AGENT_UNIT)["Service"]["RestartPreventExitStatus"] == "2"


def test_the_servers_stop_timeout_fits_gunicorns_graceful_timeout():
    assert seconds(unit(SERVER_UNIT)["Service"]["TimeoutStopSec"]) > gunicorn_conf.graceful_timeout
    # gunicorn holds one socket per parked poll and open stream: far more than the default 1,024 descriptors.
    assert int(unit(SERVER_UNIT)["Service"]["LimitNOFILE"]) > gunicorn_conf.worker_connections


def test_the_servers_database_lives_in_its_state_directory():
    service = unit(SERVER_UNIT)["Service"]
    database = next(line.split("=", 1)[1] for line in UNITS[SERVER_UNIT][0].read_text().splitlines()
                    if line.startswith(ENV_PREFIX + "DATABASE="))
    assert Path(database).parent == Path("/var/lib") / service["StateDirectory"]


def test_the_readme_points_to_the_units_in_running_it_for_real():
    section = (ROOT / "README.md").read_text().split("## Running it for real", 1)[1].split("\n## ", 1)[0]
    for path in [*UNITS, *(example for example, _ in UNITS.values())]:
        assert f"deploy/{path.name}" in section, path.name


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(tmp_path):
    # Installed as the comments say, with this checkout standing in for /opt/ollama-orchestrator.
    for path, (example, _) in UNITS.items():
        text = path.read_text().replace(INSTALL_DIR, str(ROOT)).replace("/etc/orchestrator/", f"{tmp_path}/")
        (tmp_path / path.name).write_text(text)
        env_file = Path(unit(tmp_path / path.name)["Service"]["EnvironmentFile"])
        env_file.write_text(example.read_text())
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / p.name) for p in UNITS)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
