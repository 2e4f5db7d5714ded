"""The environment ``troupe run`` gives ``serve run``: Ray and Serve tuned for a gateway.

Ray's defaults suit a busy cluster; on a laptop running ``make run`` they made an idle
gateway burn about a quarter of a core (issue 20: 27.6% of one core over 60 s with no
traffic, measured by ``bench/idle_cpu.py``). Most of it is periodic work in every Ray
process: the Serve controller's 10 Hz control loop, Serve's 10 Hz metrics export in every
replica and proxy, the raylet's 10 Hz resource reports and 4 Hz memory checks, and each
worker's metrics and task-event reports. The values below slow those ticks down where
nothing waits on them.

Every value is a default: a variable already set in the environment wins.
"""

from __future__ import annotations

from typing import Mapping

__all__ = ["IDLE_FRIENDLY_ENV", "serve_environment"]

IDLE_FRIENDLY_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Not set: RAY_SERVE_THROUGHPUT_OPTIMIZED. bench/users_bench.py measured it worse for
    # Troupe as users run it (throughput at c=32 x0.80, TTFT at c=16 x1.39, unary p50
    # x1.06; results/20261203T142550Z-users.md). If a user turns it on, direct ingress
    # would keep a stopping ingress replica open >= 30 s for external load balancers;
    # with none in front, Ctrl-C would wait that long for nothing.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Serve: the controller reconciles once a second, not ten times (deploys and scaling
    # react within 1 s; requests never wait on it), and replicas hand their cached
    # metrics to Ray every 2 s instead of every 100 ms.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000",
    # Ray core, per node: resource reports, memory-pressure checks, idle-worker reaping
    # and GC checks at 1 Hz, not 4-10 Hz (one node: nothing schedules on stale reports).
    "RAY_raylet_report_resources_period_milliseconds": "1000",
    "RAY_memory_monitor_refresh_ms": "1000",
    "RAY_kill_idle_workers_interval_ms": "1000",
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_gcs_pull_resource_loads_period_milliseconds": "5000",
    # Ray core, per worker: Ray's own metrics, task events and loop-lag probes feed the
    # Ray dashboard only (Troupe's /metrics comes from its metrics actor).
    "RAY_metrics_report_interval_ms": "30000",
    "RAY_task_events_report_interval_ms": "5000",
    "RAY_io_context_event_loop_lag_collection_interval_ms": "10000",
    "RAY_core_worker_internal_heartbeat_ms": "5000",
    # Per worker: Ray's event export ticks every second even with nothing to send; a
    # worker notices a dead raylet within 5 s rather than 1 s (then exits either way).
    "RAY_ray_events_report_interval_ms": "10000",
    "RAY_raylet_death_check_interval_milliseconds": "5000",
    # The raylet's object store checks disk space every 100 ms (for spilling, which a
    # gateway's small objects never need); once every 2 s still refuses a full disk.
    "RAY_local_fs_monitor_interval_ms": "2000",
    # Ray's own metrics (OpenTelemetry in every process, exported through the dashboard
    # agent) and per-handler event-loop stats feed only Ray's dashboard, Prometheus
    # endpoint and debug dumps; Troupe's /metrics does not use them. Set
    # RAY_enable_metrics_collection=1 with TROUPE_RAY_DASHBOARD=1 for Ray's graphs.
    "RAY_enable_metrics_collection": "0",
    "RAY_event_stats": "0",
    "RAY_io_context_monitor_probe_interval_ms": "10000",
    "RAY_debug_dump_period_milliseconds": "60000",
    # One node: the object manager's pull/push retry timer (objects move between nodes),
    # the GCS's raylet health checks and the workers' task-backlog reports (they feed the
    # autoscaler, which lean_head does not start) tick every 1-10 s, not every 0.1-3 s. A
    # worker that dies closes its socket; the periodic re-check for one that did not
    # runs every 5 s rather than every second.
    "RAY_object_manager_timer_freq_ms": "1000",
    "RAY_health_check_period_ms": "10000",
    "RAY_report_worker_backlog_interval_ms": "10000",
    "RAY_raylet_check_for_unexpected_worker_disconnect_interval_ms": "5000",
    # Ray's dashboard agent (started even without the dashboard) checks every 0.4 s
    # that its raylet lives and collects per-process stats for the dashboard every 5 s.
    "RAY_DASHBOARD_AGENT_CHECK_PARENT_INTERVAL_S": "2",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
    # Ray starts its workers at nice 15 (batch jobs yield to its daemons). Troupe's workers
    # are the service: the proxy, the gateway, the model replicas and the engine processes
    # they spawn (vLLM's engine core and CPU worker inherit it). At nice 15 any nice-0
    # process on the machine takes ~28x their CPU share; ``vllm serve`` runs at nice 0.
    "RAY_worker_niceness": "0",
    # Ray's log monitor (it streams the replicas' output to this terminal) globbed the logs
    # folder for new files ten times a second; with the threshold at 0 it looks for new
    # files every 5 s (a new replica's first lines arrive up to 5 s later; none are lost:
    # a new file is read from its start). How often it reads the open ones when idle is
    # serve_app/cli/lean_log_monitor.py's IDLE_WAIT_S.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
}


def serve_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus every default of :data:`IDLE_FRIENDLY_ENV` that ``base`` lacks."""
    env = dict(base)
    for key, value in IDLE_FRIENDLY_ENV.items():
        env.setdefault(key, value)
    return env
