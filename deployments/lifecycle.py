"""What every model deployment shares, text or not: engine start, unload/load, stats, health.

:class:`EngineHost` is a plain base class (no Ray) of :class:`deployments.llm.LLMDeployment`
and the modality deployments. It builds its engine from the one registry
(``deployments.engines.registry``, keyed by modality and engine type), starts it once under
one lock and within ``start_timeout_s``; ``unload()`` drops the engine and returns the
replica's memory before and after, so a caller can show what was freed; ``load()`` builds
and starts a fresh engine. A Serve replica and a gateway-hosted engine (``run_in:
gateway``) go through the same methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import time
from typing import Any, Iterator, Optional

from deployments.engines.registry import create_engine
from serve_app.errors import InferenceFailed, ModelNotLoaded, Timeout, TroupeError
from serve_app.settings import ModelConfig

__all__ = ["EngineHost", "rss_mb", "release_memory", "ENGINE_START_TIMEOUT_S"]

#: Longest an engine may take to start (load weights, connect) before the start fails.
#: Generous: a first start may download a large model.
ENGINE_START_TIMEOUT_S = 1800.0


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
    """Base of every model deployment: one engine, built from the registry.

    Args:
        model: the model's config (or its dict form, as Serve passes args).
        engine: an engine instance to use first (tests); default: built from config.
        start_timeout_s: longest wait for the engine's ``start()`` (TIMEOUT beyond).
    """

    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        engine: Any = None,
        start_timeout_s: float = ENGINE_START_TIMEOUT_S,
    ) -> None:
        self.model = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
        self.engine: Any = engine if engine is not None else self._new_engine()
        self.start_timeout_s = start_timeout_s
        self._started = False
        self._unloaded = False
        self._start_lock = asyncio.Lock()
        self._active = 0
        self._served = 0
        #: Unix time the engine finished starting (a request sent before it waited for
        #: this replica to start: a cold start, e.g. after scale to zero).
        self._ready_at: Optional[float] = None

    def _new_engine(self) -> Any:
        return create_engine(self.model.modality, self.model.id, self.model.engine)

    async def start(self) -> None:
        """Load the engine now (the builder calls this from the replica's constructor)."""
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started or self._unloaded:
                return
            try:
                async with asyncio.timeout(self.start_timeout_s):
                    await self.engine.start()
            except TimeoutError:
                raise Timeout(
                    f"Model {self.model.id!r}'s engine did not start within "
                    f"{self.start_timeout_s:g}s; check the replica's log and retry.",
                    details={"model": self.model.id, "phase": "start"},
                ) from None
            self._started = True
            self._ready_at = time.time()

    def _refuse_if_unloaded(self) -> None:
        if self._unloaded:
            raise ModelNotLoaded(
                f"Model {self.model.id!r} is unloaded. Load it with "
                f"POST /models/{self.model.id}/load, then retry.",
                details={"model": self.model.id},
            )

    async def _ready_engine(self) -> Any:
        """The started engine; MODEL_NOT_LOADED while unloaded (also when unloaded while
        this caller waited for the start)."""
        self._refuse_if_unloaded()
        await self._ensure_started()
        self._refuse_if_unloaded()
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
                self.engine = self._new_engine()
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
