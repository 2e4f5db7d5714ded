"""The session actor (plain class, no Ray) and the replica-side credential client."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from actors.session import (
    CredentialClient,
    EnvCredentials,
    SessionActor,
    fingerprint,
    parse_secrets,
)
from serve_app.errors import InvalidRequest

ENV = "TROUPE_TEST_SESSION_OPENAI"


class _Remote:
    """Ray-handle-shaped adapter: ``adapter.method.remote(*args)`` awaits the method."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)
        calls = self.calls

        class _M:
            @staticmethod
            def remote(*args: Any) -> Any:
                calls.append(name)
                return method(*args)

        return _M()


def write(path: Path, text: str) -> None:
    """Replace the file atomically (as a mounted secret update does)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.yaml"
    write(path, "anthropic: ak-file-1\n")
    return path


async def test_sources_merge_newest_wins_and_admin_persists_across_restart(
    tmp_path: Path, secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "sk-env-1")
    store = "sqlite:///" + str(tmp_path / "state.db").lstrip("/")
    envs = {"openai": ENV, "anthropic": "TROUPE_TEST_UNSET_VAR"}
    actor = SessionActor(envs, str(secrets), store, poll_interval_s=0.05)
    snap = await actor.snapshot()
    assert snap.get("openai").secret == "sk-env-1" and snap.get("openai").source == "env"
    assert snap.get("anthropic").secret == "ak-file-1"
    result = await actor.set_credential("openai", "sk-admin-2")
    assert result["fingerprint"] == fingerprint("sk-admin-2")
    assert "sk-admin-2" not in repr(result)
    assert (await actor.snapshot()).get("openai").secret == "sk-admin-2"
    await actor.close()
    # Restart: env still holds the old key, but the persisted admin key is newer.
    again = SessionActor(envs, str(secrets), store, poll_interval_s=0.05)
    snap = await again.snapshot()
    assert snap.get("openai").secret == "sk-admin-2" and snap.get("openai").source == "admin"
    assert snap.epoch != (await actor.snapshot()).epoch
    await again.close()


async def test_secrets_file_change_publishes_a_new_version(secrets: Path) -> None:
    actor = SessionActor({}, str(secrets), None, poll_interval_s=0.05)
    first = await actor.snapshot()
    waiter = asyncio.create_task(actor.wait_for_version(first.epoch, first.version, 5))
    await asyncio.sleep(0.1)
    assert not waiter.done()  # a long poll: nothing changed yet
    write(secrets, "anthropic: {api_key: ak-file-2}\nopenai: sk-file-1\n")
    snap = await asyncio.wait_for(waiter, 2)
    assert snap.version == first.version + 1
    assert snap.get("anthropic").secret == "ak-file-2" and snap.get("openai").secret == "sk-file-1"
    assert first.get("anthropic").secret == "ak-file-1"  # snapshots are immutable
    # A broken or missing file keeps the last good keys.
    write(secrets, "- not a mapping\n")
    await asyncio.sleep(0.2)
    secrets.unlink()
    await asyncio.sleep(0.2)
    assert (await actor.snapshot()).get("anthropic").secret == "ak-file-2"
    await actor.close()


async def test_wait_for_version_times_out_with_the_current_snapshot() -> None:
    actor = SessionActor({}, None, None)
    snap = await actor.snapshot()
    again = await actor.wait_for_version(snap.epoch, snap.version, 0.05)
    assert again is snap
    # Another epoch (the actor restarted) answers at once.
    assert await asyncio.wait_for(actor.wait_for_version("old", 99, 5), 0.5) is snap


@pytest.mark.parametrize("name, key, param", [
    ("", "sk-1", "provider"), ("bad name", "sk-1", "provider"), ("openai", "", "api_key"),
    ("openai", "sk with space", "api_key"), ("openai", 7, "api_key"),
])
async def test_set_credential_validates(name: Any, key: Any, param: str) -> None:
    actor = SessionActor({}, None, None)
    with pytest.raises(InvalidRequest) as info:
        await actor.set_credential(name, key)
    assert info.value.param == param
    if isinstance(key, str) and key:
        assert key not in info.value.message


def test_parse_secrets_shapes_and_errors_never_echo_the_key() -> None:
    assert parse_secrets('{"openai": "sk-1", "gemini": {"api_key": "g-2"}}') == {
        "openai": "sk-1", "gemini": "g-2"}
    assert parse_secrets("") == {}
    for bad in ("[1, 2]", "openai: {key: sk-secret-x}", "openai: 'sk secret'"):
        with pytest.raises(ValueError) as info:
            parse_secrets(bad)
        assert "sk-secret-x" not in str(info.value) and "sk secret" not in str(info.value)


async def test_client_follows_versions_without_per_request_calls(secrets: Path) -> None:
    actor = SessionActor({}, str(secrets), None, poll_interval_s=0.05)
    remote = _Remote(actor)
    client = CredentialClient(remote, long_poll_s=5)
    await client.start()
    v1 = client.current()
    for _ in range(100):
        assert client.current() is v1  # reads are local
    calls = len(remote.calls)
    write(secrets, "anthropic: ak-file-9\n")
    for _ in range(100):
        await asyncio.sleep(0.02)
        if client.current().version > v1.version:
            break
    assert client.current().get("anthropic").secret == "ak-file-9"
    assert len(remote.calls) <= calls + 2  # one long poll returned, the next one waits
    await client.close()
    await actor.close()


async def test_refresh_after_auth_failure_rechecks_the_file_at_once(secrets: Path) -> None:
    actor = SessionActor({}, str(secrets), None, poll_interval_s=3600)  # poller never fires
    client = CredentialClient(_Remote(actor), long_poll_s=5)
    await client.start()
    seen = client.current()
    write(secrets, "anthropic: ak-file-3\n")
    fresh = await client.refresh_after_auth_failure(seen)
    assert fresh.get("anthropic").secret == "ak-file-3" and client.auth_refreshes == 1
    await client.close()
    await actor.close()


async def test_client_survives_an_actor_restart(secrets: Path) -> None:
    first = SessionActor({}, str(secrets), None)
    holder = _Remote(first)
    client = CredentialClient(holder, long_poll_s=0.1)
    await client.start()
    old_epoch = client.current().epoch
    second = SessionActor({}, str(secrets), None)
    await second.set_credential("anthropic", "ak-admin-7")
    holder._target = second  # the named actor came back (new epoch)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if client.current().epoch != old_epoch:
            break
    assert client.current().get("anthropic").secret == "ak-admin-7"
    await client.close()


async def test_keys_never_reach_logs(
    secrets: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(ENV, "sk-env-LOGCHECK-1")
    actor = SessionActor({"openai": ENV}, str(secrets), None, poll_interval_s=0.05)
    await actor.set_credential("openai", "sk-admin-LOGCHECK-2")
    write(secrets, "anthropic: ak-file-LOGCHECK-3\nbroken: [\n")
    await asyncio.sleep(0.2)
    text = caplog.text + repr(await actor.snapshot()) + repr(await actor.status())
    assert "LOGCHECK" not in text
    assert fingerprint("sk-admin-LOGCHECK-2") in caplog.text
    await actor.close()


def test_env_credentials_version_changes_with_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    source = EnvCredentials()
    source.register("openai", ENV)
    monkeypatch.setenv(ENV, "sk-a")
    a = source.current()
    assert source.current() is a
    monkeypatch.setenv(ENV, "sk-b")
    assert source.current().version == a.version + 1


async def test_restart_keeps_an_admin_key_set_after_the_file_changed(
    tmp_path: Path, secrets: Path
) -> None:
    store = "sqlite:///" + str(tmp_path / "state.db").lstrip("/")
    first = SessionActor({}, str(secrets), store)
    await asyncio.sleep(0.05)
    await first.set_credential("anthropic", "ak-admin-newer")
    await first.close()
    again = SessionActor({}, str(secrets), store)
    assert (await again.snapshot()).get("anthropic").secret == "ak-admin-newer"
    write(secrets, "anthropic: ak-file-newest\n")  # a later file change wins again
    assert (await again.refresh()).get("anthropic").secret == "ak-file-newest"
    await again.close()
