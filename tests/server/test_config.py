"""Settings: one table, layered defaults < ORCH_* environment < create_app's mapping."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from server import create_app
from server.config import DEFAULTS, ENV_PREFIX, SETTINGS, ConfigError, load_config, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_apply_without_environment():
    assert load_config(environ={}) == DEFAULTS


def test_environment_overrides_defaults_and_is_parsed():
    config = load_config(environ={"ORCH_LEASE_SECONDS": "12.5", "ORCH_MAX_ATTEMPTS": "7",
                                  "ORCH_MIGRATE_ON_START": "off", "ORCH_API_KEYS": "a, b,,"})
    assert config["LEASE_SECONDS"] == 12.5
    assert config["MAX_ATTEMPTS"] == 7
    assert config["MIGRATE_ON_START"] is False
    assert config["API_KEYS"] == ("a", "b")


def test_mapping_overrides_environment():
    config = load_config({"LEASE_SECONDS": 3.0}, environ={"ORCH_LEASE_SECONDS": "12"})
    assert config["LEASE_SECONDS"] == 3.0


def test_create_app_layers_environment_then_mapping(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_KEEPALIVE_SECONDS", "4")
    monkeypatch.setenv("ORCH_QUEUE_TIMEOUT", "9")
    app = create_app({"DATABASE": str(tmp_path / "x.db"), "SWEEP_INTERVAL": 0, "QUEUE_TIMEOUT": 5.0})
    assert app.config["KEEPALIVE_SECONDS"] == 4.0
    assert app.config["QUEUE_TIMEOUT"] == 5.0
    assert app.config["MAX_CONTENT_LENGTH"] == DEFAULTS["MAX_BODY_BYTES"]


@pytest.mark.parametrize("name, value", [("ORCH_LEASE_SECONDS", "soon"), ("ORCH_NOTIFIER", "carrier-pigeon"),
                                         ("ORCH_MIGRATE_ON_START", "maybe")])
def test_bad_environment_value_names_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_config(environ={name: value})


def test_every_setting_has_help():
    for setting in SETTINGS:
        assert setting.help.strip(), setting.name


def test_readme_documents_every_setting():
    documented = set(re.findall(r"`(ORCH_[A-Z_]+)`", README.read_text()))
    missing = [ENV_PREFIX + s.name for s in SETTINGS if ENV_PREFIX + s.name not in documented]
    assert not missing, f"README.md's configuration table lacks {missing}: run python -m server.config"


def test_readme_server_table_is_the_generated_one():
    # Both directions: a default or help line that drifts in the code or in the README fails here.
    assert markdown_table() in README.read_text(), "README.md's server table is stale: paste python -m server.config"


def test_readme_documents_every_agent_setting():
    from agent.config import SETTINGS as AGENT_SETTINGS

    text = README.read_text()
    missing = [s.name for s in AGENT_SETTINGS if f"| `{s.name}` |" not in text]
    assert not missing, f"README.md's agent table lacks {missing}: run python -m agent.config"
