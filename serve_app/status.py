"""``troupe status``: what runs where, per deployment.

Reads Serve's controller (replica states), Ray's actor table (which node each replica
runs on) and, when given, the Troupe config (resources and autoscaling targets), and the
gateway's ``/metrics`` (requests in flight per deployment, i.e. queued + running).
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any, Optional

from serve_app.config import TroupeSettings

__all__ = ["collect_status", "format_status", "in_flight_from_metrics"]

_REPLICA_NAME = re.compile(r"^SERVE_REPLICA::(?P<app>[^#]+)#(?P<deployment>[^#]+)#")


def _replica_nodes() -> dict[tuple[str, str], dict[str, int]]:
    """(app, deployment) -> {node ip: replicas alive there}, from Ray's actor table."""
    from ray._private import state as ray_state  # GCS-backed; works without the dashboard

    placed: dict[tuple[str, str], dict[str, int]] = {}
    for actor in ray_state.actors(actor_state_name="ALIVE").values():
        match = _REPLICA_NAME.match(actor.get("Name") or "")
        if not match:
            continue
        key = (match["app"], match["deployment"])
        ip = actor.get("Address", {}).get("IPAddress") or "?"
        placed.setdefault(key, {})
        placed[key][ip] = placed[key].get(ip, 0) + 1
    return placed


def in_flight_from_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """deployment -> requests in flight, from the gateway's Prometheus text (best effort)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "troupe_in_flight_requests":
            for sample in family.samples:
                out[sample.labels.get("deployment", "?")] = sample.value
    return out


def collect_status(
    settings: Optional[dict[str, TroupeSettings]] = None,
    in_flight: Optional[dict[str, float]] = None,
) -> list[dict[str, Any]]:
    """One row per deployment of every Serve application (Ray must be connected)."""
    from ray import serve

    configured: dict[tuple[str, str], Any] = {}
    for app_name, app_settings in (settings or {}).items():
        for model in app_settings.models:
            configured[(app_name, model.deployment_name)] = model.deployment
    placed = _replica_nodes()
    rows = []
    for app_name, app in sorted(serve.status().applications.items()):
        for dep_name, dep in sorted(app.deployments.items()):
            states = {str(getattr(s, "value", s)): n for s, n in (dep.replica_states or {}).items()}
            row: dict[str, Any] = {
                "application": app_name,
                "deployment": dep_name,
                "status": str(getattr(dep.status, "value", dep.status)),
                "replicas": states,
                "nodes": placed.get((app_name, dep_name), {}),
                "in_flight": (in_flight or {}).get(dep_name),
            }
            options = configured.get((app_name, dep_name))
            if options is not None:
                row["num_gpus"] = options.ray_actor_options.num_gpus
                row["num_cpus"] = options.ray_actor_options.num_cpus
                if options.autoscaling is not None:
                    a = options.autoscaling
                    row["autoscaling"] = {
                        "min": a.min_replicas,
                        "max": a.max_replicas,
                        "target_ongoing_requests": a.target_ongoing_requests,
                    }
                else:
                    row["autoscaling"] = None
                    row["target_replicas"] = options.num_replicas or 1
            rows.append(row)
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal."""
    header = f"{'APP/DEPLOYMENT':34} {'STATUS':10} {'REPLICAS':22} {'NODES':24} {'GPU':>4} {'IN-FLIGHT':>9}  SCALING"
    lines = [header]
    for r in rows:
        replicas = ",".join(f"{k.lower()}={v}" for k, v in sorted(r["replicas"].items())) or "-"
        nodes = ",".join(f"{ip}x{n}" for ip, n in sorted(r["nodes"].items())) or "-"
        gpus = "-" if "num_gpus" not in r else f"{r['num_gpus']:g}"
        flight = "-" if r["in_flight"] is None else f"{r['in_flight']:g}"
        if r.get("autoscaling"):
            a = r["autoscaling"]
            scaling = f"auto {a['min']}..{a['max']} target {a['target_ongoing_requests']:g}"
        elif "target_replicas" in r:
            scaling = f"fixed {r['target_replicas']}"
        else:
            scaling = "-"
        lines.append(
            f"{r['application'] + '/' + r['deployment']:34.34} {r['status']:10.10} "
            f"{replicas:22.22} {nodes:24.24} {gpus:>4} {flight:>9}  {scaling}"
        )
    return "\n".join(lines)
