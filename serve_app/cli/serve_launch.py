"""``python -m serve_app.cli.serve_launch run CONFIG``: ``serve run`` on a leaner local Ray.

``serve run`` starts a local Ray with ``ray.init()``'s defaults, which include the Ray
dashboard: eleven Python processes that together used about 3% of a core on an idle
laptop gateway (issue 20), for a web UI a ``make run`` user rarely opens. This starts the
local Ray first, without the dashboard unless ``TROUPE_RAY_DASHBOARD=1``, then hands over
to Serve's own ``serve run`` command, which keeps that Ray (it only starts one when none
is running) and shuts it down on Ctrl-C exactly as before. With ``RAY_ADDRESS`` set
(a running cluster) it is plain ``serve run``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    from ray.serve.scripts import cli

    if not os.environ.get("RAY_ADDRESS"):
        import ray
        from ray.serve._private.constants import SERVE_NAMESPACE

        ray.init(
            namespace=SERVE_NAMESPACE,
            include_dashboard=os.environ.get("TROUPE_RAY_DASHBOARD") == "1",
        )
    return cli.main(argv, prog_name="serve", standalone_mode=True) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
