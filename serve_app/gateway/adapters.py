"""The gateway's view of LoRA adapters: which base model serves which adapter, and where.

Clients name an adapter as ``"<base>:<adapter>"`` or by the adapter's own id (a model id
always wins over an adapter id). Adapters come from config (``adapters.paths`` and the
scanned ``adapters.folder``) and from ``POST /models/{base}/adapters`` (kept in the store,
so a redeploy keeps them). A registration or a drop touches the model-state actor, whose
long poll every gateway replica follows (:meth:`AdapterCatalog.follow`): the others
re-read the store within milliseconds; their health checks re-read it too (a missed touch).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from deployments.adapter_files import base_names, inspect_adapter, scan_adapter_folder
from serve_app.errors import AdapterNotFound, InvalidRequest, ModelNotFound
from serve_app.settings import ModelConfig
from serve_app.settings.adapters import ADAPTER_ID_PATTERN

__all__ = ["AdapterCatalog", "AdapterRef", "adapter_card", "replica_header", "serve_placement"]

logger = logging.getLogger("troupe.adapters")
_ID_RE = re.compile(ADAPTER_ID_PATTERN)
#: The store is re-read at most this often (adapters registered on another replica).
_REFRESH_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One adapter of one base model."""

    base: str
    adapter_id: str
    path: str
    source: str  # "config" or "registered"

    @property
    def model_id(self) -> str:
        """The id metering and listings use: ``"<base>:<adapter>"``."""
        return f"{self.base}:{self.adapter_id}"


class AdapterCatalog:
    """Adapters per base model, from config and from the store.

    Args:
        models: the configured models (only text models with ``adapters`` serve any).
        store: the gateway's store (``adapter_put``/``adapter_list``/``adapter_delete``),
            or None (in-process tests: registrations live in memory only).
    """

    def __init__(self, models: dict[str, ModelConfig], store: Any = None) -> None:
        self.models = models
        self.store = store
        #: Returns the model-state backend whose ``watch``/``touch`` carry "adapters changed"
        #: between gateway replicas (GatewayCore sets it); None: this replica only.
        self.changes: Optional[Callable[[], Any]] = None
        #: Awaited before the first store read (the gateway's store opens lazily).
        self.ready: Optional[Callable[[], Awaitable[None]]] = None
        self._refreshed = 0.0
        self._routed: dict[tuple[int, str], Any] = {}  # (handle, adapter) -> routed handle
        self.by_base: dict[str, dict[str, AdapterRef]] = {}
        for model in models.values():
            if model.adapters is None:
                continue
            found = scan_adapter_folder(model.adapters.folder) if model.adapters.folder else {}
            paths = {**found, **model.adapters.paths}
            self.by_base[model.id] = {
                aid: AdapterRef(model.id, aid, path, "config") for aid, path in paths.items()
            }

    # ----------------------------------------------------------------- lookups

    def split(self, model_id: str) -> Optional[AdapterRef]:
        """The adapter ``model_id`` names, None for a plain model id or an unknown name.

        Raises:
            AdapterNotFound: ``"<base>:<adapter>"`` with a known base that lacks it.
        """
        if model_id in self.models:
            return None
        base, sep, adapter_id = model_id.rpartition(":")
        if sep and base in self.by_base:
            ref = self.by_base[base].get(adapter_id)
            if ref is None:
                raise self._not_found(base, adapter_id)
            return ref
        for adapters in self.by_base.values():  # the adapter's own id
            if model_id in adapters:
                return adapters[model_id]
        return None

    def _not_found(self, base: str, adapter_id: str) -> AdapterNotFound:
        known = sorted(self.by_base.get(base, {}))
        return AdapterNotFound(
            f"Model {base!r} has no adapter {adapter_id!r}. Known adapters: "
            f"{', '.join(known) or '(none)'}. Send model='{base}:<adapter>' with one of them, "
            f"or register one with POST /models/{base}/adapters.",
            param="model", details={"model": base, "adapter": adapter_id, "available": known},
        )

    def cards(self) -> list[AdapterRef]:
        """Every adapter, by base then id (for /v1/models and /models)."""
        return [ref for base in sorted(self.by_base) for _, ref in sorted(self.by_base[base].items())]

    # ------------------------------------------------------------ registration

    async def refresh(self, force: bool = False) -> bool:
        """Re-read registered adapters from the store (unless ``force``, at most once a
        second); True when it read. Called when another replica announces a change
        (:meth:`follow`) and by the gateway's health check."""
        now = time.monotonic()
        if self.store is None or (not force and now - self._refreshed < _REFRESH_EVERY_S):
            return False
        self._refreshed = now
        rows = await self.store.adapter_list()
        for adapters in self.by_base.values():
            for aid in [a for a, r in adapters.items() if r.source == "registered"]:
                del adapters[aid]
        for row in rows:
            if row.base in self.by_base:
                self.by_base[row.base].setdefault(
                    row.adapter_id, AdapterRef(row.base, row.adapter_id, row.path, "registered")
                )
        return True

    async def follow(self, long_poll_s: float = 60.0, retry_s: float = 2.0) -> None:
        """Re-read the store whenever the model-state actor is touched (a registration or a
        drop on any gateway replica); runs for the app's lifetime. Nothing to follow
        without a store or a model that serves adapters."""
        if self.store is None or self.changes is None or not self.by_base:
            return
        version: Optional[int] = None
        while True:
            try:
                if self.ready is not None:
                    await self.ready()
                answer, _ = await self.changes().watch(version, long_poll_s)
                if answer != version:  # at start too: read what was registered before
                    await self.refresh(force=True)
                    version = answer
            except Exception:  # the actor or the store restarting: health checks still refresh
                logger.warning("following adapter registrations failed; retrying", exc_info=True)
                await asyncio.sleep(retry_s)

    async def _announce(self) -> None:
        """Tell the other gateway replicas to re-read the store (best effort)."""
        if self.changes is not None:
            try:
                await self.changes().touch()
            except Exception:  # they still re-read at their next health check
                logger.warning("could not announce an adapter change", exc_info=True)

    def base_model(self, base: str) -> ModelConfig:
        model = self.models.get(base)
        if model is None:
            raise ModelNotFound(
                f"Model {base!r} is not served here. Available models: "
                f"{', '.join(sorted(self.models))}.",
                param="model", details={"model": base},
            )
        if model.adapters is None:
            raise InvalidRequest(
                f"Model {base!r} serves no adapters (its config has no 'adapters' section). "
                f"Models that do: {', '.join(sorted(self.by_base)) or '(none)'}.",
                param="model",
            )
        return model

    async def register(self, base: str, adapter_id: str, path: str) -> AdapterRef:
        """Check an adapter folder against its base and keep it (store first).

        Raises:
            ModelNotFound: unknown base. InvalidRequest: a base without adapters, a bad
            id, an id taken by a model. AdapterInvalid: missing files, rank too large,
            trained on another base.
        """
        model = self.base_model(base)
        if not _ID_RE.match(adapter_id):
            raise InvalidRequest(
                f"Adapter id {adapter_id!r} must match {ADAPTER_ID_PATTERN}, e.g. 'support-bot'.",
                param="id",
            )
        if adapter_id in self.models:
            raise InvalidRequest(
                f"Adapter id {adapter_id!r} is a model id; pick another.", param="id"
            )
        current = self.by_base[base].get(adapter_id)
        if current is not None and current.source == "config":
            raise InvalidRequest(
                f"Adapter {adapter_id!r} of {base!r} is set in the config file; change it there.",
                param="id",
            )
        assert model.adapters is not None
        inspect_adapter(path, model.adapters.max_rank, base_names(model), adapter_id)
        if self.store is not None:
            from serve_app.store.adapter_tables import AdapterRow

            await self.store.adapter_put(AdapterRow(base, adapter_id, path, time.time()))
        ref = self.by_base[base][adapter_id] = AdapterRef(base, adapter_id, path, "registered")
        await self._announce()
        return ref

    async def drop(self, base: str, adapter_id: str) -> AdapterRef:
        """Forget a registered adapter (replicas evict it as other adapters come in).

        Raises:
            AdapterNotFound: not an adapter of ``base``. InvalidRequest: set in config.
        """
        self.base_model(base)
        await self.refresh()
        ref = self.by_base[base].get(adapter_id)
        if ref is None:
            raise self._not_found(base, adapter_id)
        if ref.source == "config":
            raise InvalidRequest(
                f"Adapter {adapter_id!r} of {base!r} is set in the config file; remove it there.",
                param="id",
            )
        if self.store is not None:
            await self.store.adapter_delete(base, adapter_id)
        del self.by_base[base][adapter_id]
        await self._announce()
        return ref

    # ----------------------------------------------------------------- routing

    def route(self, model_id: str, request: Any) -> str:
        """Put the adapter ``model_id`` names on the request; returns the base model id.

        A plain model id leaves the request as it is (a retry on another pool keeps its
        adapter).
        """
        ref = self.split(model_id)
        if ref is None:
            return model_id
        request.adapter, request.adapter_path = ref.adapter_id, ref.path
        return ref.base

    def handle_for(self, handle: Any, request: Any) -> Any:
        """The handle to call: with Serve's ``multiplexed_model_id`` when the request has an
        adapter, so Serve prefers a replica that already holds it."""
        adapter = getattr(request, "adapter", None)
        if adapter is None:
            return handle
        key = (id(handle), adapter)
        routed = self._routed.get(key)
        if routed is None:
            routed = self._routed[key] = handle.options(multiplexed_model_id=adapter)
        return routed


def adapter_card(ref: AdapterRef, created: int) -> dict[str, Any]:
    """An adapter in ``GET /v1/models`` and ``GET /models``: vLLM's shape (``parent`` is the
    base model). ``root`` names the base model's id, not the adapter's folder, so listings
    never show server paths."""
    return {
        "id": ref.model_id, "object": "model", "created": created, "owned_by": "troupe",
        "modality": "text", "parent": ref.base, "root": ref.base, "adapter": ref.adapter_id,
        "source": ref.source,
    }


def serve_placement(handle: Any) -> Optional[dict[str, list[str]]]:
    """Adapter id -> the replicas Serve's router in this gateway replica believes hold it
    (what it routes by); None when the handle has no Serve router yet, or Serve's
    internals differ from the version this reads (``ray[serve]`` 2.5x/2.60).

    Serve learns a replica's adapters asynchronously: the replica pushes its multiplexed
    ids to the controller every 0.1 s after a load, and the controller broadcasts them to
    every router. Until this router has them, a request for a freshly loaded adapter may
    go to the replica with the fewest adapters and load it there too.
    """
    router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    table = getattr(getattr(router, "_request_router", None),
                    "_multiplexed_model_id_to_replica_ids", None)
    if not isinstance(table, dict):
        return None
    try:  # the router's thread swaps the table whole; sets only shrink when a replica dies
        return {aid: sorted(r.unique_id for r in list(ids)) for aid, ids in list(table.items())}
    except (RuntimeError, AttributeError):
        return None


def replica_header(result: Any) -> dict[str, str]:
    """``x-troupe-replica``: which model replica served a unary answer (adapter routing shows
    in it: requests for one adapter keep landing on the replica that holds it)."""
    replica = getattr(result, "replica", None)
    return {"x-troupe-replica": replica} if replica else {}
