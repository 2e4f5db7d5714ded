"""The apps ``bench.users_bench`` starts besides Troupe, each the way a user would run it.

* ``baseline_builder``: the bare Ray Serve app of ``bench.baseline_app`` (proxy -> FastAPI
  ingress -> handle -> mock deployment) as a Serve *app builder*, so ``serve run`` of a
  config file starts it exactly as it starts Troupe.
* ``plain_app``: the same FastAPI routes with the same mock engine in process, for
  ``uvicorn --factory`` (the floor: no Ray, no hop).
* ``fake_upstream_app``: an OpenAI-compatible upstream whose answers come from that same
  mock engine (5 ms per token), for LiteLLM's proxy to sit in front of.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from bench.baseline_app import BaselineModel, build_baseline_app, build_baseline_fastapi

__all__ = ["baseline_builder", "plain_app", "fake_upstream_app"]


def baseline_builder(args: dict[str, Any]):
    """Serve app builder (``import_path: bench.users_apps:baseline_builder``)."""
    return build_baseline_app(**(args or {}))


class _InProcessMethod:
    """``handle.options(...).remote(x)`` over a local object's method (no Ray)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


class _InProcessModel:
    """The two handle calls the baseline ingress makes, served by a local BaselineModel."""

    def __init__(self, model: BaselineModel) -> None:
        self._model = model

    def options(self, method_name: str, stream: bool = False) -> _InProcessMethod:
        return _InProcessMethod(getattr(self._model, method_name))


def plain_app() -> FastAPI:
    """uvicorn factory: the baseline's routes with the 5 ms/token mock in process."""
    return build_baseline_fastapi(_InProcessModel(BaselineModel(5.0)))  # type: ignore[arg-type]


def fake_upstream_app() -> FastAPI:
    """uvicorn factory: an OpenAI-compatible upstream on the same mock (for LiteLLM)."""
    app = plain_app()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "mock-5ms", "object": "model"}]}

    return app
