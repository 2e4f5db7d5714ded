"""``open_store(url)`` picks the backend and its location without touching disk or network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_app.store import Store, open_store
from serve_app.store.postgres import PostgresStore
from serve_app.store.sqlite import SQLiteStore


def test_sqlite_url_with_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "state" / "troupe.db"
    store = open_store(f"sqlite://{target}")  # sqlite:///tmp/.../troupe.db
    assert isinstance(store, SQLiteStore)
    assert store.path == str(target)
    assert not target.parent.exists()  # built, not opened


def test_sqlite_url_with_four_slashes_is_the_same_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "troupe.db"
    store = open_store(f"sqlite:///{target}")  # sqlite:////tmp/.../troupe.db
    assert isinstance(store, SQLiteStore)
    assert store.path == str(target)


def test_sqlite_url_without_leading_slash_is_still_absolute() -> None:
    store = open_store("sqlite:///var/lib/troupe/troupe.db")
    assert isinstance(store, SQLiteStore)
    assert store.path == "/var/lib/troupe/troupe.db"


def test_store_url_round_trips_through_open_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "troupe.db"))
    again = open_store(store.url)
    assert isinstance(again, SQLiteStore)
    assert again.path == store.path


def test_bare_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("data/troupe.db")
    assert isinstance(store, SQLiteStore)
    assert store.path == os.path.join(str(tmp_path), "data", "troupe.db")
    assert not (tmp_path / "data").exists()


def test_bare_absolute_path(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "x.db"))
    assert isinstance(store, SQLiteStore)
    assert store.path == str(tmp_path / "x.db")


@pytest.mark.parametrize("url", [
    "postgresql://troupe@db.internal:5432/troupe",
    "postgres://troupe:s3cret@10.0.0.5:6543/ledger",
])
def test_postgres_urls_build_a_postgres_store_without_connecting(url: str) -> None:
    # Nothing listens on these hosts: building must not connect.
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    assert store.url == url
    assert "s3cret" not in repr(store)


@pytest.mark.parametrize("url", ["sqlite:///tmp/x.db", "postgresql://u@h/d"])
def test_every_backend_satisfies_the_store_protocol(url: str) -> None:
    assert isinstance(open_store(url), Store)


async def test_calls_before_open_fail_clearly(tmp_path: Path) -> None:
    for store in (SQLiteStore(tmp_path / "x.db"), PostgresStore("postgresql://u@h/d")):
        with pytest.raises(RuntimeError, match="not open"):
            await store.ledger_count()


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite://relative.db", "postgresq://typo/db"])
def test_unknown_schemes_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store(url)
