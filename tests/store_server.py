"""A private, throwaway PostgreSQL server for tests (never a shared or system one).

``private_postgres()`` runs ``initdb`` into a fresh temporary directory and starts the
server with ``pg_ctl`` on a random loopback port (unix socket in the same directory, trust
auth, ``fsync=off``: the data is thrown away; an ICU ``en`` default collation, like the
``en_US.UTF-8`` of most real servers), yields a :class:`PostgresServer` with its
DSN, then stops it (``pg_ctl stop -m fast``) and removes the directory. PostgreSQL refuses
to run as root, so under root the directory is handed to the ``postgres`` system user
(created by Debian's ``postgresql-common``) and the binaries run through ``runuser``.

Binaries are looked up in ``$TROUPE_PG_BIN``, then ``/usr/lib/postgresql/<newest>/bin``
(Debian's ``postgresql-15``), then ``PATH``. When none are found, tests skip, or fail
when ``$CI`` is set (the Makefile installs the packages there).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "PostgresServer",
    "PostgresUnavailable",
    "find_postgres_bin",
    "postgres_server_fixture",
    "private_postgres",
    "require_postgres",
]

MISSING_HINT = "install them with: apt-get install -y postgresql-15 (Debian 12)"
START_TIMEOUT_S = 30


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL here (binaries or the ``postgres`` user are missing)."""


@dataclass(frozen=True)
class PostgresServer:
    """A running private server."""

    dsn: str             # postgresql://postgres@127.0.0.1:PORT/postgres
    port: int
    data_dir: Path
    bin_dir: Path
    startup_s: float     # initdb + start, wall clock

    def dsn_for(self, database: str) -> str:
        """The DSN of another database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``; raises :class:`PostgresUnavailable`."""
    candidates: list[Path] = []
    if os.environ.get("TROUPE_PG_BIN"):
        candidates.append(Path(os.environ["TROUPE_PG_BIN"]))
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(d) for d in debian), key=_major_version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $TROUPE_PG_BIN, "
        f"/usr/lib/postgresql/*/bin or PATH; {MISSING_HINT}"
    )


def require_postgres() -> Path:
    """:func:`find_postgres_bin`, turned into a skip (or a failure under ``$CI``)."""
    try:
        bin_dir = find_postgres_bin()
        _run_as_user()  # under root, the postgres user must exist too
    except PostgresUnavailable as exc:
        problem = str(exc)
    else:
        return bin_dir
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must run the PostgreSQL store tests: {problem}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {problem}")


@contextlib.contextmanager
def private_postgres(bin_dir: Path | None = None) -> Iterator[PostgresServer]:
    """Start a private server in a temporary directory; stop it and delete it on exit."""
    bin_dir = bin_dir or find_postgres_bin()
    prefix = _run_as_user()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="troupe-pg-"))
    data_dir = root / "data"
    running = False
    try:
        if prefix:
            entry = pwd.getpwnam("postgres")
            os.chown(root, entry.pw_uid, entry.pw_gid)
        _check_run(prefix, root, [
            str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync", *_collation_args(bin_dir),
        ])
        with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                "\n# troupe tests: private, throwaway server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{root}'\n"
                "fsync = off\nfull_page_writes = off\nsynchronous_commit = off\n"
                "max_connections = 100\nshared_buffers = 16MB\n"
            )
        port = _start(prefix, root, bin_dir, data_dir)
        running = True
        yield PostgresServer(
            dsn=f"postgresql://postgres@127.0.0.1:{port}/postgres", port=port,
            data_dir=data_dir, bin_dir=bin_dir, startup_s=time.monotonic() - started,
        )
    finally:
        try:
            if running:
                _stop(prefix, root, bin_dir, data_dir)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def postgres_server_fixture(scope: str = "module", name: str | None = None) -> Callable[..., Any]:
    """A pytest fixture yielding a :class:`PostgresServer`, one per ``scope``.

    Skips (or fails under ``$CI``) when PostgreSQL is missing. Use at module level::

        postgres_server = postgres_server_fixture()
    """

    @pytest.fixture(scope=scope, name=name)  # type: ignore[call-overload]
    def _postgres_server() -> Iterator[PostgresServer]:
        bin_dir = require_postgres()
        with private_postgres(bin_dir) as server:
            yield server

    return _postgres_server


def _major_version(bin_dir: Path) -> float:
    try:
        return float(bin_dir.parent.name)
    except ValueError:
        return 0.0


def _collation_args(bin_dir: Path) -> list[str]:
    """A linguistic default collation ('a' < 'B'), as on most real servers (en_US.UTF-8).

    Tests then prove that the store orders text bytewise whatever the server's locale.
    ICU needs no system locale installed; PostgreSQL < 15 has no ICU default, so C.
    """
    return ["--locale-provider=icu", "--icu-locale=en"] if _major_version(bin_dir) >= 15 else []


def _run_as_user() -> list[str]:
    """The command prefix that drops root to ``postgres`` (empty when not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no 'postgres' user; {MISSING_HINT}"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and 'runuser' (util-linux) is missing")
    return [runuser, "-u", "postgres", "--"]


def _check_run(prefix: list[str], cwd: Path, argv: list[str], timeout: float = 60) -> str:
    proc = subprocess.run(
        prefix + argv, check=False, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
        env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}):\n{proc.stdout}")
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(prefix: list[str], root: Path, bin_dir: Path, data_dir: Path) -> int:
    """``pg_ctl start -w`` on a free port; retries when another process took the port."""
    log = root / "server.log"
    last_error: Exception | None = None
    for _ in range(3):
        port = _free_port()
        try:
            _check_run(prefix, root, [
                str(bin_dir / "pg_ctl"), "start", "-D", str(data_dir), "-l", str(log),
                "-w", "-t", str(START_TIMEOUT_S), "-o", f"-p {port}",
            ], timeout=START_TIMEOUT_S + 10)
            return port
        except RuntimeError as exc:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            last_error = RuntimeError(f"{exc}\nserver log:\n{tail}")
            if "could not bind" not in tail and "already in use" not in tail:
                break
    assert last_error is not None
    raise last_error


def _stop(prefix: list[str], root: Path, bin_dir: Path, data_dir: Path) -> None:
    """``pg_ctl stop -m fast``; if that fails, kill the postmaster we started, by its PID."""
    try:
        _check_run(prefix, root, [
            str(bin_dir / "pg_ctl"), "stop", "-D", str(data_dir), "-m", "fast", "-w", "-t", "20",
        ], timeout=30)
    except (RuntimeError, subprocess.TimeoutExpired):
        pid_file = data_dir / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, signal.SIGKILL)
        raise
