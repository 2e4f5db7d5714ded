"""GatewayCore: everything the routes share, and the only code that calls model handles.

Routes parse and encode; this class resolves model ids, calls the model deployments
over their handles, turns Ray/Serve failures into Troupe errors (one place), cancels the
remote work when the caller goes away, and reports engine-side health.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional

from serve_app.gateway.adapters import AdapterCatalog
from serve_app.gateway.coalesce import Coalescer
from serve_app.settings import ModelConfig, TroupeSettings
from serve_app.errors import (
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    Timeout,
    TroupeError,
    as_troupe_error,
)
from serve_app.gateway.metering import RequestInfo, RequestMeter
from serve_app.gateway.modalities import MODALITY_CAPABILITIES, ModalityCalls, ModelStateBackend
from serve_app.policies.context import authorize_model, note_usage
from serve_app.pricing import PriceTable
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)
from serve_app.protocol.metrics import RequestEvent
from serve_app.tracing import inject_context

__all__ = ["GatewayCore", "VERSION"]

logger = logging.getLogger("troupe.gateway")

VERSION = "0.1.0"

_CAPABILITIES = {
    "text": ["text-generation", "chat", "completions", "streaming"],
    **MODALITY_CAPABILITIES,
}


def _translate(exc: BaseException, model_id: str) -> TroupeError:
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


class _NothingToCancel:
    """Stands in for the handle response of a request that rides in a merged call: it has
    no call of its own to cancel (its place in the call is dropped instead)."""

    def cancel(self) -> None:
        pass


async def _wait_for_replica(response: Any, model: ModelConfig) -> None:
    """Wait until Serve hands the request to a replica, at most ``cold_start_timeout_s``.

    Serve queues a request while the deployment has no free replica, e.g. scaled to zero
    and starting one again; unbounded, a client would hang through a whole node start.
    Only autoscaled models are bounded (a fixed-size deployment never sits at zero).

    Raises:
        Overloaded: 503 + Retry-After when no replica took the request in time; the
            queued request is withdrawn (the replica it woke up keeps starting).
    """
    autoscaling = model.deployment.autoscaling
    # ``_fetch_future_result_async`` resolves on replica assignment (Serve's handle
    # internals); without it (another Serve version, test fakes) the wait is unbounded.
    assigned = getattr(response, "_fetch_future_result_async", None)
    if autoscaling is None or assigned is None:
        return
    limit = autoscaling.cold_start_timeout_s
    try:
        async with asyncio.timeout(limit):
            await assigned()
    except TimeoutError:
        response.cancel()
        cold = autoscaling.min_replicas == 0
        why = (
            "it is scaled to zero (or all its replicas are busy) and no replica was ready"
            if cold else "all its replicas are busy"
        )
        raise Overloaded(
            f"Model {model.id!r} could not take this request: {why} within its "
            f"cold_start_timeout_s of {limit:g}s. A replica is starting; retry after the "
            "delay in Retry-After.",
            retry_after_s=max(1.0, min(limit, 10.0)),
            status=503,
            details={"reason": "cold_start" if cold else "no_free_replica", "waited_s": limit},
        ) from None


def _router_replicas(handle: Any) -> Optional[int]:
    """Running replicas the handle's router knows of (Serve internals; None: unknown).

    Lets /health tell a model scaled to zero without sending it a request, which would
    wake it up again (Serve scales from zero on any queued request).
    """
    inner = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    if inner is None:
        return None
    request_router = getattr(inner, "_request_router", None)
    if request_router is not None:
        replicas = getattr(request_router, "curr_replicas", None)
        return None if replicas is None else len(replicas)
    pending = getattr(inner, "_running_replicas", None)  # before the first request
    return 0 if pending is None else len(pending)


class GatewayCore(ModalityCalls):
    """Shared gateway state: settings, model handles, in-flight accounting.

    Args:
        settings: the validated settings tree.
        handles: model id -> DeploymentHandle of that model's deployment (or any object
            with the same ``.stream``/``.complete``/``.stats`` ``remote`` surface).
    """

    def __init__(
        self,
        settings: TroupeSettings,
        handles: dict[str, Any],
        record: Optional[Callable[[RequestEvent], None]] = None,
        gauge: Optional[Callable[[str, dict[str, str], float], None]] = None,
        model_state: Optional[ModelStateBackend] = None,
    ) -> None:
        self.settings = settings
        self._init_modalities(model_state)  # load/unload state (serve_app/gateway/modalities.py)
        #: Where finished-request events go (the metrics recorder's O(1) ``record``).
        self.record = record
        #: Where the in-flight gauge goes (the recorder sends only changed values).
        self.gauge = gauge
        self._gauge_labels = {"deployment": "Gateway"}  # summed over replicas by the actor
        #: Requests dispatched to each model deployment and not finished (queued + running).
        self._model_in_flight: dict[str, int] = {m.id: 0 for m in settings.models}
        self._model_gauge_labels = {
            m.id: {"deployment": m.deployment_name} for m in settings.models
        }
        self.models: dict[str, ModelConfig] = {m.id: m for m in settings.models}
        #: LoRA adapters per base model (issue 19); the builder gives it the store.
        self.adapters = AdapterCatalog(self.models)
        #: The same price table the metrics actor uses (WebSocket ``complete`` costs).
        self.prices = PriceTable.from_models(settings.models)
        self._handles = handles
        self._stream_handles = {mid: h.options(stream=True) for mid, h in handles.items()}
        self.started_at = time.time()
        self.in_flight = 0
        self._logged_unknown: set[tuple[str, str]] = set()

    # ----------------------------------------------------------------- models

    def resolve(self, model_id: str) -> ModelConfig:
        model = self.models.get(model_id)
        adapter = None if model is not None else self.adapters.split(model_id)  # issue 19
        if adapter is not None:
            model_id, model = adapter.base, self.models[adapter.base]
        if model is None:
            available = ", ".join(sorted(self.models)) or "(none)"
            raise ModelNotFound(
                f"Model {model_id!r} is not served here. Available models: {available}. "
                "List them with GET /v1/models.",
                param="model",
                details={"model": model_id, "available": sorted(self.models)},
            )
        authorize_model(model_id)  # 403 for a key scoped to other models
        return model

    def capabilities(self, model: ModelConfig) -> list[str]:
        return list(_CAPABILITIES[model.modality])

    def note_unknown_fields(self, route: str, names: list[str]) -> None:
        """Log request fields we ignore, once per (route, field) so logs stay readable."""
        if not names or not self.settings.log_unknown_fields:
            return
        fresh = [n for n in names if (route, n) not in self._logged_unknown]
        if fresh:
            self._logged_unknown.update((route, n) for n in fresh)
            logger.info("ignoring unknown request fields on %s: %s", route, ", ".join(fresh))

    # ---------------------------------------------------------------- requests

    @staticmethod
    def build_request(
        request_id: str,
        *,
        messages: Optional[list] = None,
        prompt: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: tuple[str, ...] = (),
    ) -> GenerationRequest:
        """Translate any API family's fields into the internal request.

        The current span (the request's, opened by ``TracingMiddleware`` or the WebSocket
        session) becomes the parent of the model deployment's spans.
        """
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop=stop,
        )
        msgs = None
        if messages is not None:
            msgs = [ChatMessage(m.role, m.text()) for m in messages]
        return GenerationRequest(
            request_id, sampling, msgs, prompt, trace_context=inject_context()
        )

    def check_n(self, n: Optional[int]) -> None:
        if n not in (None, 1):
            raise InvalidRequest(
                f"n={n} is not supported: this gateway returns one choice per request. "
                "Send n=1 (or omit it) and issue several requests for several samples.",
                param="n",
            )

    def _dispatch(self, model_id: str, request: GenerationRequest) -> None:
        request.dispatched_at = time.time()
        self._model_in_flight[model_id] += 1
        self._report_in_flight(model_id)

    def _report_in_flight(self, model_id: str) -> None:
        if self.gauge is not None:
            self.gauge("in_flight_requests", self._gauge_labels, self.in_flight)
            self.gauge(
                "in_flight_requests",
                self._model_gauge_labels[model_id],
                self._model_in_flight[model_id],
            )

    def _close_meter(self, meter: RequestMeter, error: Optional[TroupeError]) -> None:
        self._model_in_flight[meter.model] -= 1
        self._report_in_flight(meter.model)
        note_usage(meter.prompt_tokens + meter.completion_tokens)  # tokens-per-minute limits
        if self.record is None:
            return
        if error is None:
            self.record(meter.event())
        else:
            error.metered = True
            self.record(meter.event(error.status, error.code))

    def reject(self, route: str, error: TroupeError, request_id: str) -> None:
        """Account for a request refused before it reached a model (bad input, 404...)."""
        if self.record is not None:
            meter = RequestMeter(request_id, "-", RequestInfo(route), provider="-")
            self.record(meter.event(error.status, error.code))

    async def complete(
        self, model_id: str, request: GenerationRequest, info: RequestInfo
    ) -> TextChunk:
        """Run a request to completion on the model's deployment."""
        model_id = self.adapters.route(model_id, request)  # "<base>:<adapter>" -> base
        self.admit(model_id, "text", info.route)
        if request.start_within_s is not None:  # flex first, standard after the window
            from serve_app.gateway.deadline import complete_with_deadline

            return await complete_with_deadline(self, model_id, request, info)
        if request.service_tier is not None and info.tier == "default":
            info = dataclasses.replace(info, tier=request.service_tier)
        return await self.call_model(model_id, "complete", request, info,
                                     on_result=RequestMeter.finished)

    async def call_model(
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
        self.in_flight += 1
        meter = RequestMeter(request.request_id, model_id, info, self.models[model_id].provider)
        meter.adapter = getattr(request, "adapter", None)
        error: Optional[TroupeError] = None
        self._dispatch(model_id, request)
        timeout = self.settings.gateway.request_timeout_s
        response: Any
        if merger is not None:
            # Cancelling or timing out abandons only this request's place in the call.
            response = _NothingToCancel()
            waiting: Any = merger.submit(request)
        else:
            handle = self.adapters.handle_for(self._handles[model_id], request)
            response = waiting = getattr(handle, method).remote(request)
        try:
            if merger is None:
                await _wait_for_replica(response, self.models[model_id])
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
            error = _translate(exc, model_id)
            raise error from None
        finally:
            self.in_flight -= 1
            self._close_meter(meter, error)

    async def stream_model(
        self,
        model_id: str,
        method: str,
        request: Any,
        info: RequestInfo,
        on_chunk: Callable[[RequestMeter, Any], bool],
        nothing: str = "nothing",
    ) -> AsyncIterator[Any]:
        """A streamed request to a model deployment (text tokens, audio), for every route.

        ``on_chunk(meter, chunk)`` meters a chunk and says whether it was the last one.
        Bounded by the cold-start wait and the idle timeout (its error says the model
        sent ``nothing`` for so long); closing this generator cancels the remote work.
        """
        self.in_flight += 1
        meter = RequestMeter(request.request_id, model_id, info, self.models[model_id].provider)
        meter.adapter = getattr(request, "adapter", None)
        error: Optional[TroupeError] = None
        self._dispatch(model_id, request)
        handle = self.adapters.handle_for(self._stream_handles[model_id], request)
        generator = getattr(handle, method).remote(request)
        idle = self.settings.gateway.stream_idle_timeout_s
        finished = False
        try:
            await _wait_for_replica(generator, self.models[model_id])
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
            error = _translate(exc, model_id)
            raise error from None
        finally:
            self.in_flight -= 1
            if not finished:
                generator.cancel()
            self._close_meter(meter, error)

    async def stream(
        self, model_id: str, request: GenerationRequest, info: RequestInfo
    ) -> AsyncIterator[TextChunk]:
        """Stream a request's chunks; closing this generator cancels the remote work."""
        model_id = self.adapters.route(model_id, request)  # "<base>:<adapter>" -> base
        self.admit(model_id, "text", info.route)
        if request.start_within_s is not None:  # flex first, standard after the window
            from serve_app.gateway.deadline import stream_with_deadline

            async with contextlib.aclosing(
                stream_with_deadline(self, model_id, request, info)
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if request.service_tier is not None and info.tier == "default":
            info = dataclasses.replace(info, tier=request.service_tier)

        def on_chunk(meter: RequestMeter, chunk: TextChunk) -> bool:
            meter.chunk(chunk)
            return chunk.finish_reason is not None

        async with contextlib.aclosing(
            self.stream_model(model_id, "stream", request, info, on_chunk)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    # ------------------------------------------------------------------ health

    async def model_stats(self) -> dict[str, dict[str, Any]]:
        """Ask every model deployment for its engine's counters (bounded wait)."""
        timeout = self.settings.gateway.health_timeout_s

        async def one(model_id: str) -> tuple[str, dict[str, Any]]:
            if model_id in self.unloaded:  # unloaded on purpose: its replicas may be gone
                return model_id, {"status": "unloaded", "active_requests": 0}
            autoscaling = self.models[model_id].deployment.autoscaling
            if (
                autoscaling is not None
                and autoscaling.min_replicas == 0
                and _router_replicas(self._handles[model_id]) == 0
            ):
                return model_id, {"status": "scaled_to_zero", "active_requests": 0}
            response = self._handles[model_id].stats.remote()
            try:
                async with asyncio.timeout(timeout):
                    return model_id, {"status": "ok", **(await response)}
            except TimeoutError:
                response.cancel()
                return model_id, {"status": "unavailable", "reason": f"no answer in {timeout}s"}
            except Exception as exc:  # a dead or starting replica must not fail /health
                return model_id, {"status": "unavailable", "reason": type(exc).__name__}

        pairs = await asyncio.gather(*(one(mid) for mid in self.models))
        return dict(pairs)
