"""``python -m serve_app.cli.serve_launch run CONFIG``: ``serve run`` on a leaner local Ray.

``serve run`` starts a local Ray with ``ray.init()``'s defaults, which include the Ray
dashboard: eleven Python processes that together used about 3% of a core on an idle
laptop gateway (issue 20), for a web UI a ``make run`` user rarely opens. This starts the
local Ray first, without the dashboard unless ``TROUPE_RAY_DASHBOARD=1``, then hands over
to Serve's own ``serve run`` command, which keeps that Ray (it only starts one when none
is running) and shuts it down on Ctrl-C exactly as before. With ``RAY_ADDRESS`` set
(a running cluster) it is plain ``serve run``.

Without the dashboard, Ray's autoscaler monitor goes too (:func:`lean_head`: one local
node, nothing to scale). Ray's log monitor stays (it brings the replicas' output to the
terminal) but polls less when idle (:mod:`serve_app.cli.lean_log_monitor`), and Ray's API
server stays: ``ray.init`` starts it even with
``include_dashboard=False``, and without it the dashboard agent's event module, which
waits for the API server's address, logs an error every second. It runs ``--minimal``
(no self-metrics, loop-lag probe or Prometheus thread, which only the dashboard reads).
Every worker of that Ray starts with :data:`WORKER_SETUP_HOOK`, which slows uvicorn's
housekeeping tick in Serve's own proxy as the gateway does in its replica.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator

__all__ = ["LEAN_HEAD_SKIPS", "LEAN_LOG_MONITOR", "WORKER_SETUP_HOOK", "lean_head", "main"]

#: ``ray._private.node.Node`` methods that :func:`lean_head` turns into no-ops: the
#: autoscaler monitor (what ``ray start --no-monitor`` skips).
LEAN_HEAD_SKIPS = ("start_monitor",)


#: Run by every Ray worker of ``troupe run``'s local Ray as it starts (Ray's worker
#: process setup hook): slows uvicorn's 10 Hz housekeeping tick in Serve's proxy, which
#: Troupe's code does not otherwise reach (:mod:`serve_app.build.uvicorn_tick`).
WORKER_SETUP_HOOK = "serve_app.build.uvicorn_tick.worker_process_setup"

#: The script :func:`lean_head` starts in place of Ray's ``log_monitor.py``.
LEAN_LOG_MONITOR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "lean_log_monitor.py")


def _skipped(self: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for a head process that is not started (the node records none)."""
    return None


def _lean_starter(start: Callable[..., Any], log_monitor_type: str,
                  api_server_type: str) -> Callable[..., Any]:
    """``start`` (Ray's ``services.start_ray_process``), but a log monitor's command runs
    :data:`LEAN_LOG_MONITOR` with the same interpreter, flags and arguments, and an API
    server started without its web UI (``--disable-frontend``: no dashboard) runs
    ``--minimal``."""
    def start_ray_process(command: list[str], process_type: str, *args: Any,
                          **kwargs: Any) -> Any:
        if process_type == log_monitor_type and len(command) > 2 \
                and command[2].endswith("log_monitor.py"):
            command = [*command[:2], LEAN_LOG_MONITOR, *command[3:]]
        if process_type == api_server_type and "--disable-frontend" in command \
                and "--minimal" not in command:
            command = [*command, "--minimal"]
        return start(command, process_type, *args, **kwargs)
    return start_ray_process


@contextlib.contextmanager
def lean_head(node_cls: Any, services: Any = None) -> Iterator[None]:
    """While the block runs, a head node of ``node_cls`` starts without the processes
    named in :data:`LEAN_HEAD_SKIPS`, and (given Ray's ``services`` module) with
    :data:`LEAN_LOG_MONITOR` as its log monitor; both are restored afterwards.

    ``ray.init`` does not expose Ray's ``no_monitor`` (``RayParams``), and the monitor is
    started while ``ray.init`` builds the head node, so this wraps that one call. A Ray
    without one of these methods is left as it is.
    """
    saved = {name: node_cls.__dict__[name] for name in LEAN_HEAD_SKIPS
             if name in node_cls.__dict__}
    start = getattr(services, "start_ray_process", None)
    try:
        for name in saved:
            setattr(node_cls, name, _skipped)
        if start is not None:
            from ray._private import ray_constants

            services.start_ray_process = _lean_starter(
                start, ray_constants.PROCESS_TYPE_LOG_MONITOR,
                ray_constants.PROCESS_TYPE_DASHBOARD)
        yield
    finally:
        for name, method in saved.items():
            setattr(node_cls, name, method)
        if start is not None:
            services.start_ray_process = start


def main(argv: list[str]) -> int:
    from ray.serve.scripts import cli

    if not os.environ.get("RAY_ADDRESS"):
        import ray
        from ray._private import services
        from ray._private.node import Node
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
        from ray.serve._private.constants import SERVE_NAMESPACE

        # Where Ray's workers look for the hook that ``ray.init(runtime_env=
        # {"worker_process_setup_hook": ...})`` would set; in the environment the local
        # Ray's processes inherit, it costs nothing at a worker's start, where a
        # runtime_env made every worker wait on Ray's runtime-env agent (6 s more to
        # start the mock config). A hook the user set already wins.
        os.environ.setdefault(WORKER_PROCESS_SETUP_HOOK_ENV_VAR, WORKER_SETUP_HOOK)

        dashboard = os.environ.get("TROUPE_RAY_DASHBOARD") == "1"
        with contextlib.nullcontext() if dashboard else lean_head(Node, services):
            ray.init(namespace=SERVE_NAMESPACE, include_dashboard=dashboard)
    return cli.main(argv, prog_name="serve", standalone_mode=True) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
