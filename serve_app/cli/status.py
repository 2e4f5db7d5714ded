"""``troupe status``: what runs where, per deployment (and per model hosted in a gateway).

Reads Serve's controller (each deployment's config, target replica count, and its
replicas with their state and node), the gateway's ``/metrics`` (requests in flight per
deployment, i.e. queued + running; local engines' own queues: depth, running requests
and expected wait) and, when given, the Troupe config (cold-start timeouts). GPU column:
GPUs held by running replicas / GPUs per replica (placement group bundles included, so a
TP=2 replica counts 2).
"""

from __future__ import annotations

import urllib.request
from typing import Any, Optional

from serve_app.settings import TroupeSettings

__all__ = [
    "collect_status", "engine_queues_from_metrics", "format_status", "in_flight_from_metrics",
]


def _name(value: Any) -> str:
    """An enum's value (Serve's details may hold enums or their strings)."""
    return str(getattr(value, "value", value))


def _serve_details() -> dict[str, Any]:
    """Serve's own view of every deployment (the dashboard's source): config, replicas
    with their node and state, target replica counts."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # it raises instead of returning None unless asked not to
    return client.get_serve_details()


def _node_label(replica: dict[str, Any]) -> str:
    """``IP/node-id-prefix``: nodes on one host (or behind one NAT) share an IP."""
    return f"{replica.get('node_ip') or '?'}/{(replica.get('node_id') or '?')[:8]}"


def _placement_group_gpus() -> dict[str, float]:
    """Placement group name -> GPUs of its bundles (Serve names a replica's group after
    the replica actor)."""
    from ray.util import placement_group_table

    out: dict[str, float] = {}
    for group in placement_group_table().values():
        if group.get("name") and group.get("state") == "CREATED":
            out[group["name"]] = sum(
                float(b.get("GPU", 0)) for b in (group.get("bundles") or {}).values()
            )
    return out


def _gpus_per_replica(
    config: dict[str, Any], replicas: list[dict[str, Any]], groups: dict[str, float],
    options: Any = None,
) -> float:
    """GPUs one replica holds: its actor's, plus its placement group bundles' (TP)."""
    actor = float((config.get("ray_actor_options") or {}).get("num_gpus") or 0)
    for replica in replicas:
        if replica.get("actor_name") in groups:
            return actor + groups[replica["actor_name"]]
    bundles = config.get("placement_group_bundles") or (
        options.placement_group_bundles if options is not None else None
    ) or []
    return actor + sum(float(b.get("GPU", 0)) for b in bundles)


def _metric_families(url: str, timeout_s: float) -> Optional[list[Any]]:
    """The gateway's ``/metrics`` parsed; None when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return list(text_string_to_metric_families(text))


def in_flight_from_metrics(url: str, timeout_s: float = 5.0) -> Optional[dict[str, float]]:
    """deployment -> requests in flight, from the gateway's Prometheus text.

    None when the gateway does not answer; a deployment that was never sent a request
    has no gauge yet (``collect_status`` counts it as 0).
    """
    families = _metric_families(url, timeout_s)
    if families is None:
        return None
    out: dict[str, float] = {}
    for family in families:
        if family.name == "troupe_in_flight_requests":
            for sample in family.samples:
                out[sample.labels.get("deployment", "?")] = sample.value
    return out


def engine_queues_from_metrics(
    url: str, timeout_s: float = 5.0,
) -> Optional[dict[str, dict[str, float]]]:
    """deployment -> its local engines' queue: ``queue_depth`` and ``running`` summed over
    replicas, ``expected_wait_s`` the longest (None when the gateway does not answer)."""
    families = _metric_families(url, timeout_s)
    if families is None:
        return None
    fields = {"troupe_engine_queue_depth": "queue_depth",
              "troupe_engine_running_requests": "running",
              "troupe_engine_expected_wait_seconds": "expected_wait_s"}
    out: dict[str, dict[str, float]] = {}
    for family in families:
        if family.name not in fields:
            continue
        field = fields[family.name]
        for sample in family.samples:
            row = out.setdefault(sample.labels.get("deployment") or "?",
                                 {"queue_depth": 0.0, "running": 0.0, "expected_wait_s": 0.0})
            if field == "expected_wait_s":  # the longest wait a new request may meet
                row[field] = max(row[field], float(sample.value))
            else:
                row[field] += float(sample.value)
    return out


def collect_status(
    settings: Optional[dict[str, TroupeSettings]] = None,
    in_flight: Optional[dict[str, float]] = None,
    engine_queues: Optional[dict[str, dict[str, float]]] = None,
) -> list[dict[str, Any]]:
    """One row per deployment of every Serve application (Ray must be connected).

    Args:
        settings: app name -> its Troupe settings (adds ``cold_start_timeout_s``).
        in_flight: deployment -> requests in flight at the gateway (queued + running),
            from :func:`in_flight_from_metrics`; gives ``queued``.
        engine_queues: deployment -> its local engines' queue, from
            :func:`engine_queues_from_metrics`; gives ``engine_queue``.
    """
    configured: dict[tuple[str, str], Any] = {}
    for app_name, app_settings in (settings or {}).items():
        for model in app_settings.models:
            configured[(app_name, model.deployment_name)] = model.deployment
    rows = []
    applications = _serve_details().get("applications") or {}
    groups = _placement_group_gpus()
    for app_name, app in sorted(applications.items()):
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            flight = None if in_flight is None else in_flight.get(dep_name, 0.0)
            options = configured.get((app_name, dep_name))
            row = _deployment_row(app_name, dep_name, dep, groups, options, flight)
            row["engine_queue"] = (engine_queues or {}).get(dep_name)
            rows.append(row)
    for app_name, app_settings in sorted((settings or {}).items()):
        gateway = ((applications.get(app_name) or {}).get("deployments") or {}).get("Gateway")
        rows += _in_gateway_rows(app_name, app_settings, gateway, groups, in_flight,
                                 engine_queues)
    return rows


def _in_gateway_rows(
    app_name: str, settings: TroupeSettings, gateway: Optional[dict[str, Any]],
    groups: dict[str, float], in_flight: Optional[dict[str, float]],
    engine_queues: Optional[dict[str, dict[str, float]]],
) -> list[dict[str, Any]]:
    """One row per model hosted in the gateway (``run_in: gateway``), named
    ``<deployment>@Gateway``: it runs wherever, and as often as, the gateway's replicas do."""
    if gateway is None:
        return []
    rows = []
    for model in settings.models:
        if model.run_in != "gateway":
            continue
        name = model.deployment_name
        flight = None if in_flight is None else in_flight.get(name, 0.0)
        row = _deployment_row(app_name, f"{name}@Gateway", gateway, groups, None, flight)
        row["queued"] = None  # the gateway's cap is not this model's
        row["engine_queue"] = (engine_queues or {}).get(name)
        rows.append(row)
    return rows


def _deployment_row(
    app_name: str,
    dep_name: str,
    dep: dict[str, Any],
    groups: dict[str, float],
    options: Any,
    flight: Optional[float],
) -> dict[str, Any]:
    """The status row of one deployment from Serve's details of it."""
    config = dep.get("deployment_config") or {}
    replicas = dep.get("replicas") or []
    states: dict[str, int] = {}
    nodes: dict[str, int] = {}
    for replica in replicas:
        state = _name(replica.get("state"))
        states[state] = states.get(state, 0) + 1
        if state == "RUNNING":
            nodes[_node_label(replica)] = nodes.get(_node_label(replica), 0) + 1
    running = states.get("RUNNING", 0)
    actor = config.get("ray_actor_options") or {}
    gpus = _gpus_per_replica(config, replicas, groups, options)
    cap = config.get("max_ongoing_requests")
    return {
        "application": app_name,
        "deployment": dep_name,
        "status": _name(dep.get("status")),
        "replicas": states,
        "target_replicas": dep.get("target_num_replicas"),
        "nodes": nodes,
        "num_cpus": actor.get("num_cpus"),
        "num_gpus": gpus,
        "gpus_in_use": gpus * running,
        "max_ongoing_requests": cap,
        "in_flight": flight,
        # Requests beyond what the running replicas' caps can hold wait in queue.
        "queued": None if flight is None or cap is None
        else max(0.0, flight - running * cap),
        "autoscaling": _autoscaling(config.get("autoscaling_config"), options),
    }


def _autoscaling(auto: Optional[dict[str, Any]], options: Any) -> Optional[dict[str, Any]]:
    """The autoscaling bounds and target (None for a fixed replica count)."""
    if not auto:
        return None
    row = {
        "min": auto.get("min_replicas"),
        "max": auto.get("max_replicas"),
        "target_ongoing_requests": auto.get("target_ongoing_requests"),
    }
    if options is not None and options.autoscaling is not None:
        row["cold_start_timeout_s"] = options.autoscaling.cold_start_timeout_s
    return row


def format_status(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal (NODES may run past its column)."""
    header = (f"{'APP/DEPLOYMENT':30} {'STATUS':9} {'REPLICAS':22} {'GPU':>7} "
              f"{'IN-FLIGHT':>9} {'QUEUED':>6} {'ENGINE-Q':>8} {'WAIT-S':>6}  {'SCALING':32} NODES")
    lines = [header]
    for r in rows:
        replicas = ",".join(f"{k.lower()}={v}" for k, v in sorted(r["replicas"].items())) or "-"
        nodes = ",".join(f"{node}x{n}" for node, n in sorted(r["nodes"].items())) or "-"
        gpus = f"{r['gpus_in_use']:g}/{r['num_gpus']:g}" if r["num_gpus"] else "-"
        flight = "-" if r["in_flight"] is None else f"{r['in_flight']:g}"
        queued = "-" if r["queued"] is None else f"{r['queued']:g}"
        engine = r.get("engine_queue")  # local engines' own queue (issue 17)
        depth = "-" if engine is None else f"{engine['queue_depth']:g}"
        wait = "-" if engine is None else f"{engine['expected_wait_s']:.1f}"
        if r.get("autoscaling"):
            a = r["autoscaling"]
            scaling = (f"auto {a['min']}..{a['max']} -> {r['target_replicas']} "
                       f"target {a['target_ongoing_requests']:g}/replica")
        else:
            scaling = f"fixed {r['target_replicas']}"
        lines.append(
            f"{r['application'] + '/' + r['deployment']:30.30} {r['status']:9.9} "
            f"{replicas:22.22} {gpus:>7} {flight:>9} {queued:>6} {depth:>8} {wait:>6}  "
            f"{scaling:32} {nodes}"
        )
    return "\n".join(lines)
