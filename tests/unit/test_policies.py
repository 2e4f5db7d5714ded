"""The policy layer in-process: auth and scopes, admin key routes, JWT, rate limits,
idempotency, WebSocket auth, and no secret in the logs (real SQLite store, local quota)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import jwt
import pytest

from actors.quota import QuotaActor
from serve_app.build.app import build_fastapi_app
from serve_app.settings import load_settings
from serve_app.gateway.core import GatewayCore
from serve_app.policies.keys import mint_key
from serve_app.policies.layer import PolicyLayer, classify
from serve_app.store.sqlite import SQLiteStore
from tests.unit.gateway_fakes import (
    MODELS,
    FakeHandle,
    FakeReplica,
    assert_native_error,
    assert_openai_error,
    chat_body,
    eventually,
)
from deployments.llm import LLMDeployment

JWT_SECRET = "unit-test-jwt-secret-0123456789abcdef"


class PolicyGateway:
    def __init__(self, tmp: Path, bind_host: str = "127.0.0.1", with_core: bool = False,
                 **sections: Any) -> None:
        self.settings = load_settings({"models": MODELS, **sections})
        self.deployments = {m.id: LLMDeployment(m) for m in self.settings.models}
        handles = {mid: FakeHandle(FakeReplica(dep)) for mid, dep in self.deployments.items()}
        self.core = GatewayCore(self.settings, handles)
        self.store = SQLiteStore(tmp / "state.db")
        self.quota = QuotaActor()
        self.layer = PolicyLayer(self.settings, self.store, self.quota, bind_host=bind_host,
                                 core=self.core if with_core else None)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_fastapi_app(self.core, policies=self.layer)),
            base_url="http://troupe.test")

    async def key(self, role: str = "workspace", **kwargs: Any) -> str:
        await self.store.open()
        token, row = mint_key("test", role, **kwargs)
        await self.store.key_create(row)
        await self.layer.keys.refresh()
        return token

    async def post(self, url: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key:
            headers["authorization"] = f"Bearer {key}"
        async with asyncio.timeout(10):
            return await self.client.post(url, headers=headers, **kwargs)

    async def get(self, url: str, key: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        async with asyncio.timeout(10):
            return await self.client.get(url, headers=headers)

    async def close(self) -> None:
        await self.client.aclose()
        await self.layer.close()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[PolicyGateway]:
    gateway = PolicyGateway(tmp_path)
    yield gateway
    await gateway.close()


def test_classify_by_method_and_path() -> None:
    public = ("/health", "/", "/static/", "/docs", "/openapi.json")
    assert classify("GET", "/health", public) == "public"
    assert classify("GET", "/static/app.js", public) == "public"
    assert classify("OPTIONS", "/v1/chat/completions", public) == "public"
    assert classify("POST", "/health", public) == "user"
    assert classify("GET", "/v1/models", public) == "user"
    assert classify("POST", "/v1/embeddings", public) == "user"  # routes added later: covered
    assert classify("POST", "/v1/messages", public) == "user"
    for admin in ("/admin/keys", "/admin/credentials", "/metrics", "/traces"):
        assert classify("GET", admin, public) == "admin"
    assert classify("POST", "/models/org/mock/load", public) == "admin"
    assert classify("POST", "/models/m/unload", public) == "admin"


async def test_auth_off_on_loopback_without_keys(gw: PolicyGateway, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="troupe.auth"):
        r = await gw.post("/v1/chat/completions", json=chat_body(model="mock-fast"))
    assert r.status_code == 200
    assert any("AUTH IS OFF" in rec.getMessage() for rec in caplog.records)


async def test_auth_on_when_not_loopback_even_without_keys(tmp_path: Path) -> None:
    gateway = PolicyGateway(tmp_path, bind_host="0.0.0.0")
    try:
        r = await gateway.post("/v1/chat/completions", json=chat_body(model="mock-fast"))
        assert_openai_error(r, 401, "authentication_failed")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert (await gateway.get("/health")).status_code in (200, 503)  # public
    finally:
        await gateway.close()


async def test_keys_401_403_and_envelopes(gw: PolicyGateway) -> None:
    await gw.key("admin")  # any key turns auth on
    workspace = await gw.key("workspace")
    scoped = await gw.key("models", models=("mock-fast",))
    body = chat_body(model="mock-fast")
    assert_openai_error(await gw.post("/v1/chat/completions", json=body), 401,
                        "authentication_failed")
    assert_native_error(await gw.post("/inference", json={"model": "mock-fast", "prompt": "hi"}),
                        401, "AUTHENTICATION_FAILED")
    bad = workspace[:-4] + "abcd"
    assert_openai_error(await gw.post("/v1/chat/completions", bad, json=body), 401,
                        "authentication_failed")
    assert_openai_error(await gw.post("/v1/chat/completions", "not-a-key", json=body), 401,
                        "authentication_failed")
    assert (await gw.post("/v1/chat/completions", workspace, json=body)).status_code == 200
    # Anthropic-style header
    r = await gw.post("/v1/chat/completions", json=body, headers={"x-api-key": workspace})
    assert r.status_code == 200
    assert (await gw.post("/v1/chat/completions", scoped, json=body)).status_code == 200
    err = assert_openai_error(
        await gw.post("/v1/chat/completions", scoped, json=chat_body(model="mock-slow")),
        403, "authorization_failed")
    assert "mock-fast" in err["message"]
    assert_native_error(
        await gw.post("/inference", scoped, json={"model": "mock-slow", "prompt": "hi"}),
        403, "AUTHORIZATION_FAILED")
    # Admin routes need an admin key.
    assert_native_error(await gw.get("/admin/keys", workspace), 403, "AUTHORIZATION_FAILED")
    assert_native_error(await gw.get("/admin/keys"), 401, "AUTHENTICATION_FAILED")


async def test_admin_routes_create_list_revoke(gw: PolicyGateway) -> None:
    admin = await gw.key("admin")
    r = await gw.post("/admin/keys", admin, json={"name": "ci", "role": "models",
                                                  "models": ["mock-fast"]})
    assert r.status_code == 201, r.text
    created = r.json()
    token = created["key"]
    assert token.startswith("trp_") and created["role"] == "models"
    listed = (await gw.get("/admin/keys", admin)).json()["data"]
    assert created["id"] in [k["id"] for k in listed]
    assert all("key" not in k and "secret_hash" not in k for k in listed)
    body = chat_body(model="mock-fast")
    assert (await gw.post("/v1/chat/completions", token, json=body)).status_code == 200
    r = await gw.client.delete(f"/admin/keys/{created['id']}",
                               headers={"authorization": f"Bearer {admin}"})
    assert r.status_code == 200
    assert_openai_error(await gw.post("/v1/chat/completions", token, json=body), 401,
                        "authentication_failed")
    bad = await gw.post("/admin/keys", admin, json={"name": "x", "role": "models"})
    assert_native_error(bad, 400, "INVALID_REQUEST")


async def test_expired_key_is_401(gw: PolicyGateway) -> None:
    expired = await gw.key("workspace", expires_at=time.time() - 1)
    r = await gw.post("/v1/chat/completions", expired, json=chat_body(model="mock-fast"))
    assert "expired" in assert_openai_error(r, 401, "authentication_failed")["message"]


async def test_jwt_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROUPE_TEST_JWT", JWT_SECRET)
    gateway = PolicyGateway(tmp_path, auth={"jwt": {"secret_env": "TROUPE_TEST_JWT"}})

    def token(**claims: Any) -> str:
        return jwt.encode({"sub": "alice", "exp": time.time() + 60, **claims}, JWT_SECRET,
                          algorithm="HS256")

    try:
        body = chat_body(model="mock-fast")
        assert (await gateway.post("/v1/chat/completions", token(), json=body)).status_code == 200
        expired = token(exp=time.time() - 60)
        r = await gateway.post("/v1/chat/completions", expired, json=body)
        assert "expired" in assert_openai_error(r, 401, "authentication_failed")["message"]
        forged = jwt.encode({"sub": "x", "exp": time.time() + 60}, "wrong-secret-0123456789abcdef-0123456",
                            algorithm="HS256")
        assert_openai_error(await gateway.post("/v1/chat/completions", forged, json=body), 401,
                            "authentication_failed")
        scoped = token(models=["mock-slow"])
        assert_openai_error(await gateway.post("/v1/chat/completions", scoped, json=body), 403,
                            "authorization_failed")
        assert_native_error(await gateway.get("/admin/keys", token()), 403, "AUTHORIZATION_FAILED")
        assert (await gateway.get("/admin/keys", token(scope="admin"))).status_code == 200
    finally:
        await gateway.close()


async def test_rate_limit_headers_and_429(tmp_path: Path) -> None:
    gateway = PolicyGateway(tmp_path, limits={"default": {"requests_per_minute": 5}})
    try:
        key = await gateway.key()
        body = chat_body(model="mock-fast")
        remaining = []
        for _ in range(5):
            r = await gateway.post("/v1/chat/completions", key, json=body)
            assert r.status_code == 200
            assert r.headers["x-ratelimit-limit"] == "5"
            remaining.append(int(r.headers["x-ratelimit-remaining"]))
            assert int(r.headers["x-ratelimit-reset"]) >= time.time()
            assert 0 <= int(r.headers["x-ratelimit-reset-after"]) <= 60
        assert remaining == [4, 3, 2, 1, 0]
        r = await gateway.post("/v1/chat/completions", key, json=body)
        err = assert_openai_error(r, 429, "rate_limit_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-ratelimit-remaining"] == "0"
        assert "5 requests per minute" in err["message"]
    finally:
        await gateway.close()


async def test_per_key_override_and_concurrency(tmp_path: Path) -> None:
    gateway = PolicyGateway(tmp_path, limits={"default": {"requests_per_minute": 1000}})
    try:
        key = await gateway.key(limits={"concurrent_requests": 1})
        slow = {"model": "mock-slow", "prompt": "hi", "max_tokens": 40}
        first = asyncio.create_task(gateway.post("/inference", key, json=slow))
        await asyncio.sleep(0.05)
        r = await gateway.post("/inference", key, json=slow)
        assert_native_error(r, 429, "RATE_LIMIT_EXCEEDED")
        assert (await first).status_code == 200
        assert (await gateway.post("/inference", key, json={**slow, "max_tokens": 2})).status_code == 200
        await eventually(lambda: gateway.quota.in_flight == {})  # every slot went back
    finally:
        await gateway.close()


async def test_idempotency_replay_conflict_in_progress_and_expiry(tmp_path: Path) -> None:
    gateway = PolicyGateway(tmp_path, idempotency={"ttl_s": 0.5})
    try:
        body = {"model": "mock-fast", "prompt": "hi", "max_tokens": 8}
        h = {"idempotency-key": "order-1"}
        first = await gateway.post("/inference", json=body, headers=dict(h))
        assert first.status_code == 200
        runs = gateway.deployments["mock-fast"].stats()
        again = await gateway.post("/inference", json=body, headers=dict(h))
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert gateway.deployments["mock-fast"].stats() == runs  # nothing ran again
        other = await gateway.post("/inference", json={**body, "prompt": "bye"}, headers=dict(h))
        assert_native_error(other, 422, "IDEMPOTENCY_KEY_REUSED")
        bad = await gateway.post("/inference", json=body, headers={"idempotency-key": "a b"})
        assert_native_error(bad, 400, "INVALID_REQUEST")
        slow = {"model": "mock-slow", "prompt": "hi", "max_tokens": 40}
        running = asyncio.create_task(
            gateway.post("/inference", json=slow, headers={"idempotency-key": "slow-1"}))
        await asyncio.sleep(0.05)
        busy = await gateway.post("/inference", json=slow, headers={"idempotency-key": "slow-1"})
        assert_native_error(busy, 409, "IDEMPOTENCY_IN_PROGRESS")
        assert busy.headers["retry-after"] == "1"
        assert (await running).status_code == 200
        await asyncio.sleep(0.6)  # past ttl_s
        fresh = await gateway.post("/inference", json=body, headers=dict(h))
        assert fresh.status_code == 200 and "idempotent-replayed" not in fresh.headers
    finally:
        await gateway.close()


async def test_idempotency_too_large_to_store(tmp_path: Path) -> None:
    gateway = PolicyGateway(tmp_path, idempotency={"max_stored_bytes": 10})
    try:
        body = {"model": "mock-fast", "prompt": "hi", "max_tokens": 8}
        h = {"idempotency-key": "big"}
        assert (await gateway.post("/inference", json=body, headers=dict(h))).status_code == 200
        r = await gateway.post("/inference", json=body, headers=dict(h))
        assert_native_error(r, 409, "IDEMPOTENCY_REPLAY_UNAVAILABLE")
    finally:
        await gateway.close()


async def test_json_must_be_finite(gw: PolicyGateway) -> None:
    r = await gw.post("/v1/chat/completions", content=b'{"model": "mock-fast", "temperature": NaN,'
                      b' "messages": [{"role": "user", "content": "x"}]}',
                      headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_request")


async def test_no_secret_in_any_log_line(gw: PolicyGateway, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await gw.key("admin")
    created = (await gw.post("/admin/keys", admin, json={"name": "x"})).json()["key"]
    body = chat_body(model="mock-fast")
    await gw.post("/v1/chat/completions", admin[:-2] + "zz", json=body)
    await gw.post("/v1/chat/completions", created, json=body)
    await gw.post("/admin/keys", created, json={"name": "y"})
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert caplog.records  # something was logged
    for secret in (admin, created, admin[:-2] + "zz"):
        # A key is trp_<id>_<secret>, and the secret (token_urlsafe) may hold "_" itself:
        # its last "_" piece could be one character, found in any log line (CI failed on
        # "k"). The whole secret part, and each piece of it of 8 or more characters.
        secret_part = secret.split("_", 2)[2]
        pieces = [p for p in secret_part.split("_") if len(p) >= 8]
        assert all(s not in text for s in (secret, secret_part, *pieces))


async def test_cors_preflight(tmp_path: Path) -> None:
    gateway = PolicyGateway(tmp_path, cors={"allow_origins": ["https://app.example"]})
    try:
        await gateway.key()
        r = await gateway.client.options("/v1/chat/completions", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await gateway.client.options("/v1/chat/completions", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    finally:
        await gateway.close()


async def test_jwt_rs256(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "issuer.pem").write_bytes(pem)
    gateway = PolicyGateway(tmp_path, auth={"jwt": {
        "algorithm": "RS256", "public_key_file": str(tmp_path / "issuer.pem"),
        "issuer": "https://issuer.test"}})
    try:
        claims = {"sub": "svc", "exp": time.time() + 60, "iss": "https://issuer.test"}
        good = jwt.encode(claims, private, algorithm="RS256")
        body = chat_body(model="mock-fast")
        assert (await gateway.post("/v1/chat/completions", good, json=body)).status_code == 200
        wrong_issuer = jwt.encode({**claims, "iss": "https://other"}, private, algorithm="RS256")
        assert_openai_error(await gateway.post("/v1/chat/completions", wrong_issuer, json=body),
                            401, "authentication_failed")
    finally:
        await gateway.close()
