"""``troupe keys create|list|revoke`` against a real SQLite store file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from serve_app.cli.main import main
from serve_app.policies.keys import KeyCache, hash_key
from serve_app.store.sqlite import SQLiteStore


def test_create_list_revoke(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    assert main(["keys", "--store", url, "--json", "create", "--name", "ci",
                 "--models", "m1,m2", "--rpm", "60"]) == 0
    created = json.loads(capsys.readouterr().out)
    token = created["key"]
    assert created["role"] == "models" and created["models"] == ["m1", "m2"]
    assert created["limits"] == {"requests_per_minute": 60}

    async def stored():
        store = SQLiteStore(tmp_path / "state.db")
        await store.open()
        cache = KeyCache(store, 1.0)
        await cache.refresh()
        rows = await store.key_list()
        await store.close()
        return cache, rows

    cache, rows = asyncio.run(stored())
    assert rows[0].secret_hash == hash_key(token)  # stored hashed ...
    assert token not in repr(rows)                  # ... never in plain text
    assert cache.authenticate(token).models == frozenset({"m1", "m2"})

    assert main(["keys", "--store", url, "list"]) == 0
    listed = capsys.readouterr().out
    assert created["id"] in listed and "active" in listed and token not in listed
    assert main(["keys", "--store", url, "revoke", created["id"]]) == 0
    assert main(["keys", "--store", url, "revoke", created["id"]]) == 1
    assert main(["keys", "--store", url, "list"]) == 0
    assert "revoked" in capsys.readouterr().out


def test_model_role_needs_models(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    assert main(["keys", "--store", url, "create", "--name", "x", "--role", "models"]) == 2
    assert "models" in capsys.readouterr().err


def test_webhooks_verify(tmp_path: Path, monkeypatch, capsys) -> None:
    from serve_app.gateway.webhooks import sign_payload

    monkeypatch.setenv("TROUPE_WEBHOOK_SECRET", "s3cret-0123456789")
    body = tmp_path / "body.json"
    body.write_bytes(b'{"type": "batch.completed"}')
    header = sign_payload("s3cret-0123456789", body.read_bytes())
    assert main(["webhooks", "verify", "--signature", header, "--body-file", str(body)]) == 0
    body.write_bytes(b'{"type": "batch.completed", "x": 1}')
    assert main(["webhooks", "verify", "--signature", header, "--body-file", str(body)]) == 1
    assert "INVALID" in capsys.readouterr().out
