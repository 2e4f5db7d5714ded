"""The dispatcher: the only code that calls model handles.

:class:`Dispatcher` sends one request to a model deployment (a unary call, a place in a
merged call, or a stream), for every route and modality: counted in flight, bounded by
the cold-start wait and the total or idle timeout, cancelled when the caller goes away,
its failures turned into Troupe errors (:func:`translate`, the one place that does so)
and metered once. :class:`serve_app.gateway.core.GatewayCore` owns one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, AsyncGenerator, Callable, Optional

from serve_app.errors import (
    InferenceFailed,
    Overloaded,
    Timeout,
    TroupeError,
    as_troupe_error,
)
from serve_app.gateway.coalesce import Coalescer
from serve_app.gateway.metering import RequestInfo, RequestMeter, key_id
from serve_app.policies.context import note_usage
from serve_app.protocol.internal import GenerationRequest
from serve_app.protocol.metrics import RequestEvent
from serve_app.protocol.modalities import EmbeddingRequest
from serve_app.settings import ModelConfig, TroupeSettings

__all__ = ["Dispatcher", "translate", "wait_for_replica", "default_merge_in_flight"]

logger = logging.getLogger("troupe.dispatch")


def translate(exc: BaseException, model_id: str) -> TroupeError:
    """Map a failure of a handle call to a TroupeError (the one place that does this)."""
    if isinstance(exc, TroupeError):
        return as_troupe_error(exc)
    # Imported here so the module stays importable (and unit-testable) without Ray.
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    if isinstance(exc, serve_exc.BackPressureError):
        return Overloaded(
            f"Model {model_id!r} is at capacity: every replica is busy and its queue is full. "
            "Retry after the delay in Retry-After.",
            retry_after_s=1,
        )
    if isinstance(exc, getattr(serve_exc, "DeploymentUnavailableError", ())):
        return Overloaded(
            f"Model {model_id!r} has no replica that can take requests right now.",
            retry_after_s=5,
            status=503,
        )
    if isinstance(exc, (ray_exc.RayActorError, ray_exc.ActorUnavailableError)):
        return InferenceFailed(
            f"The replica serving model {model_id!r} died while handling this request. "
            "Nothing was returned; retry the request.",
            details={"exception": type(exc).__name__},
        )
    if isinstance(exc, ray_exc.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, TroupeError):
            return cause
    return as_troupe_error(exc)


async def wait_for_replica(response: Any, model: ModelConfig) -> None:
    """Wait until Serve hands the request to a replica, within the model's bound.

    Serve queues a request while the deployment has no free replica, e.g. scaled to zero
    and starting one again, or every replica at ``max_ongoing_requests``; unbounded, a
    client would hang through a whole node start or a flood. Autoscaled models wait at
    most ``cold_start_timeout_s``; a fixed-size model whose engine bounds its queue wait
    (``max_queue_wait_s``, the batching CPU engine) waits at most that, as its engine's
    queue would (the engine counts this wait against the same bound).

    Raises:
        Overloaded: 503 + Retry-After when no replica took the request in time; the
            queued request is withdrawn (the replica it woke up keeps starting).
    """
    autoscaling = model.deployment.autoscaling
    queue_bound = getattr(model.engine, "max_queue_wait_s", None)
    # ``_fetch_future_result_async`` resolves on replica assignment (Serve's handle
    # internals); without it (another Serve version, test fakes) the wait is unbounded.
    assigned = getattr(response, "_fetch_future_result_async", None)
    if assigned is None:
        return
    if autoscaling is not None:
        limit: float = autoscaling.cold_start_timeout_s
    elif queue_bound is not None:
        limit = queue_bound
    else:
        return
    try:
        async with asyncio.timeout(limit):
            await assigned()
    except TimeoutError:
        response.cancel()
        raise _no_replica(model, limit) from None


def _no_replica(model: ModelConfig, limit: float) -> Overloaded:
    """The 503 of a request no replica took within ``limit`` seconds."""
    autoscaling = model.deployment.autoscaling
    if autoscaling is None:
        return Overloaded(
            f"Model {model.id!r} is busy: all its replicas were full for its "
            f"max_queue_wait_s of {limit:g}s; retry after the delay in Retry-After.",
            retry_after_s=max(1.0, limit), status=503,
            details={"reason": "no_free_replica", "waited_s": limit},
        )
    cold = autoscaling.min_replicas == 0
    why = (
        "it is scaled to zero (or all its replicas are busy) and no replica was ready"
        if cold else "all its replicas are busy"
    )
    return Overloaded(
        f"Model {model.id!r} could not take this request: {why} within its "
        f"cold_start_timeout_s of {limit:g}s. A replica is starting; retry after the "
        "delay in Retry-After.",
        retry_after_s=max(1.0, min(limit, 10.0)),
        status=503,
        details={"reason": "cold_start" if cold else "no_free_replica", "waited_s": limit},
    )


def _cancel(response: Any) -> None:
    """Cancel a handle call. Serve's ``cancel`` re-raises the failure of a call that was
    never assigned (backpressure, no replica): that call has nothing left to cancel, and
    its failure is already being answered."""
    try:
        response.cancel()
    except Exception as exc:  # the assignment's own failure, translated by the caller
        logger.debug("cancel of a call that failed to be assigned: %r", exc)


def default_merge_in_flight(model: ModelConfig) -> int:
    """Merged calls one gateway replica keeps running to a model, unless configured.

    Fixed size: 2 per replica (one computing, one waiting). Autoscaled: as many calls as
    the autoscaler's target at full size (``max_replicas * target_ongoing_requests``), so
    Serve still sees the ongoing requests it scales on: below that every request is its
    own call (and the replica's ``@serve.batch`` merges them); merging at the gateway
    takes over once all replicas are at their target.
    """
    scaling = model.deployment.autoscaling
    if scaling is None:
        return 2 * (model.deployment.num_replicas or 1)
    return max(2, scaling.max_replicas * math.ceil(scaling.target_ongoing_requests))


class _NothingToCancel:
    """Stands in for the handle response of a request that rides in a merged call: it has
    no call of its own to cancel (its place in the call is dropped instead)."""

    def cancel(self) -> None:
        pass


class Dispatcher:
    """Calls model deployments over their handles, with in-flight accounting and metering.

    Args:
        settings: the validated settings tree (timeouts, models).
        handles: model id -> DeploymentHandle of that model's deployment (or any object
            with the same ``.<method>.remote`` / ``.options(stream=True)`` surface).
        record: where finished-request events go (the metrics recorder's ``record``).
        gauge: where the in-flight gauges go (the recorder sends only changed values).
    """

    def __init__(
        self,
        settings: TroupeSettings,
        handles: dict[str, Any],
        record: Optional[Callable[[RequestEvent], None]] = None,
        gauge: Optional[Callable[[str, dict[str, str], float], None]] = None,
    ) -> None:
        self.settings = settings
        self.models: dict[str, ModelConfig] = {m.id: m for m in settings.models}
        self.record = record
        self.gauge = gauge
        self.handles = handles
        self._stream_handles = {mid: h.options(stream=True) for mid, h in handles.items()}
        #: Requests in flight on this replica, and per model (queued + running).
        self.in_flight = 0
        self._model_in_flight: dict[str, int] = {m.id: 0 for m in settings.models}
        self._gauge_labels = {"deployment": "Gateway"}  # summed over replicas by the actor
        self._model_gauge_labels = {
            m.id: {"deployment": m.deployment_name} for m in settings.models
        }
        #: Per embeddings model: this replica's merger of concurrent requests (None: off).
        self._mergers: dict[str, Optional[Coalescer]] = {}
        #: The handle a request goes through (the adapter catalog routes LoRA requests to a
        #: replica holding their adapter, issue 19); default: the model's own handle.
        self.route_handle: Callable[[Any, Any], Any] = lambda handle, request: handle

    # ------------------------------------------------------------- accounting

    def _open(self, model_id: str, request: Any, info: RequestInfo) -> RequestMeter:
        self.in_flight += 1
        meter = RequestMeter(request.request_id, model_id, info, self.models[model_id].provider)
        meter.adapter = getattr(request, "adapter", None)
        request.dispatched_at = time.time()
        if isinstance(request, GenerationRequest):  # queue fairness and class at local engines
            request.api_key_id = key_id(info)
            request.priority = "batch" if info.route == "/batch" else "interactive"
        self._model_in_flight[model_id] += 1
        self._report_in_flight(model_id)
        return meter

    def _report_in_flight(self, model_id: str) -> None:
        if self.gauge is not None:
            self.gauge("in_flight_requests", self._gauge_labels, self.in_flight)
            self.gauge(
                "in_flight_requests",
                self._model_gauge_labels[model_id],
                self._model_in_flight[model_id],
            )

    def _close(self, meter: RequestMeter, error: Optional[TroupeError]) -> None:
        self.in_flight -= 1
        self._model_in_flight[meter.model] -= 1
        self._report_in_flight(meter.model)
        note_usage(meter.prompt_tokens + meter.completion_tokens)  # tokens-per-minute limits
        record = meter.info.hold or self.record
        if record is None:
            return
        if error is None:
            record(meter.event())
        else:
            error.metered = True
            record(meter.event(error.status, error.code))

    def reject(self, route: str, error: TroupeError, request_id: str) -> None:
        """Account for a request refused before it reached a model (bad input, 404...)."""
        if self.record is not None:
            meter = RequestMeter(request_id, "-", RequestInfo(route), provider="-")
            self.record(meter.event(error.status, error.code))

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        model_id: str,
        method: str,
        request: Any,
        info: RequestInfo,
        on_result: Optional[Callable[[RequestMeter, Any], None]] = None,
        merger: Optional[Coalescer] = None,
    ) -> Any:
        """One unary request to a model deployment, for every route and modality.

        Its own handle call, or a place in a merged call (``merger``); counted in flight,
        bounded by the cold-start wait and the total timeout, failures translated to
        Troupe errors, metered once. ``on_result(meter, result)`` reads usage off the
        result (default: it finished with ``stop``).
        """
        meter = self._open(model_id, request, info)
        error: Optional[TroupeError] = None
        timeout = self.settings.gateway.request_timeout_s
        response: Any
        if merger is not None:
            # Cancelling or timing out abandons only this request's place in the call.
            response = _NothingToCancel()
            waiting: Any = merger.submit(request)
        else:
            handle = self.route_handle(self.handles[model_id], request)
            response = waiting = getattr(handle, method).remote(request)
        try:
            if merger is None:
                await wait_for_replica(response, self.models[model_id])
            async with asyncio.timeout(timeout):
                result = await waiting
            if on_result is None:
                meter.finish_reason = "stop"
            else:
                on_result(meter, result)
            return result
        except TimeoutError:
            response.cancel()
            error = Timeout(
                f"Model {model_id!r} did not finish within {timeout:.0f}s (total timeout).",
                details={"phase": "total"},
            )
            raise error from None
        except asyncio.CancelledError:
            response.cancel()  # the client went away: stop the engine work too
            raise
        except Exception as exc:
            error = translate(exc, model_id)
            raise error from None
        finally:
            self._close(meter, error)

    async def stream(
        self,
        model_id: str,
        method: str,
        request: Any,
        info: RequestInfo,
        on_chunk: Callable[[RequestMeter, Any], bool],
        nothing: str = "nothing",
    ) -> AsyncGenerator[Any, None]:
        """A streamed request to a model deployment (text tokens, audio), for every route.

        ``on_chunk(meter, chunk)`` meters a chunk and says whether it was the last one.
        Bounded by the cold-start wait and the idle timeout (its error says the model
        sent ``nothing`` for so long); closing this generator cancels the remote work.
        """
        meter = self._open(model_id, request, info)
        error: Optional[TroupeError] = None
        handle = self.route_handle(self._stream_handles[model_id], request)
        generator = getattr(handle, method).remote(request)
        idle = self.settings.gateway.stream_idle_timeout_s
        finished = False
        try:
            await wait_for_replica(generator, self.models[model_id])
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await generator.__anext__()
                except StopAsyncIteration:
                    finished = True
                    return
                except TimeoutError:
                    raise Timeout(
                        f"Model {model_id!r} sent {nothing} for {idle:.0f}s (idle stream timeout).",
                        details={"phase": "idle"},
                    ) from None
                if on_chunk(meter, chunk):
                    finished = True
                yield chunk
        except TroupeError as exc:
            error = exc
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            error = translate(exc, model_id)
            raise error from None
        finally:
            if not finished:
                _cancel(generator)
            self._close(meter, error)

    async def control(self, model_id: str, method: str, *args: Any) -> Any:
        """An unmetered call (voices, unload, load): its failure as a Troupe error."""
        try:
            return await getattr(self.handles[model_id], method).remote(*args)
        except Exception as exc:
            raise translate(exc, model_id) from None

    # ------------------------------------------------------------ merged calls

    def embed_merger(self, model_id: str) -> Optional[Coalescer]:
        """This replica's merger of concurrent requests to an embeddings model (None: off).

        One handle call per request costs both sides more CPU than a small model's
        forward pass; merged, a burst of requests costs one call and one forward pass.
        """
        if model_id in self._mergers:
            return self._mergers[model_id]
        model = self.models[model_id]
        in_flight = getattr(model.engine, "merge_in_flight", None)
        if in_flight is None:
            in_flight = default_merge_in_flight(model)
        merger: Optional[Coalescer] = None
        if in_flight > 0:
            from deployments.embeddings import (
                REMOTE_MAX_INPUTS,  # numpy: only when used
            )

            handle = self.handles[model_id]
            timeout = self.settings.gateway.request_timeout_s

            async def call(requests: list[EmbeddingRequest]) -> list[Any]:
                response = handle.embed_many.remote(requests)
                try:
                    await wait_for_replica(response, model)
                    async with asyncio.timeout(timeout):
                        return await response
                except BaseException:
                    response.cancel()
                    raise

            merger = Coalescer(
                call,
                max_weight=getattr(model.engine, "max_batch_size", REMOTE_MAX_INPUTS),
                max_in_flight=in_flight,
                weight=lambda r: len(r.inputs),
            )
        self._mergers[model_id] = merger
        return merger

    def merge_stats(self) -> dict[str, dict[str, int]]:
        """Merged calls per embeddings model on this replica (calls, requests, largest)."""
        return {mid: {"calls": m.calls, "requests": m.items, "largest": m.largest}
                for mid, m in self._mergers.items() if m is not None}
