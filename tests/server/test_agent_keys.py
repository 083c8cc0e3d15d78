"""What the server keeps of agents' secrets (issue 14, item 7): signing keys, wrapped with ORCH_SECRET_KEY when set."""
from __future__ import annotations

import time

import pytest

from protocol.signing import derive_key
from server import create_app
from server.storage import agents, get_storage, migrations, open_storage
from tests.signed import agent_get

pytestmark = pytest.mark.engines("sqlite", "postgres")


def test_secrets_stored_before_0003_become_keys_at_start_and_still_sign(database_url):
    store = open_storage(database_url)
    try:
        migrations.migrate(store)
        with store.connection() as conn:
            conn.execute("INSERT INTO agents (id, name, secret, created_at) VALUES ('agt_old', 'old', 'old-secret', ?)",
                         (time.time(),))
    finally:
        store.close()
    app = create_app({"DATABASE": database_url, "SWEEP_INTERVAL": 0, "SECRET_KEY": "s" * 40})
    try:
        with get_storage(app).connection() as conn:
            secret, verifier = conn.execute("SELECT secret, verifier FROM agents WHERE id = 'agt_old'").fetchone()
            assert secret == "" and verifier.startswith("wrapped:")
            assert agents.signing_key(conn, "agt_old", "s" * 40).key == derive_key("old-secret")
        creds = agents.AgentCredentials("agt_old", "old-secret")
        assert agent_get(app.test_client(), creds, "/api/v1/inference/poll?slots=0").status_code == 204
    finally:
        get_storage(app).close()
