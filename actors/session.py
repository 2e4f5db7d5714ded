"""The session actor: owns provider credentials and publishes immutable, versioned snapshots.

Sources, per credential name (``openai``, ``anthropic``, ... or a model's ``credential``):

* environment variables (the models' ``api_key_env``), read at start: the oldest source;
* a secrets file (YAML/JSON ``name: key`` or ``name: {api_key: key}``), polled by ``stat``
  every ``poll_interval_s``: a mounted secret that changes on disk is picked up without a
  restart (atomic symlink swaps included, since ``stat`` follows links);
* ``POST /admin/credentials`` (:meth:`SessionActor.set_credential`), persisted through the
  store before it is published, so a restart never falls back to an older key.

The newest value wins per name (env at time 0, the file at its modification time, an
admin write at its own time). Every change publishes a new :class:`CredentialSnapshot`
(``epoch`` names the actor's incarnation, ``version`` counts within it).

Replicas never call the actor per request: a :class:`CredentialClient` holds the current
snapshot and runs one long-poll loop (``wait_for_version``) that returns as soon as a
newer snapshot exists. A request captures the snapshot at its start and keeps it for its
whole life, retries included; after an upstream 401 it may ask :meth:`CredentialClient.
refresh_after_auth_failure` once for a newer key.

Secrets never print: :class:`Credential` hides ``secret`` from ``repr``; only fingerprints
(``sha256:`` + 12 hex digits) appear in logs, responses and metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = [
    "Credential",
    "CredentialSnapshot",
    "SessionActor",
    "CredentialClient",
    "EnvCredentials",
    "fingerprint",
    "parse_secrets",
    "install_credential_source",
    "credential_source",
]

logger = logging.getLogger("troupe.session")

#: Longest accepted key; longer input is refused (nobody's API key is 4 KiB).
MAX_SECRET_LEN = 4096


def fingerprint(secret: str) -> str:
    """A short, non-reversible identifier of a secret (safe to log and return)."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Credential:
    """One provider key. ``secret`` is excluded from ``repr``/``str``."""

    name: str
    secret: str = field(repr=False)
    source: str  # env | file | admin
    updated_at: float
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint(self.secret))

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "source": self.source,
                "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class CredentialSnapshot:
    """An immutable set of credentials at one version."""

    epoch: str
    version: int
    credentials: Mapping[str, Credential]
    #: Where each name would be read from the environment (for error messages only).
    envs: Mapping[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Optional[Credential]:
        return self.credentials.get(name)

    def public(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "version": self.version,
            "credentials": {n: c.public() for n, c in sorted(self.credentials.items())},
        }


def _validate_secret(name: Any, secret: Any) -> tuple[str, str]:
    from serve_app.errors import InvalidRequest

    if not isinstance(name, str) or not name or len(name) > 128 or not all(
        c.isalnum() or c in "-_." for c in name
    ):
        raise InvalidRequest(
            "Credential 'provider' must be a name of letters, digits, '-', '_' or '.', e.g. "
            '{"provider": "openai", "api_key": "sk-..."}.',
            param="provider",
        )
    if not isinstance(secret, str) or not secret.strip():
        raise InvalidRequest(
            "Credential 'api_key' must be a non-empty string, e.g. "
            '{"provider": "openai", "api_key": "sk-..."}.',
            param="api_key",
        )
    secret = secret.strip()
    if len(secret) > MAX_SECRET_LEN or any(c.isspace() or ord(c) < 32 for c in secret):
        raise InvalidRequest(
            f"Credential 'api_key' must be at most {MAX_SECRET_LEN} characters without "
            "spaces or control characters.",
            param="api_key",
        )
    return name, secret


def parse_secrets(text: str) -> dict[str, str]:
    """Parse a secrets file: a mapping of name -> key or name -> {api_key: key}.

    Raises ValueError (never echoing a secret) when the shape is wrong.
    """
    import yaml

    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError:
        raise ValueError("secrets file is not valid YAML/JSON") from None
    if not isinstance(data, dict):
        raise ValueError("secrets file must hold a mapping of name -> api key")
    out: dict[str, str] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            value = value.get("api_key")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"secrets file entry {name!r} has no api key string")
        try:
            _, secret = _validate_secret(str(name), value)
        except Exception:
            raise ValueError(f"secrets file entry {name!r} is not a valid name/key") from None
        out[str(name)] = secret
    return out


class SessionActor:
    """Plain async class; the app builder makes it a named, detached, restartable actor.

    Args:
        envs: credential name -> environment variable.
        secrets_file: path of the watched secrets file (or None).
        store_url: store holding admin-set credentials (None: not persisted; tests).
        poll_interval_s: how often the secrets file is checked.
    """

    def __init__(
        self,
        envs: Mapping[str, str],
        secrets_file: Optional[str] = None,
        store_url: Optional[str] = None,
        poll_interval_s: float = 0.25,
    ) -> None:
        self._envs = dict(envs)
        self._secrets_file = secrets_file
        self._store_url = store_url
        self._poll_s = poll_interval_s
        self._epoch = uuid.uuid4().hex[:12]
        self._version = 0
        self._env: dict[str, Credential] = {}
        self._file: dict[str, Credential] = {}
        self._admin: dict[str, Credential] = {}
        self._file_stat: Optional[tuple[int, int, int]] = None
        self._file_error: Optional[str] = None
        self._snapshot = CredentialSnapshot(self._epoch, 0, {}, self._envs)
        self._changed = asyncio.Event()
        self._store: Any = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._watcher: Optional[asyncio.Task] = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            for name, env in self._envs.items():
                value = os.environ.get(env, "").strip()
                if value:
                    self._env[name] = Credential(name, value, "env", 0.0)
            if self._store_url:
                from serve_app.store import open_store

                self._store = open_store(self._store_url)
                await self._store.open()
                for row in await self._store.credential_list():
                    self._admin[row.name] = Credential(
                        row.name, row.secret, "admin", row.updated_at, row.fingerprint
                    )
            self._check_file()
            self._publish()
            self._started = True
            if self._secrets_file:
                self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._store is not None:
            await self._store.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                if self._check_file():
                    self._publish()
            except Exception:  # the watcher must never die
                logger.exception("secrets file check failed")

    def _check_file(self) -> bool:
        """Re-read the secrets file when its stat changed; True when credentials changed."""
        path = self._secrets_file
        if not path:
            return False
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._file_stat:
            return False
        self._file_stat = stamp
        if stamp is None:
            # A mounted secret briefly disappears during a swap: keep the last good values.
            self._file_error = "missing"
            return False
        try:
            with open(path, encoding="utf-8") as handle:
                parsed = parse_secrets(handle.read())
        except (OSError, ValueError) as exc:
            self._file_error = str(exc)
            logger.warning("secrets file %s ignored: %s", path, exc)
            return False
        self._file_error = None
        when = stamp[0] / 1e9
        fresh = {}
        for name, secret in parsed.items():
            old = self._file.get(name)
            # An unchanged key keeps its old time, so an admin write newer than it still wins.
            # The file's modification time orders it against admin writes, across
            # restarts too (an admin key set after the file changed stays the newest).
            fresh[name] = old if old is not None and old.secret == secret else Credential(
                name, secret, "file", when
            )
        changed = {n: c.fingerprint for n, c in fresh.items()} != {
            n: c.fingerprint for n, c in self._file.items()
        }
        self._file = fresh
        return changed

    def _publish(self) -> None:
        merged: dict[str, Credential] = {}
        for layer in (self._env, self._file, self._admin):
            for name, cred in layer.items():
                current = merged.get(name)
                if current is None or cred.updated_at >= current.updated_at:
                    merged[name] = cred
        old = self._snapshot.credentials
        if self._version and {n: c.fingerprint for n, c in merged.items()} == {
            n: c.fingerprint for n, c in old.items()
        }:
            return
        self._version += 1
        self._snapshot = CredentialSnapshot(self._epoch, self._version, merged, self._envs)
        logger.info(
            "credential snapshot v%d: %s", self._version,
            ", ".join(f"{n}={c.fingerprint}({c.source})" for n, c in sorted(merged.items()))
            or "(none)",
        )
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ API

    async def snapshot(self) -> CredentialSnapshot:
        await self.start()
        return self._snapshot

    async def wait_for_version(
        self, epoch: str, version: int, timeout_s: float
    ) -> CredentialSnapshot:
        """Return a snapshot newer than (epoch, version) as soon as one exists, or the
        current one after ``timeout_s`` (the caller's long-poll loop then asks again)."""
        await self.start()
        deadline = time.monotonic() + timeout_s
        while epoch == self._epoch and self._snapshot.version <= version:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                break
        return self._snapshot

    async def refresh(self) -> CredentialSnapshot:
        """Re-check the secrets file now (after an upstream 401) and return the snapshot."""
        await self.start()
        if self._check_file():
            self._publish()
        return self._snapshot

    async def set_credential(self, name: Any, secret: Any) -> dict[str, Any]:
        """Validate, persist, then publish an admin-set key. Returns only public data."""
        await self.start()
        name, secret = _validate_secret(name, secret)
        cred = Credential(name, secret, "admin", time.time())
        if self._store is not None:
            from serve_app.store import CredentialRow

            await self._store.credential_put(
                CredentialRow(name, secret, cred.fingerprint, cred.updated_at)
            )
        self._admin[name] = cred
        self._publish()
        return {**cred.public(), "version": self._snapshot.version, "epoch": self._epoch}

    async def status(self) -> dict[str, Any]:
        await self.start()
        return {**self._snapshot.public(), "secrets_file": self._secrets_file,
                "secrets_file_error": self._file_error}


# --------------------------------------------------------------------------- replicas


class EnvCredentials:
    """A credential source without an actor: reads the environment per request (tests,
    engines used standalone). Versions change whenever a variable's value changes."""

    def __init__(self) -> None:
        self._envs: dict[str, str] = {}
        self._last: Optional[CredentialSnapshot] = None
        self.auth_refreshes = 0

    def register(self, name: str, env: str) -> None:
        self._envs[name] = env

    async def start(self) -> None:
        return None

    def current(self) -> CredentialSnapshot:
        creds = {}
        for name, env in self._envs.items():
            value = os.environ.get(env, "").strip()
            if value:
                creds[name] = Credential(name, value, "env", 0.0)
        last = self._last
        if last is not None and {n: c.secret for n, c in last.credentials.items()} == {
            n: c.secret for n, c in creds.items()
        }:
            return last
        version = (last.version + 1) if last else 1
        self._last = CredentialSnapshot("env", version, creds, dict(self._envs))
        return self._last

    async def refresh_after_auth_failure(self, seen: CredentialSnapshot) -> CredentialSnapshot:
        self.auth_refreshes += 1
        return self.current()


class CredentialClient:
    """A replica's view of the session actor: the current snapshot plus a long-poll loop.

    ``current()`` is a plain attribute read (no actor call). ``actor`` is anything with
    Ray-handle-shaped ``snapshot``/``wait_for_version``/``refresh`` methods (``.remote``).
    """

    def __init__(self, actor: Any, long_poll_s: float = 20.0) -> None:
        self._actor = actor
        self._long_poll_s = long_poll_s
        self._snapshot: Optional[CredentialSnapshot] = None
        self._task: Optional[asyncio.Task] = None
        self._start_lock: Optional[asyncio.Lock] = None
        self.auth_refreshes = 0
        self.updates = 0

    @property
    def actor(self) -> Any:
        return self._actor

    def register(self, name: str, env: str) -> None:  # the actor knows the env map already
        return None

    async def start(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._snapshot is None:
                self._snapshot = await self._actor.snapshot.remote()
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._poll())

    def current(self) -> CredentialSnapshot:
        if self._snapshot is None:
            raise RuntimeError("CredentialClient.start() was not awaited")
        return self._snapshot

    def _adopt(self, snap: CredentialSnapshot) -> None:
        cur = self._snapshot
        if cur is None or snap.epoch != cur.epoch or snap.version > cur.version:
            self._snapshot = snap
            self.updates += 1

    async def _poll(self) -> None:
        backoff = 0.1
        while True:
            cur = self.current()
            try:
                snap = await self._actor.wait_for_version.remote(
                    cur.epoch, cur.version, self._long_poll_s
                )
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # actor restarting: keep the last snapshot, retry
                logger.warning("session actor unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self._adopt(snap)

    async def refresh_after_auth_failure(self, seen: CredentialSnapshot) -> CredentialSnapshot:
        """After an upstream 401: the newest snapshot (asks the actor to re-check sources)."""
        self.auth_refreshes += 1
        cur = self.current()
        if cur.epoch != seen.epoch or cur.version > seen.version:
            return cur
        try:
            self._adopt(await self._actor.refresh.remote())
        except Exception as exc:
            logger.warning("session actor refresh failed (%s)", type(exc).__name__)
        return self.current()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


# Process-wide source used by remote engines; the builder (serve_app.build.actors) installs
# the actor client.
_SOURCE: Any = None


def install_credential_source(source: Any) -> None:
    global _SOURCE
    _SOURCE = source


def credential_source() -> Any:
    """The process's credential source (the actor client, or the environment)."""
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = EnvCredentials()
    return _SOURCE
