"""Rotation under load: 64 concurrent streams for 30 s while the key rotates 5 times.

Its own small Serve app (two remote models over one fake OpenAI upstream, one credential):
``rot-dep`` runs its engine in a model deployment, ``rot-gw`` inside the gateway replica.
The first test rotates through ``POST /admin/credentials`` (through ``rot-dep``), the second
by rewriting the watched secrets file (through ``rot-gw``). After each rotation the old key
is revoked on the upstream as soon as every request that could have started with it has
finished. Claims: zero failed requests, zero upstream 401s, exactly one upstream request
(so one key) per client request, and requests started 1 s after a rotation use the new key.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional

import aiohttp
import httpx
import pytest

from tests.fake_openai import FakeOpenAI

KEY_ENV = "TROUPE_TEST_ROTATION_KEY"
ADMIN_ENV = "TROUPE_TEST_ROTATION_ADMIN"
ADMIN_KEY = "adm-test-rotation-0123456789"
KEY0 = "sk-rot-INITIAL-000000"
# Set at import, before the session's Ray starts, so replicas inherit them.
os.environ[KEY_ENV] = KEY0
os.environ[ADMIN_ENV] = ADMIN_KEY

CONCURRENCY = 64
DURATION_S = 30.0
ROTATIONS = 5
PROPAGATION_S = 1.0  # the claim: requests started this long after a rotation use the new key


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(token_delay_s=0.04, reply_tokens=6) as fake:
        fake.valid_keys = {KEY0}
        yield fake


@pytest.fixture(scope="module")
def secrets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "providers.yaml"
    path.write_text("{}\n")
    return path


@pytest.fixture(scope="module")
def app_url(serve_instance: int, upstream: FakeOpenAI, secrets_file: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    state = tmp_path_factory.mktemp("rotation-state")
    engine = {"type": "openai", "base_url": upstream.url, "model": "gpt-fake",
              "api_key_env": KEY_ENV, "credential": "rotation-openai"}
    deployment = {"max_ongoing_requests": 128, "ray_actor_options": {"num_cpus": 0.1}}
    args = {
        "models": [
            {"id": "rot-dep", "engine": engine, "deployment": deployment},
            {"id": "rot-gw", "engine": engine, "deployment": deployment, "run_in": "gateway"},
        ],
        "gateway": {"ray_actor_options": {"num_cpus": 0.2}, "admin_key_env": ADMIN_ENV,
                    "max_ongoing_requests": 256},
        "session": {"secrets_file": str(secrets_file), "actor_name": "troupe-session-rotation",
                    "store_url": "sqlite:///" + str(state / "session.db").lstrip("/")},
        # Off: the metrics actor is one named actor per cluster, configured by the first
        # app that creates it, and the session's shared app (tests/mock_app.py) needs its own.
        "metrics": {"enabled": False},
    }
    serve.run(build_app(args), name="rotation", route_prefix="/rotation")
    url = f"http://127.0.0.1:{serve_instance}/rotation"
    r = httpx.get(url + "/health", timeout=60)
    assert r.status_code == 200, r.text
    yield url
    serve.delete("rotation")


@dataclass
class Done:
    uid: str
    started: float
    ended: float
    ok: bool
    problem: str = ""


@dataclass
class Rotation:
    old: str
    new: str
    at: float  # when the rotation call returned
    revoked_at: Optional[float] = None


@dataclass
class Load:
    url: str
    model: str
    done: list[Done] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)

    async def worker(self, session: aiohttp.ClientSession, wid: int, stop_at: float) -> None:
        n = 0
        while time.monotonic() < stop_at:
            uid = f"rot-{self.model}-{wid}-{n}"
            n += 1
            started = time.monotonic()
            self.running[uid] = started
            ok, problem = False, ""
            try:
                async with session.post(self.url + "/v1/chat/completions", json={
                    "model": self.model, "stream": True,
                    "messages": [{"role": "user", "content": uid}],
                }) as resp:
                    body = (await resp.read()).decode()
                    ok = resp.status == 200 and body.rstrip().endswith("data: [DONE]") and (
                        '"error"' not in body)
                    problem = "" if ok else f"{resp.status}: {body[-300:]}"
            except Exception as exc:  # a failed request is a finding, not a crash
                problem = repr(exc)
            finally:
                del self.running[uid]
                self.done.append(Done(uid, started, time.monotonic(), ok, problem))

    def oldest_running(self) -> float:
        return min(self.running.values(), default=float("inf"))


async def run_rotation_scenario(
    url: str, model: str, upstream: FakeOpenAI, first_key: str,
    rotate: Callable[[str], Awaitable[None]],
) -> tuple[Load, list[Rotation]]:
    load = Load(url, model)
    rotations: list[Rotation] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        stop_at = start + DURATION_S
        workers = [asyncio.create_task(load.worker(session, w, stop_at))
                   for w in range(CONCURRENCY)]
        key = first_key
        pending: list[Rotation] = []
        for i in range(ROTATIONS):
            await asyncio.sleep(max(0.0, start + 3 + i * 5 - time.monotonic()))
            new = f"sk-rot-{model}-{i + 1}-{os.urandom(6).hex()}"
            upstream.valid_keys = {*upstream.valid_keys, new}  # the provider issued it
            await rotate(new)
            rotation = Rotation(key, new, time.monotonic())
            rotations.append(rotation)
            pending.append(rotation)
            key = new
            # Revoke old keys once nothing that could have started with them still runs.
            deadline = time.monotonic() + 4.5
            while pending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                for rot in list(pending):
                    settled = time.monotonic() >= rot.at + PROPAGATION_S
                    if settled and load.oldest_running() > rot.at + PROPAGATION_S:
                        upstream.valid_keys = upstream.valid_keys - {rot.old}
                        rot.revoked_at = time.monotonic()
                        pending.remove(rot)
        await asyncio.gather(*workers)
        load_ended = time.monotonic()
        revoked_under_load = sum(1 for r in rotations if r.revoked_at is not None)
        for rot in pending:  # the last ones, after the load stopped
            upstream.valid_keys = upstream.valid_keys - {rot.old}
            rot.revoked_at = time.monotonic()
    print(f"\n{model}: {len(load.done)} requests in {load_ended - start:.1f}s, "
          f"{revoked_under_load} old keys revoked under load, rotation calls returned "
          f"{[round(r.at - start, 2) for r in rotations]}s after start")
    assert revoked_under_load >= ROTATIONS - 1
    return load, rotations


def check(load: Load, rotations: list[Rotation], upstream: FakeOpenAI, model: str) -> None:
    failed = [d for d in load.done if not d.ok]
    assert not failed, f"{len(failed)} failed, e.g. {failed[:3]}"
    assert len(load.done) >= 300, f"only {len(load.done)} requests in {DURATION_S}s"
    assert upstream.unauthorized == 0
    assert all(r.revoked_at is not None for r in rotations)
    keys: dict[str, list[str]] = {}
    for content, key in upstream.key_log:
        if content.startswith(f"rot-{model}-"):
            keys.setdefault(content, []).append(key)
    assert set(keys) == {d.uid for d in load.done}
    multi = {uid: k for uid, k in keys.items() if len(k) != 1}
    assert not multi, f"requests that reached the upstream more than once: {list(multi)[:3]}"
    order = [rotations[0].old, *(r.new for r in rotations)]
    late = []
    for d in load.done:
        expected = 0
        for i, rot in enumerate(rotations, start=1):
            if d.started >= rot.at + PROPAGATION_S:
                expected = i
        # A request may see a rotation before the admin call returned (the actor
        # publishes first), so a newer key than expected is fine; an older one is not.
        used = order.index(keys[d.uid][0])
        if used < expected:
            late.append((d.uid, round(d.started - rotations[0].at, 2), used, expected))
    assert not late, f"{len(late)} requests started >= 1 s after a rotation used an old key"
    # Every rotated key was really used (the test exercised each rotation).
    used = {k[0] for k in keys.values()}
    assert {r.new for r in rotations} <= used


def engine_counters(url: str, model: str) -> dict[str, Any]:
    health = httpx.get(url + "/health", timeout=30).json()
    return next(m for m in health["models"] if m["id"] == model)["remote"]


def admin(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + "/admin/credentials", timeout=30, **kwargs)


def test_admin_route_auth_and_validation(app_url: str) -> None:
    body = {"provider": "rotation-openai", "api_key": "sk-not-applied"}
    r = admin(app_url, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    r = admin(app_url, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for bad in ({"provider": "x y", "api_key": "k"}, {"provider": "openai"},
                {"provider": "openai", "api_key": ""}, [1]):
        r = admin(app_url, json=bad, headers=auth)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "INVALID_REQUEST"
    r = httpx.get(app_url + "/admin/credentials", headers=auth, timeout=30)
    assert r.status_code == 200
    assert r.json()["credentials"]["rotation-openai"]["source"] == "env"
    assert KEY0 not in r.text and "sk-not-applied" not in r.text


async def test_rotation_under_load_via_admin_route(app_url: str, upstream: FakeOpenAI) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    seen_bodies: list[str] = []

    async def rotate(new: str) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(app_url + "/admin/credentials", headers=auth,
                                  json={"provider": "rotation-openai", "api_key": new})
        assert r.status_code == 200, r.text
        assert r.json()["fingerprint"].startswith("sha256:")
        seen_bodies.append(r.text)

    load, rotations = await run_rotation_scenario(app_url, "rot-dep", upstream, KEY0, rotate)
    check(load, rotations, upstream, "rot-dep")
    counters = engine_counters(app_url, "rot-dep")
    assert counters["auth_refreshes"] == 0 and counters["retries"] == 0
    keys = [KEY0, *(r.new for r in rotations)]
    health = httpx.get(app_url + "/health", timeout=30).text
    listing = httpx.get(app_url + "/admin/credentials", timeout=30,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert not any(k in text for k in keys for text in [*seen_bodies, health, listing])
    assert_keys_not_in_ray_logs(keys)


async def test_rotation_under_load_via_secrets_file(
    app_url: str, upstream: FakeOpenAI, secrets_file: Path
) -> None:
    current = next(iter(upstream.valid_keys))  # the previous test left exactly one key

    async def rotate(new: str) -> None:
        tmp = secrets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rotation-openai": {"api_key": new}}))
        os.replace(tmp, secrets_file)  # atomic, like a mounted secret update

    load, rotations = await run_rotation_scenario(app_url, "rot-gw", upstream, current, rotate)
    check(load, rotations, upstream, "rot-gw")
    counters = engine_counters(app_url, "rot-gw")
    assert counters["auth_refreshes"] == 0 and counters["retries"] == 0
    assert_keys_not_in_ray_logs([r.new for r in rotations])


def assert_keys_not_in_ray_logs(keys: list[str]) -> None:
    """No key in any log file this Ray session wrote (gateway, replicas, actors)."""
    import ray

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    needles = [k.encode() for k in keys]
    for path in (session_dir / "logs").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [k for k in needles if k in data]
            assert not leaked, f"{path.name} contains a key"


def test_session_actor_restart_keeps_the_newest_key(app_url: str, upstream: FakeOpenAI) -> None:
    """Killed, the actor comes back (Ray restarts it), reloads env, file and store, and
    replicas follow its new epoch; requests keep working on the newest key meanwhile."""
    import ray

    from actors.names import NAMESPACE

    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    before = httpx.get(app_url + "/admin/credentials", headers=auth, timeout=30).json()
    actor = ray.get_actor("troupe-session-rotation", namespace=NAMESPACE)
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(app_url + "/admin/credentials", headers=auth, timeout=30)
        if r.status_code == 200 and r.json()["epoch"] != before["epoch"]:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    after = r.json()["credentials"]["rotation-openai"]
    assert after["fingerprint"] == before["credentials"]["rotation-openai"]["fingerprint"]
    for model in ("rot-dep", "rot-gw"):
        r = httpx.post(app_url + "/v1/chat/completions", timeout=30, json={
            "model": model, "messages": [{"role": "user", "content": "after restart"}]})
        assert r.status_code == 200, r.text
    assert upstream.unauthorized == 0
