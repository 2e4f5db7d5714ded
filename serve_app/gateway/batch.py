"""Batch jobs: validated and stored by ``POST /batch``, run by every gateway replica.

Each replica runs a :class:`BatchRunner` loop: it leases a few pending requests from the
store (``batch.concurrency`` at a time), runs each through the gateway core like an
``/inference`` call, and records the result only while it still holds the lease. A
replica that dies (a restart) leaves its leases to expire; another replica (or the
restarted one) takes the requests over, so each request ends with exactly one result and
a finished request is never run again. The replica that records the last result
completes the job; the completion webhook is then delivered (signed, retried with
exponential backoff) by whichever replica leases it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import orjson

from serve_app.errors import InvalidRequest, TroupeError, as_troupe_error
from serve_app.gateway.idle import IDLE_POLL_MAX_S, IdleBackoff
from serve_app.gateway.metering import RequestInfo
from serve_app.gateway.webhooks import SIGNATURE_HEADER, SafeResolver, UnsafeWebhookURL, check_webhook_url, sign_payload
from serve_app.protocol.native import InferenceRequest
from serve_app.settings.policies import BatchSettings
from serve_app.store.policy_rows import BatchItemRow, BatchJobRow

__all__ = ["BatchRunner", "job_view", "webhook_secret"]

logger = logging.getLogger("troupe.batch")


def webhook_secret(settings: BatchSettings) -> Optional[str]:
    """The signing secret (file first, then the environment variable); None if unset."""
    if settings.webhook_secret_file:
        return Path(settings.webhook_secret_file).read_text().strip() or None
    return os.environ.get(settings.webhook_secret_env) or None


def job_view(job: BatchJobRow) -> dict[str, Any]:
    counts = job.counts
    total = sum(counts.values())
    done = counts.get("succeeded", 0) + counts.get("failed", 0)
    return {
        "id": job.job_id, "object": "batch", "model": job.model, "status": job.status,
        "created_at": job.created_at, "completed_at": job.completed_at,
        "counts": {"total": total, "succeeded": counts.get("succeeded", 0),
                   "failed": counts.get("failed", 0), "pending": counts.get("pending", 0),
                   "running": counts.get("running", 0)},
        "progress": round(done / total, 4) if total else 1.0,
        "webhook": None if job.webhook_url is None else {
            "url": job.webhook_url, "state": job.webhook_state,
            "attempts": job.webhook_attempts, "last_error": job.webhook_error},
        "results_url": f"/batch/{job.job_id}/results",
    }


class BatchRunner:
    """The batch worker of one gateway replica."""

    def __init__(self, core: Any, store: Any, settings: BatchSettings, worker_id: str) -> None:
        self.core = core
        self.store = store
        self.settings = settings
        self.worker = worker_id
        self.lease_s = settings.item_lease_s or core.settings.gateway.request_timeout_s + 30
        self.running: set[asyncio.Task] = set()
        self.jobs: dict[str, BatchJobRow] = {}
        self._task: Optional[asyncio.Task] = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ submit

    def validate(self, body: dict[str, Any]) -> tuple[str, list[tuple[str, dict]], dict, Optional[str]]:
        """Check a ``POST /batch`` body; returns (model, [(id, request)], params, webhook)."""
        example = ('{"model": "m", "requests": [{"id": "r1", "prompt": "Hi"}], '
                   '"params": {"max_tokens": 32}, "webhook_url": "https://example.com/hook"}')
        if not isinstance(body, dict):
            raise InvalidRequest(f"The body must be a JSON object. Example: {example}")
        model, requests = body.get("model"), body.get("requests")
        params = body.get("params") or {}
        webhook = body.get("webhook_url")
        if not isinstance(model, str) or not model:
            raise InvalidRequest(f"'model' is required. Example: {example}", param="model")
        self.core.resolve(model)  # 404 unknown, 403 outside the key's scope
        if not isinstance(requests, list) or not requests:
            raise InvalidRequest(f"'requests' must be a non-empty list. Example: {example}",
                                 param="requests")
        if len(requests) > self.settings.max_requests:
            raise InvalidRequest(f"At most {self.settings.max_requests} requests per batch; "
                                 f"got {len(requests)}. Split it into several jobs.",
                                 param="requests")
        if not isinstance(params, dict):
            raise InvalidRequest("'params' must be an object of shared fields, e.g. "
                                 '{"max_tokens": 32}.', param="params")
        out: list[tuple[str, dict]] = []
        seen: set[str] = set()
        for i, item in enumerate(requests):
            rid = item.get("id") if isinstance(item, dict) else None
            if not isinstance(rid, str) or not rid or len(rid) > 256 or rid in seen:
                raise InvalidRequest(f"requests[{i}] needs a unique string 'id' (1-256 chars).",
                                     param=f"requests.{i}.id")
            seen.add(rid)
            merged = {**params, **{k: v for k, v in item.items() if k != "id"}, "model": model}
            try:
                InferenceRequest.model_validate(merged)
            except Exception as exc:  # pydantic's ValidationError: name the item
                first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc), "loc": ()}
                where = ".".join(str(p) for p in first.get("loc", ())) or "request"
                raise InvalidRequest(f"requests[{i}] ({rid!r}) is invalid: {where}: "
                                     f"{first['msg']}. Example: {example}",
                                     param=f"requests.{i}") from None
            merged.pop("model")
            out.append((rid, merged))
        if webhook is not None:
            if not isinstance(webhook, str):
                raise InvalidRequest("'webhook_url' must be a string URL.", param="webhook_url")
            try:
                check_webhook_url(webhook, self.settings.webhook_allow)
            except UnsafeWebhookURL as exc:
                raise InvalidRequest(
                    f"Unsafe webhook_url: {exc}. Webhooks must be https (http only to "
                    "loopback), without credentials, query or fragment, to a public address.",
                    param="webhook_url") from None
            if webhook_secret(self.settings) is None:
                raise InvalidRequest(
                    "This gateway has no webhook signing secret (batch.webhook_secret_env or "
                    "batch.webhook_secret_file), so it cannot send webhooks.",
                    param="webhook_url")
        return model, out, params, webhook

    async def submit(self, body: dict[str, Any], key_id: str) -> BatchJobRow:
        model, requests, params, webhook = self.validate(body)
        job = BatchJobRow(job_id="batch_" + os.urandom(12).hex(), key_id=key_id, model=model,
                          status="queued", params=params, webhook_url=webhook,
                          created_at=time.time())
        items = [BatchItemRow(job.job_id, rid, i, request) for i, (rid, request) in enumerate(requests)]
        await self.store.batch_create(job, items)
        self._wake.set()
        return await self.store.batch_get(job.job_id)

    # ------------------------------------------------------------------ worker

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="troupe-batch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        wait = IdleBackoff(self.settings.poll_interval_s, IDLE_POLL_MAX_S)
        while True:
            try:
                found = await self.step()
            except Exception as exc:  # the store is briefly unreachable: try again later
                logger.warning("batch worker step failed: %s", type(exc).__name__)
                found = 0
            try:
                await asyncio.wait_for(self._wake.wait(), wait.next(found or len(self.running)))
            except TimeoutError:
                pass
            if self._wake.is_set():
                wait.reset()
            self._wake.clear()

    async def step(self) -> int:
        """Claim what this replica has room for; deliver due webhooks. Returns how many
        items and webhooks it started."""
        room = self.settings.concurrency - len(self.running)
        now = time.time()
        found = 0
        if room > 0:
            for item in await self.store.batch_claim(self.worker, now, now + self.lease_s, room):
                task = asyncio.create_task(self._run_item(item))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
                found += 1
        for job in await self.store.batch_webhooks_due(now, now + 60, 4):
            asyncio.create_task(self._deliver(job))
            found += 1
        return found

    async def _job(self, job_id: str) -> BatchJobRow:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = await self.store.batch_get(job_id)
        return job

    async def _run_item(self, item: BatchItemRow) -> None:
        from serve_app.routes.native import native_request

        job = await self._job(item.job_id)
        body = InferenceRequest.model_validate({**item.request, "model": job.model})
        request_id = f"{item.job_id}:{item.item_id}:{item.attempts}"
        try:
            gen = await native_request(self.core, body, request_id)
            result = await self.core.complete(job.model, gen, RequestInfo("/batch", key_id=job.key_id))
            state, payload = "succeeded", {"text": result.text, "finish_reason": result.finish_reason,
                                           "usage": result.usage()}
        except TroupeError as exc:
            err = as_troupe_error(exc)
            state, payload = "failed", {"error": {"code": err.code, "message": err.message}}
        if not await self.store.batch_item_done(item.job_id, item.item_id, self.worker, state, payload):
            logger.info("batch %s item %s: lease lost, result dropped", item.job_id, item.item_id)
            return
        if await self.store.batch_complete_if_done(item.job_id, time.time()):
            self.jobs.pop(item.job_id, None)
            self._wake.set()  # deliver the webhook soon

    async def _deliver(self, job: BatchJobRow) -> None:
        import aiohttp

        full = await self.store.batch_get(job.job_id)
        body = orjson.dumps({"type": "batch.completed", "data": job_view(full)})
        secret = webhook_secret(self.settings) or ""
        attempts = job.webhook_attempts + 1
        error: Optional[str] = None
        try:
            url = check_webhook_url(job.webhook_url or "", self.settings.webhook_allow)
            connector = aiohttp.TCPConnector(
                resolver=SafeResolver(urlsplit(url).scheme, self.settings.webhook_allow))
            timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async with session.post(url, data=body, allow_redirects=False, headers={
                        "content-type": "application/json",
                        SIGNATURE_HEADER: sign_payload(secret, body),
                        "user-agent": "troupe-webhooks/1"}) as resp:
                    if 200 <= resp.status < 300:
                        await self.store.batch_webhook_update(job.job_id, "delivered", attempts, 0.0, None)
                        return
                    error = f"HTTP {resp.status}"
        except UnsafeWebhookURL as exc:
            error = f"unsafe URL at send time: {exc}"
            attempts = self.settings.webhook_max_attempts
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = type(exc).__name__
        final = attempts >= self.settings.webhook_max_attempts
        delay = self.settings.webhook_backoff_s * 2 ** (attempts - 1)
        logger.info("batch %s webhook attempt %d failed (%s)%s", job.job_id, attempts, error,
                    "; giving up" if final else f"; retry in {delay:.0f}s")
        await self.store.batch_webhook_update(
            job.job_id, "failed" if final else "pending", attempts, time.time() + delay, error)
