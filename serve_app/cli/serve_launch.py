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
terminal), and so does Ray's API server: ``ray.init`` starts it even with
``include_dashboard=False``, and without it the dashboard agent's event module, which
waits for the API server's address, logs an error every second.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

__all__ = ["LEAN_HEAD_SKIPS", "lean_head", "main"]

#: ``ray._private.node.Node`` methods that :func:`lean_head` turns into no-ops: the
#: autoscaler monitor (what ``ray start --no-monitor`` skips).
LEAN_HEAD_SKIPS = ("start_monitor",)


def _skipped(self: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for a head process that is not started (the node records none)."""
    return None


@contextlib.contextmanager
def lean_head(node_cls: Any) -> Iterator[None]:
    """While the block runs, a head node of ``node_cls`` starts without the processes
    named in :data:`LEAN_HEAD_SKIPS`; the class is restored afterwards.

    ``ray.init`` does not expose Ray's ``no_monitor`` (``RayParams``), and the monitor is
    started while ``ray.init`` builds the head node, so this wraps that one call. A Ray
    without one of these methods is left as it is.
    """
    saved = {name: node_cls.__dict__[name] for name in LEAN_HEAD_SKIPS
             if name in node_cls.__dict__}
    try:
        for name in saved:
            setattr(node_cls, name, _skipped)
        yield
    finally:
        for name, method in saved.items():
            setattr(node_cls, name, method)


def main(argv: list[str]) -> int:
    from ray.serve.scripts import cli

    if not os.environ.get("RAY_ADDRESS"):
        import ray
        from ray._private.node import Node
        from ray.serve._private.constants import SERVE_NAMESPACE

        dashboard = os.environ.get("TROUPE_RAY_DASHBOARD") == "1"
        with contextlib.nullcontext() if dashboard else lean_head(Node):
            ray.init(namespace=SERVE_NAMESPACE, include_dashboard=dashboard)
    return cli.main(argv, prog_name="serve", standalone_mode=True) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
