"""Webhook signing/verification and URL rules; batch jobs in-process with a real loopback
webhook receiver (aiohttp) and a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from serve_app.gateway.webhooks import (
    UnsafeWebhookURL,
    address_allowed,
    check_webhook_url,
    sign_payload,
    verify_signature,
)
from tests.unit.gateway_fakes import assert_native_error
from tests.unit.test_policies import PolicyGateway

SECRET = "whsec_unit_0123456789abcdef0123456789"


def test_sign_and_verify() -> None:
    body = b'{"type": "batch.completed"}'
    header = sign_payload(SECRET, body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature(SECRET, body, header, now=1_700_000_010)
    assert not verify_signature(SECRET, body + b" ", header, now=1_700_000_010)  # tampered
    assert not verify_signature("other-secret", body, header, now=1_700_000_010)
    assert not verify_signature(SECRET, body, header, now=1_700_000_000 + 301)  # stale
    assert not verify_signature(SECRET, body, header, now=1_700_000_000 - 301)  # future
    assert not verify_signature(SECRET, body, "t=abc,v1=00", now=1_700_000_000)
    assert not verify_signature(SECRET, body, None)
    rotated = header + ",v1=" + "0" * 64  # several signatures: any valid one passes
    assert verify_signature(SECRET, body, rotated, now=1_700_000_000)


@pytest.mark.parametrize("url, why", [
    ("http://example.com/hook", "loopback"),
    ("ftp://example.com/hook", "https"),
    ("https://user:pw@example.com/hook", "password"),
    ("https://example.com/hook?token=1", "query"),
    ("https://example.com/hook#frag", "fragment"),
    ("https://10.1.2.3/hook", "private"),
    ("https://169.254.169.254/latest", "private"),
    ("https://[fd00::1]/hook", "private"),
    ("https://0.0.0.0/hook", "private"),
])
def test_unsafe_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(UnsafeWebhookURL, match=why):
        check_webhook_url(url)


def test_safe_urls_and_allow_list() -> None:
    assert check_webhook_url("http://127.0.0.1:8080/hook")
    assert check_webhook_url("https://8.8.8.8/hook")  # a public address literal
    assert check_webhook_url("https://10.1.2.3/hook", allow=["10.0.0.0/8"])
    assert not address_allowed("192.168.1.5", "h", "https", [])
    assert address_allowed("192.168.1.5", "h", "https", ["192.168.1.0/24"])
    assert not address_allowed("::ffff:10.0.0.1", "h", "https", [])


class Receiver:
    """A loopback webhook receiver that records what arrives (fails the first N times)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[bytes, str]] = []
        self.fail_first = fail_first
        self.event = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500)
        self.received.append((body, request.headers.get("Troupe-Signature", "")))
        self.event.set()
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver(fail_first=1)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield rec, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def test_batch_job_runs_once_and_webhook_verifies(
        tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    rec, hook = receiver
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    gw = PolicyGateway(tmp_path, batch={"poll_interval_s": 0.05, "webhook_backoff_s": 0.1,
                                        "webhook_secret_file": str(secret_file)},
                       with_core=True)
    try:
        body = {"model": "mock-fast", "params": {"max_tokens": 3},
                "requests": [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(6)]
                + [{"id": "chat", "messages": [{"role": "user", "content": "hi"}]}],
                "webhook_url": hook}
        r = await gw.post("/batch", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["counts"]["total"] == 7
        await asyncio.wait_for(rec.event.wait(), 10)
        status = (await gw.get(f"/batch/{job['id']}")).json()
        assert status["status"] == "completed" and status["progress"] == 1.0
        assert status["counts"]["succeeded"] == 7
        results = (await gw.get(f"/batch/{job['id']}/results")).json()["data"]
        assert [x["id"] for x in results] == [f"r{i}" for i in range(6)] + ["chat"]
        assert all(x["attempts"] == 1 and x["usage"]["completion_tokens"] <= 3 for x in results)
        payload, signature = rec.received[0]
        assert verify_signature(SECRET, payload, signature)
        assert not verify_signature(SECRET, payload.replace(b"completed", b"failed"), signature)
        assert not verify_signature(SECRET, payload, signature, now=time.time() + 3600)
        for _ in range(50):  # the retry after the receiver's 500 is recorded
            webhook = (await gw.get(f"/batch/{job['id']}")).json()["webhook"]
            if webhook["state"] == "delivered":
                break
            await asyncio.sleep(0.05)
        assert webhook["state"] == "delivered" and webhook["attempts"] == 2
        assert len(rec.received) == 1
    finally:
        await gw.close()


async def test_batch_bad_input_is_400(tmp_path: Path) -> None:
    gw = PolicyGateway(tmp_path, with_core=True)
    try:
        ok = {"model": "mock-fast", "requests": [{"id": "a", "prompt": "x"}]}
        for bad, param in [
            ({**ok, "webhook_url": "http://example.com/h"}, "webhook_url"),
            ({**ok, "webhook_url": "https://10.0.0.1/h"}, "webhook_url"),
            ({**ok, "webhook_url": "https://u:p@example.com/h"}, "webhook_url"),
            ({**ok, "requests": []}, "requests"),
            ({**ok, "requests": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]},
             "requests.1.id"),
            ({**ok, "requests": [{"id": "a"}]}, "requests.0"),
        ]:
            err = assert_native_error(await gw.post("/batch", json=bad), 400, "INVALID_REQUEST")
            assert err["error"]["details"]["param"] == param
        assert_native_error(await gw.post("/batch", json={**ok, "model": "nope"}), 404,
                            "MODEL_NOT_FOUND")
        assert_native_error(await gw.get("/batch/batch_nope"), 404, "NOT_FOUND")
    finally:
        await gw.close()


async def test_send_time_resolver_drops_refused_addresses() -> None:
    """A host that passed the check but now resolves to a private address (DNS rebinding)
    gets no connection: the resolver returns only addresses that pass again."""
    from serve_app.gateway.webhooks import SafeResolver

    class Rebinding:
        def __init__(self, answers: list[str]) -> None:
            self.answers = answers

        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict]:
            return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0,
                     "flags": 0} for a in self.answers]

        async def close(self) -> None:
            pass

    resolver = SafeResolver("https", [])
    resolver._inner = Rebinding(["10.0.0.7"])
    with pytest.raises(OSError, match="refused"):
        await resolver.resolve("hooks.example", 443)
    resolver._inner = Rebinding(["10.0.0.7", "8.8.4.4"])
    assert [r["host"] for r in await resolver.resolve("hooks.example", 443)] == ["8.8.4.4"]
    plain = SafeResolver("http", [])
    plain._inner = Rebinding(["8.8.4.4"])  # plain http: loopback only, even to public hosts
    with pytest.raises(OSError):
        await plain.resolve("localhost", 80)
    await resolver.close()
