"""Prefix-aware routing across a text model's replicas: a conversation stays on the replica
whose engine holds its prefix in cache, unless that replica is much busier than the rest.

Serve calls :class:`SessionAffinityRouter` (its request-router API, set per deployment by
``request_router_config``) in every caller of the model's handle, i.e. in each gateway
replica. A request's *session key* is OpenAI's ``prompt_cache_key`` when the client sends
one (the standard hint for "these requests share a prefix"), else a digest of the opening
of the conversation (system turns and the first user turn; the first characters of a raw
prompt), which every later turn repeats. The key picks a replica by rendezvous hashing, so
gateway replicas agree without sharing state and only the keys of a removed replica move;
the replica a key was last sent to wins over the hash, so a session that once spilled
over stays where its cache now is.

Load-aware fallback: when the preferred replica has ``max_imbalance`` more requests in
flight than the least loaded one (or is full), the request goes to the least loaded
instead, so one hot session cannot pile up on a replica while another idles. Serve counts a
request in its queue-length cache only once the caller's task has sent it, which runs after
the routing decision; requests routed at the same moment (a burst on a cold cache all await
one probe) would each see the others' replica as idle and pile up on it. So each decision
also counts the picks this router has made and Serve has not yet sent (at most
``_RESERVATION_S`` old).
Requests for a LoRA adapter first narrow the candidates to replicas holding it (Serve's
multiplexing), then apply the same rule among those.

Each replica found is given to the very request it was chosen for. Serve's base router
matches a found replica to its request by ``internal_request_id``, but every handle call
made while serving one HTTP request inherits that request's id (``n: 2`` fans out two such
calls; so do other fan-outs): its index keeps the first of them only, so the replica found
for the second went to the first and the second waited forever. Serve's FIFO matching
would avoid that but hands a replica chosen for one session to whichever request is
oldest, which defeats affinity; here the match is by the call's own metadata object,
unique per handle call. The lookup overridden is a private hook of Serve's router (Ray
2.60); tests/unit/test_session_router_queue.py drives Serve's queue through it, so an
upgrade that changes the hook fails there first.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
from typing import Any, Optional

from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from serve_app.protocol.internal import GenerationRequest

__all__ = ["SessionAffinityRouter", "session_key"]

#: Characters of a raw prompt (or ids of a token prompt) that name its conversation.
_RAW_PREFIX = 256
#: Sessions remembered per router (each gateway replica has its own).
_MAX_SESSIONS = 10_000
#: How long a pick counts as load before Serve reports it sent (normally milliseconds; a
#: pick that was never sent, e.g. its caller gave up, stops counting after this).
_RESERVATION_S = 2.0


def session_key(request: Any) -> Optional[str]:
    """The routing key of a request to a text model; None for anything else (control calls)."""
    if not isinstance(request, GenerationRequest):
        return None
    if request.session_key:
        return "key:" + request.session_key
    digest = hashlib.blake2b(digest_size=12)
    if request.messages:
        for message in request.messages:
            digest.update(f"{message.role}\x00{message.content}\x01".encode())
            if message.role == "user":
                break
    elif request.prompt is not None:
        digest.update(request.prompt[:_RAW_PREFIX].encode())
    elif request.prompt_token_ids:
        digest.update(repr(request.prompt_token_ids[:_RAW_PREFIX]).encode())
    else:
        return None
    return "prefix:" + digest.hexdigest()


def _rendezvous(key: str, replicas: list[RunningReplica]) -> RunningReplica:
    """The replica with the highest hash of (key, replica): stable as replicas come and go."""
    def score(replica: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{key}|{replica.replica_id.unique_id}".encode(),
                               digest_size=8).digest()

    return max(replicas, key=score)


def _first_known(*values: Optional[int]) -> Optional[int]:
    return next((value for value in values if value is not None), None)


class SessionAffinityRouter(MultiplexMixin, RequestRouter):
    """Serve request router: session affinity with a load-aware fallback (see the module)."""

    def initialize_state(self, max_imbalance: int = 4, **kwargs: Any) -> None:
        """Serve passes ``request_router_kwargs`` here.

        Args:
            max_imbalance: how many more requests in flight the preferred replica may have
                than the least loaded one before a request spills over.
        """
        self.max_imbalance = max_imbalance
        self._last: OrderedDict[str, ReplicaID] = OrderedDict()
        #: Per replica, when each pick not yet sent by Serve was made (oldest first).
        self._reserved: dict[ReplicaID, list[float]] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> list[list[RunningReplica]]:
        """Ranked candidates: the session's replica first, then the rest by load."""
        candidates = candidate_replicas
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
            if pending_request.metadata.multiplexed_model_id:
                holding = self.apply_multiplex_routing(pending_request)
                candidates = [r for r in candidate_replicas if r.replica_id in holding]
        if not candidates:
            return []
        key = self._key(pending_request)
        if key is None or len(candidates) == 1:
            return [random.sample(candidates, min(2, len(candidates)))]
        loads = await self._loads(candidates)
        # No await from here to the reservation: concurrent decisions see each other's.
        preferred = self._preferred(key, candidates)
        others = sorted((r for r in candidates if r is not preferred),
                        key=lambda r: loads[r.replica_id])
        least = loads[others[0].replica_id]
        full = loads[preferred.replica_id] >= preferred.max_ongoing_requests
        if full or loads[preferred.replica_id] - least > self.max_imbalance:
            self._reserve(others[0].replica_id)
            return [others[:1], others[1:]]
        self._reserve(preferred.replica_id)
        return [[preferred], others]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        """Serve has sent a request and counted it in its cache: drop one pick's reservation."""
        super().on_send_request(replica_id)
        reserved = self._reserved.get(replica_id)
        if reserved:
            reserved.pop(0)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        """Remember where the session went: its prefix is cached there now."""
        key = self._key(pending_request)
        if key is None:
            return
        self._last[key] = replica_id
        self._last.move_to_end(key)
        while len(self._last) > _MAX_SESSIONS:
            self._last.popitem(last=False)

    def _get_pending_request_matching_internal_request_id(
        self, request_metadata: Optional[RequestMetadata] = None,
    ) -> Optional[PendingRequest]:
        """The unfulfilled request whose metadata this is (see the module: exact match).

        Overrides the base router's lookup by ``internal_request_id``, which calls made
        while serving one request share; the base then fulfils what this returns.
        """
        if request_metadata is None:
            return None
        for pending_request in self._pending_requests_to_fulfill:
            if pending_request.metadata is request_metadata and not pending_request.future.done():
                return pending_request
        return None

    @staticmethod
    def _key(pending_request: Optional[PendingRequest]) -> Optional[str]:
        if pending_request is None or not pending_request.args:
            return None
        return session_key(pending_request.args[0])

    def _preferred(self, key: str, candidates: list[RunningReplica]) -> RunningReplica:
        last = self._last.get(key)
        for replica in candidates:
            if replica.replica_id == last:
                return replica
        return _rendezvous(key, candidates)

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Requests in flight per replica: Serve's cached queue lengths, probing the
        replicas the cache has no fresh entry for (as Serve's own routers do); one that
        does not answer counts as full."""
        cache = self.replica_queue_len_cache
        missing = [r for r in replicas if cache.get(r.replica_id) is None]
        probed: dict[ReplicaID, Optional[int]] = {}
        if missing:
            for replica, queue_len in await self._probe_queue_lens(missing, 0):
                probed[replica.replica_id] = queue_len
        # Read the cache after the probe: sends made meanwhile have updated it.
        known = {r.replica_id: _first_known(cache.get(r.replica_id), probed.get(r.replica_id))
                 for r in replicas}
        return {r.replica_id: r.max_ongoing_requests if known[r.replica_id] is None
                else int(known[r.replica_id] or 0) + self._reservations(r.replica_id)
                for r in replicas}

    def _reserve(self, replica_id: ReplicaID) -> None:
        self._reserved.setdefault(replica_id, []).append(time.monotonic())

    def _reservations(self, replica_id: ReplicaID) -> int:
        """Picks of this replica not yet sent, dropping those older than ``_RESERVATION_S``."""
        reserved = self._reserved.get(replica_id)
        if not reserved:
            return 0
        cutoff = time.monotonic() - _RESERVATION_S
        while reserved and reserved[0] < cutoff:
            reserved.pop(0)
        return len(reserved)
