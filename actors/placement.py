"""Named actors: get-or-create a detached, restartable actor, pinned to the head node.

The one place that knows how Troupe's long-lived actors (metrics, session, quota, model
state) are started. A Ray-only leaf: the builder (``serve_app.build.actors``) and
``actors.session`` both use it; it imports nothing of the gateway.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from actors.names import NAMESPACE

__all__ = ["head_node_id", "named_actor", "head_for_store"]

#: ``required``: run on the head node only; ``preferred``: there when it fits; None: anywhere.
OnHead = Optional[Literal["required", "preferred"]]


def head_node_id() -> Optional[str]:
    """The Ray head node's id (it carries the ``node:__internal_head__`` resource)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


def head_for_store(store_url: str) -> OnHead:
    """A SQLite file sits on the head node's disk: its actor must run there. With
    PostgreSQL the head is only preferred."""
    return "required" if str(store_url).startswith("sqlite:") else "preferred"


def named_actor(cls: type, name: str, *, num_cpus: float, on_head: OnHead = None,
                **options: Any) -> Any:
    """``cls`` as a named, detached, restartable actor class; ``.remote(args)`` on it
    creates the actor, or returns the live one of that name (``get_if_exists``).

    ``options``: more Ray actor options (e.g. ``max_concurrency``).
    """
    import ray

    if on_head is not None:
        head = head_node_id()
        if head is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                head, soft=on_head == "preferred")
    return ray.remote(cls).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=num_cpus, **options,
    )
