"""Each Troupe app keeps its state in a folder of its own unless its config names a store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from serve_app.build.actors import session_actor_args
from serve_app.cli.main import main
from serve_app.cli.serve_config import read_serve_config
from serve_app.settings import ConfigError, TroupeSettings, load_settings
from serve_app.store.location import (
    app_state_location,
    config_digest,
    legacy_store_note,
    settings_state_location,
    state_root,
)

ROOT = Path(__file__).resolve().parents[2]
MOCK = {"id": "m", "engine": {"type": "mock"}}


def _settings(*models: dict, **extra) -> TroupeSettings:
    return load_settings({"models": list(models), **extra})


def test_two_default_apps_on_one_machine_do_not_share_state(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TROUPE_STATE_DIR", str(tmp_path))
    bench = read_serve_config(ROOT / "config" / "mock.yaml").state()
    local = read_serve_config(ROOT / "config" / "local.yaml").state()
    assert bench.app == local.app == "troupe"  # same Serve app name, different apps
    assert bench.store_url != local.store_url and bench.directory != local.directory
    for loc in (bench, local):
        assert not loc.configured
        assert loc.directory.startswith(os.path.join(str(tmp_path), "apps", "troupe-"))
        assert loc.store_url == "sqlite:///" + os.path.join(loc.directory, "troupe.db").lstrip("/")
        assert loc.model_state_file == os.path.join(loc.directory, "model_state.json")
        assert loc.directory in loc.describe() and "metrics.store_url" in loc.describe()


def test_the_app_name_and_what_it_serves_name_the_folder(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TROUPE_STATE_DIR", str(tmp_path))
    base = _settings(MOCK)
    tuned = _settings({**MOCK, "default_max_tokens": 17, "description": "tuned"},
                      gateway={"num_replicas": 2})
    other = _settings({**MOCK, "id": "m2"})
    assert settings_state_location(base, "a") == settings_state_location(tuned, "a")
    assert settings_state_location(base, "a") != settings_state_location(other, "a")
    assert settings_state_location(base, "a") != settings_state_location(base, "b")
    odd = settings_state_location(base, "my app/1")
    assert os.path.basename(odd.directory).startswith("my_app_1-")
    # outside a Serve replica the app is "default"
    assert settings_state_location(base).app == "default"


def test_sharing_is_what_a_config_asks_for(tmp_path) -> None:
    url = "sqlite:///" + str(tmp_path / "shared" / "ledger.db").lstrip("/")
    one = settings_state_location(_settings(MOCK, metrics={"store_url": url}), "one")
    two = settings_state_location(_settings({**MOCK, "id": "x"}, metrics={"store_url": url}), "two")
    assert one.store_url == two.store_url == url and one.configured and two.configured
    assert one.directory == str(tmp_path / "shared")  # model_state.json beside the ledger
    assert "share it" in one.describe()
    pg = app_state_location("postgresql://db/troupe", "abcd1234", "p")
    assert pg.store_url == "postgresql://db/troupe" and pg.directory.endswith("p-abcd1234")


def test_the_gateway_finds_the_digest_the_builder_computed() -> None:
    """The Gateway gets its settings as ``model_dump(exclude_unset=True)`` and the model
    replicas get the builder's digest: both must name the same folder."""
    for name in ("local.yaml", "mock.yaml", "remote.yaml", "gpu.yaml"):
        for settings in read_serve_config(ROOT / "config" / name).apps.values():
            sent = settings.model_dump(mode="json", exclude_unset=True)
            assert config_digest(TroupeSettings.model_validate(sent).models) == \
                config_digest(settings.models), name


def test_session_actor_args_leave_the_default_store_to_the_replica() -> None:
    remote = {"id": "r", "run_in": "gateway", "engine": {
        "type": "openai", "model": "gpt-4o-mini", "api_key_env": "X_KEY"}}
    args = session_actor_args(_settings(remote))
    assert args["store_url"] is None and args["config_digest"] == config_digest(
        _settings(remote).models)
    assert session_actor_args(_settings(remote, metrics={"store_url": "sqlite:///s.db"}))[
        "store_url"] == "sqlite:///s.db"
    assert session_actor_args(_settings(remote, session={"store_url": "sqlite:///c.db"}))[
        "store_url"] == "sqlite:///c.db"


def test_keys_cli_uses_the_apps_own_store(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("TROUPE_STATE_DIR", str(tmp_path))
    config = ROOT / "config" / "mock.yaml"
    assert main(["keys", "--config", str(config), "--json", "create", "--name", "ci"]) == 0
    created = json.loads(capsys.readouterr().out)
    expected = read_serve_config(config).state()
    assert os.path.exists(os.path.join(expected.directory, "troupe.db"))
    assert main(["keys", "--config", str(config), "--json", "list"]) == 0
    assert [k["id"] for k in json.loads(capsys.readouterr().out)] == [created["id"]]
    # another app's store does not see the key
    assert main(["keys", "--config", str(ROOT / "config" / "local.yaml"), "--json", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_keys_cli_without_a_config_or_store_says_what_to_pass(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no config/local.yaml here
    assert main(["keys", "list"]) == 2
    assert "--store URL, or --config" in capsys.readouterr().err


def test_state_root_defaults_to_the_users_share_folder(monkeypatch) -> None:
    monkeypatch.delenv("TROUPE_STATE_DIR", raising=False)
    assert state_root() == os.path.expanduser("~/.local/share/troupe")
    with pytest.raises(ConfigError, match="cannot read"):
        read_serve_config(ROOT / "nope.yaml")


def test_an_app_finding_the_old_shared_store_says_how_to_keep_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TROUPE_STATE_DIR", str(tmp_path))
    location = settings_state_location(_settings(MOCK), "troupe")
    assert legacy_store_note(location) is None
    (tmp_path / "troupe.db").write_bytes(b"")
    note = legacy_store_note(location)
    assert note is not None and f"sqlite:///{str(tmp_path / 'troupe.db').lstrip('/')}" in note
    configured = settings_state_location(_settings(MOCK, metrics={"store_url": "x.db"}), "t")
    assert legacy_store_note(configured) is None


def test_one_model_state_actor_keeps_each_apps_own_file(tmp_path) -> None:
    from actors.model_state import ModelStateActor

    first, second = str(tmp_path / "a" / "model_state.json"), str(tmp_path / "b" / "model_state.json")
    actor = ModelStateActor(first)  # created by the first app of the cluster
    actor.set("m", False)
    actor.set("x", False, second)  # the second app names its own file
    assert actor.get_all() == {"m": False} and actor.get_all(second) == {"x": False}
    assert json.loads(open(first).read()) == {"m": False}
    assert json.loads(open(second).read()) == {"x": False}
    assert ModelStateActor(first).get_all(second) == {"x": False}  # read back after a restart
