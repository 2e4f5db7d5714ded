"""SessionAffinityRouter inside Serve's own routing queue (no Ray cluster): replicas are
in-process fakes that answer queue-length probes, requests go through the entry point
Serve's handle router calls for every request."""

from __future__ import annotations

import asyncio
import uuid
from typing import Optional

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from serve_app.build.session_router import SessionAffinityRouter
from serve_app.protocol.internal import ChatMessage, GenerationRequest

DEPLOYMENT = DeploymentID(name="LLM_routed", app_name="test")


class FakeReplica:
    """What a request router reads of a running replica: its id, cap and queue length."""

    def __init__(self, name: str, queue_len: int = 0, max_ongoing_requests: int = 16) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.queue_len = queue_len
        self.max_ongoing_requests = max_ongoing_requests
        self.multiplexed_model_ids: set[str] = set()
        self.node_id = "node"
        self.availability_zone: Optional[str] = None

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def make_router(*replicas: FakeReplica) -> SessionAffinityRouter:
    router = SessionAffinityRouter(deployment_id=DEPLOYMENT,
                                   handle_source=DeploymentHandleSource.REPLICA,
                                   use_replica_queue_len_cache=True)
    router.initialize_state(max_imbalance=4)
    router.update_replicas(list(replicas))  # type: ignore[arg-type]  # duck-typed fakes
    return router


def pending(text: str, internal_request_id: str) -> PendingRequest:
    request = GenerationRequest("r", messages=[ChatMessage("user", text)])
    metadata = RequestMetadata(request_id="client-id", internal_request_id=internal_request_id,
                               call_method="generate")
    return PendingRequest(args=[request], kwargs={}, metadata=metadata)


async def route(router: SessionAffinityRouter, *requests: PendingRequest) -> list[str]:
    """Route the requests concurrently (as one gateway replica does); the replica each got."""
    chosen = await asyncio.wait_for(
        asyncio.gather(*(router._choose_replica_for_request(r) for r in requests)), timeout=10)
    return [replica.replica_id.unique_id for replica in chosen]


async def test_concurrent_calls_made_while_serving_one_request_are_all_routed() -> None:
    """``n: 2`` fans one HTTP request out into two handle calls; Serve gives both the
    HTTP request's internal id, and its out-of-order matching (by that id) handed the
    replica found for one call to the other and then never to the second call."""
    router = make_router(FakeReplica("a"), FakeReplica("b"))
    shared = uuid.uuid4().hex
    replicas = await route(router, pending("hello", shared), pending("hello", shared))
    # Both calls belong to one session: both on its replica.
    assert len(replicas) == 2 and replicas[0] == replicas[1]


async def test_each_call_gets_the_replica_chosen_for_its_own_session() -> None:
    """Calls of different sessions routed at once, even under one internal id, each land
    where their own session's key sends them (never on a sibling's choice)."""
    router = make_router(FakeReplica("a"), FakeReplica("b"), FakeReplica("c"))
    texts = [f"conversation {i}" for i in range(12)]
    alone = [(await route(router, pending(text, uuid.uuid4().hex)))[0] for text in texts]
    router = make_router(FakeReplica("a"), FakeReplica("b"), FakeReplica("c"))
    shared = uuid.uuid4().hex
    together = await route(router, *(pending(text, shared) for text in texts))
    assert together == alone


async def test_a_full_preferred_replica_sends_the_session_to_another() -> None:
    """Both calls of one session are answered when its replica is at its cap."""
    replicas = {"a": FakeReplica("a", max_ongoing_requests=2),
                "b": FakeReplica("b", max_ongoing_requests=2)}
    router = make_router(*replicas.values())
    busy = replicas[(await route(router, pending("hello", "probe")))[0]]
    busy.queue_len = 2
    router.replica_queue_len_cache.update(busy.replica_id, 2)
    shared = uuid.uuid4().hex
    chosen = await route(router, pending("hello", shared), pending("hello", shared))
    assert busy.replica_id.unique_id not in chosen


class SlowProbeReplica(FakeReplica):
    """Answers queue-length probes after a pause, so a burst of routings all wait on one."""

    async def get_queue_len(self, *, deadline_s: float) -> int:
        await asyncio.sleep(0.05)
        return self.queue_len


async def test_a_burst_of_one_session_on_a_cold_cache_spills_over() -> None:
    """Eight calls of one session routed at once with no queue lengths cached: Serve counts
    a request in its cache only once its caller has sent it, after the decision, so every
    call saw the session's replica idle and all eight piled up on it (a CI run of
    tests/integration/test_session_routing.py). The router's own unsent picks count."""
    router = make_router(SlowProbeReplica("a"), SlowProbeReplica("b"))
    router.initialize_state(max_imbalance=1)
    chosen = await route(router, *(pending("hot", uuid.uuid4().hex) for _ in range(8)))
    counts = sorted(chosen.count(name) for name in set(chosen))
    # Within max_imbalance: 4 and 4 (or 5 and 3 while picks are in flight).
    assert counts in ([4, 4], [3, 5]), chosen


async def test_a_sent_pick_is_counted_once() -> None:
    """Once Serve reports a pick sent (and counts it in its cache) the router's own
    reservation of it goes: the replica's load is one, not two."""
    router = make_router(FakeReplica("a"), FakeReplica("b"))
    [name] = await route(router, pending("hot", uuid.uuid4().hex))
    replica_id = next(r.replica_id for r in router.curr_replicas.values()
                      if r.replica_id.unique_id == name)
    router.replica_queue_len_cache.update(replica_id, 0)
    router.on_send_request(replica_id)
    loads = await router._loads(list(router.curr_replicas.values()))
    assert loads[replica_id] == 1
