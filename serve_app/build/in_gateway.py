"""Models hosted inside the gateway replica (``run_in: gateway``), any modality.

A separate Serve deployment costs every request a hop (serialization, a router, a replica
queue) and costs the machine an idle Ray worker process: each one wakes its main thread
every 10 ms and used about 1% of a core with no traffic (issue 20, bench/idle_cpu.py).
For an engine that holds no accelerator (a remote provider, the mock, a small CPU model)
the gateway can host it instead: the plain deployment class (the same
:class:`~deployments.lifecycle.EngineHost` a replica wraps) runs in this process behind a
:class:`~serve_app.build.local_handle.LocalHandle`, so the dispatcher, load/unload,
``/health`` stats and metrics go through the calls a Serve replica answers.

Engines start before the gateway replica reports ready (weights load once, up front). The
heavy work of every CPU engine already runs in threads (``asyncio.to_thread`` or the text
engine's batch loop), so the gateway's event loop keeps serving while a model computes.
A CPU model of another modality keeps its ``deployment.max_ongoing_requests`` as a cap
(beyond it requests wait their turn, as in Serve's router), and the loop's worker threads
grow by those caps, so a burst to one model cannot hold the threads another model needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from serve_app.build.local_handle import LocalHandle
from serve_app.build.replicas import plain_class
from serve_app.settings import ModelConfig, TransformersEngineConfig, TroupeSettings

__all__ = ["InGatewayModels"]

logger = logging.getLogger("troupe.in_gateway")


def _cap(model: ModelConfig) -> Optional[asyncio.Semaphore]:
    """A CPU model's own ``max_ongoing_requests`` (text engines bound their own queue;
    remote providers and mocks do no work here)."""
    if model.modality == "text" or not model.computes_locally:
        return None
    return asyncio.Semaphore(model.deployment.max_ongoing_requests)


def _waits(model: ModelConfig) -> bool:
    """Whether loading ``model`` would wait for its GGUF conversion to finish."""
    if not isinstance(model.engine, TransformersEngineConfig):
        return False
    from deployments.engines.gguf_cache import conversion_pending

    return conversion_pending(model.engine)


class InGatewayModels:
    """The engines of every ``run_in: gateway`` model of one gateway replica.

    Args:
        settings: the app's settings; one host object is built per in-gateway model.
    """

    def __init__(self, settings: TroupeSettings) -> None:
        self.models = {m.id: m for m in settings.models if m.run_in == "gateway"}
        self.hosts: dict[str, Any] = {
            mid: plain_class(m.modality)(m) for mid, m in self.models.items()
        }
        #: model id -> a handle with the Serve handle surface the dispatcher calls.
        self.handles: dict[str, LocalHandle] = {
            mid: LocalHandle(host, limit=_cap(self.models[mid]))
            for mid, host in self.hosts.items()
        }
        self._gauges: list[asyncio.Task] = []

    async def start(self, metrics: Any = None) -> None:
        """Load every engine now (one after another: loading weights is CPU-bound), then
        export the text engines' queues to ``metrics`` (the metrics actor's handle, Ray's
        or in-process; None: metrics off) as a text replica would.

        A model whose weights are still being converted loads last, so the others load
        while the conversion runs (a first ``make run``) instead of after it."""
        capped = sum(m.deployment.max_ongoing_requests for m in self.models.values()
                     if _cap(m) is not None)
        if capped:  # each model's capped requests get worker threads, as in its own replica
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
                max_workers=capped + (os.cpu_count() or 1) + 4,
                thread_name_prefix="in-gateway"))
        for mid, host in sorted(self.hosts.items(), key=lambda item: _waits(self.models[item[0]])):
            model = self.models[mid]
            if model.computes_locally:
                logger.info("loading %s in the gateway replica", mid)
            await host.start()
            if model.modality == "text" and model.computes_locally and metrics is not None:
                from actors.recorder import actor_gauge_sink
                from serve_app.build.queue_gauges import start_queue_gauges

                sink = actor_gauge_sink(metrics, host.replica_id)
                self._gauges.append(start_queue_gauges(host, model.deployment_name, mid, sink))

    async def shutdown(self) -> None:
        """Stop the gauges and every engine (the gateway replica is going away)."""
        for task in self._gauges:
            task.cancel()
        for host in self.hosts.values():
            await host.shutdown()
