"""``POST /batch``, ``GET /batch/{id}``, ``GET /batch/{id}/results`` (see serve_app.gateway.batch)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serve_app.errors import NotFound
from serve_app.http.plumbing import JSONResponse, read_json
from serve_app.policies.context import current_principal

__all__ = ["build_batch_router"]

EXAMPLE = '{"model": "m", "requests": [{"id": "r1", "prompt": "Hi"}], "params": {"max_tokens": 32}}'


def build_batch_router(runner: Any) -> APIRouter:
    from serve_app.gateway.batch import job_view

    router = APIRouter(prefix="/batch")
    max_body = runner.core.settings.gateway.max_body_bytes

    async def owned(job_id: str) -> Any:
        job = await runner.store.batch_get(job_id)
        principal = current_principal()
        if job is None or (principal is not None and not principal.is_admin
                           and job.key_id != principal.key_id):
            raise NotFound(f"No batch job {job_id!r} for this key.")
        return job

    @router.post("")
    async def create(request: Request) -> JSONResponse:
        principal = current_principal()
        job = await runner.submit(await read_json(request, max_body, EXAMPLE),
                                  principal.key_id if principal else "anonymous")
        return JSONResponse(job_view(job), status_code=202)

    @router.get("/{job_id}")
    async def status(job_id: str) -> JSONResponse:
        return JSONResponse(job_view(await owned(job_id)))

    @router.get("/{job_id}/results")
    async def results(job_id: str) -> JSONResponse:
        job = await owned(job_id)
        items = await runner.store.batch_items(job_id)
        return JSONResponse({"id": job_id, "object": "list", "status": job.status, "data": [
            {"id": i.item_id, "state": i.state, "attempts": i.attempts, **(i.result or {})}
            for i in items]})

    return router
