"""What every modality deployment shares: engine start, unload/load, stats, health.

:class:`EngineHost` is a plain base class (no Ray). ``unload()`` drops the engine and
returns the replica's memory before and after, so a caller can show what was freed;
``load()`` builds and starts a fresh engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

from serve_app.settings import ModelConfig
from serve_app.errors import InferenceFailed, ModelNotLoaded, TroupeError

__all__ = ["EngineHost", "rss_mb", "release_memory"]


def rss_mb() -> Optional[float]:
    """This process's resident memory in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # torch absent or no CUDA: nothing to free there
        pass
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class EngineHost:
    """Base of the modality deployments: one engine, built by ``engine_factory``.

    Args:
        model: the model's config (or its dict form, as Serve passes args).
        engine_factory: builds a fresh (not started) engine from the model config.
        engine: an engine instance to use first (tests).
    """

    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        engine_factory: Callable[[ModelConfig], Any],
        engine: Any = None,
    ) -> None:
        self.model = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
        self._factory = engine_factory
        self.engine: Any = engine if engine is not None else engine_factory(self.model)
        self._started = False
        self._unloaded = False
        self._start_lock = asyncio.Lock()
        self._active = 0
        self._served = 0

    async def start(self) -> None:
        """Load the engine now (the builder calls this from the replica's constructor)."""
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.engine.start()
                self._started = True

    async def _ready_engine(self) -> Any:
        if self._unloaded:
            raise ModelNotLoaded(
                f"Model {self.model.id!r} is unloaded. Load it with "
                f"POST /models/{self.model.id}/load, then retry.",
                details={"model": self.model.id},
            )
        await self._ensure_started()
        return self.engine

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        self._active += 1
        self._served += 1
        try:
            yield
        finally:
            self._active -= 1

    @contextlib.contextmanager
    def _engine_errors(self, doing: str) -> Iterator[None]:
        """An engine's failure becomes INFERENCE_FAILED naming the model and what it was
        ``doing`` (logged with its traceback); Troupe errors, which already say what went
        wrong (e.g. a remote provider's 429), pass through."""
        try:
            yield
        except TroupeError:
            raise
        except Exception as exc:
            logging.getLogger(f"troupe.{self.model.modality}").exception(
                "%s engine failed on model %s", self.model.modality, self.model.id)
            raise InferenceFailed(
                f"Model {self.model.id!r} failed while {doing}: {type(exc).__name__}. "
                "Retry the request.",
                details={"exception": type(exc).__name__},
            ) from None

    @staticmethod
    def queue_ms(dispatched_at: float) -> Optional[float]:
        return max(0.0, (time.time() - dispatched_at) * 1000.0) if dispatched_at else None

    async def unload(self) -> dict[str, Any]:
        """Drop the engine and free its memory; returns RSS before and after (MiB)."""
        before = rss_mb()
        async with self._start_lock:
            if not self._unloaded:
                self._unloaded = True
                if self._started:
                    await self.engine.shutdown()
                self.engine = None
                self._started = False
        release_memory()
        return {"model": self.model.id, "loaded": False, "rss_mb_before": before,
                "rss_mb_after": rss_mb(), "pid": os.getpid()}

    async def load(self) -> dict[str, Any]:
        """Build and start a fresh engine (a no-op when loaded)."""
        async with self._start_lock:
            if self._unloaded:
                self.engine = self._factory(self.model)
                self._unloaded = False
        await self._ensure_started()
        return {"model": self.model.id, "loaded": True, "rss_mb": rss_mb(), "pid": os.getpid()}

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.model.id,
            "active_requests": self._active,
            "served_requests": self._served,
            "context_length": None,
            "engine": self.model.engine.type,
            "started": self._started,
            "engine_loaded": not self._unloaded,
            "rss_mb": rss_mb(),
            "pid": os.getpid(),
        }

    async def check_health(self) -> None:
        if not self._unloaded and not self._started:
            await self._ensure_started()

    async def shutdown(self) -> None:
        if self.engine is not None and self._started:
            await self.engine.shutdown()


class _UnloadedTextEngine:
    """Stands in for a text engine after unload: holds nothing, refuses work."""

    def __init__(self, model_id: str, context_length: int) -> None:
        self.model_id = model_id
        self.context_length = context_length

    async def start(self) -> None:
        pass

    def generate(self, request: Any) -> Any:
        raise ModelNotLoaded(
            f"Model {self.model_id!r} is unloaded. Load it with POST /models/{self.model_id}/load.",
            details={"model": self.model_id},
        )

    async def abort(self, request_id: str) -> None:
        pass

    def active_requests(self) -> int:
        return 0

    async def shutdown(self) -> None:
        pass


class TextLifecycle:
    """unload/load for :class:`deployments.llm.LLMDeployment` (mixed in by the builder)."""

    async def unload(self) -> dict[str, Any]:
        before = rss_mb()
        engine = self.engine  # type: ignore[has-type]
        if not isinstance(engine, _UnloadedTextEngine):
            await engine.shutdown()
            self.engine = _UnloadedTextEngine(self.model.id, engine.context_length)  # type: ignore[attr-defined]
            del engine
        release_memory()
        return {"model": self.model.id, "loaded": False, "rss_mb_before": before,  # type: ignore[attr-defined]
                "rss_mb_after": rss_mb(), "pid": os.getpid()}

    async def load(self) -> dict[str, Any]:
        from deployments.engines.base import create_text_engine

        if isinstance(self.engine, _UnloadedTextEngine):  # type: ignore[has-type]
            self.engine = create_text_engine(self.model.id, self.model.engine)  # type: ignore[attr-defined]
            self._started = False
            await self.start()  # type: ignore[attr-defined]
        return {"model": self.model.id, "loaded": True, "rss_mb": rss_mb(), "pid": os.getpid()}  # type: ignore[attr-defined]
