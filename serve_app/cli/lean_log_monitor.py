"""Ray's log monitor for ``troupe run``: the same tailing, a slower idle poll.

Ray's log monitor reads every open worker log ten times a second and publishes new lines
to the driver, which prints them on the terminal. With no traffic that poll was about 0.4%
of a core on this 2-core machine (issue 20's idle budget is 5% for the whole gateway).
This runs Ray's own ``LogMonitor`` with one change: when a pass publishes nothing it waits
:data:`IDLE_WAIT_S` (0.5 s) instead of 0.1 s. While lines keep coming it reads without
waiting, as Ray's does, so a burst is never slowed; the first line after a quiet spell
reaches the terminal at most half a second later. No line is skipped: every file is read
on from where the last pass stopped.

:func:`serve_app.cli.serve_launch.lean_head` starts this file in place of Ray's
``log_monitor.py``, with the same arguments. It runs as a script in Ray's Python and
imports only Ray and the standard library.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ray._private.ray_constants as ray_constants
from ray._private import log_monitor, logging_utils
from ray._private.ray_logging import setup_component_logger
from ray._raylet import GcsClient  # type: ignore[attr-defined]  # Cython, no stubs

__all__ = ["IDLE_WAIT_S", "LeanLogMonitor", "main"]

#: Seconds a pass that published nothing waits before the next (Ray's: 0.1).
IDLE_WAIT_S = float(os.environ.get("TROUPE_LOG_MONITOR_IDLE_S", "0.5"))


class LeanLogMonitor(log_monitor.LogMonitor):
    """Ray's log monitor with a longer wait after a pass that found no new lines."""

    def run(self) -> None:
        """Ray's loop (new files every ``LOG_NAME_UPDATE_INTERVAL_S``, then every open
        file's new lines), waiting :data:`IDLE_WAIT_S` only after an empty pass."""
        last_updated = time.time()
        while True:
            if self.should_update_filenames(last_updated):
                self.update_log_filenames()
                last_updated = time.time()
            self.open_closed_files()
            if not self.check_log_files_and_publish_updates():
                time.sleep(IDLE_WAIT_S)


def _arguments(argv: list[str]) -> argparse.Namespace:
    """The arguments Ray's ``services.start_log_monitor`` passes; others are ignored."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gcs-address", required=True)
    parser.add_argument("--node-ip-address", required=True)
    parser.add_argument("--logs-dir", required=True)
    parser.add_argument("--session-dir", default="")
    parser.add_argument("--logging-level", default=ray_constants.LOGGER_LEVEL)
    parser.add_argument("--logging-format", default=ray_constants.LOGGER_FORMAT)
    parser.add_argument("--logging-filename", default=ray_constants.LOG_MONITOR_LOG_FILE_NAME)
    parser.add_argument("--logging-rotate-bytes", type=int, default=0)
    parser.add_argument("--logging-rotate-backup-count", type=int, default=0)
    parser.add_argument("--stdout-filepath", default="")
    parser.add_argument("--stderr-filepath", default="")
    return parser.parse_known_args(argv)[0]


def main() -> None:
    """Set up logging as Ray's log monitor does, then tail the node's logs."""
    args = _arguments(sys.argv[1:])
    setup_component_logger(
        logging_level=args.logging_level, logging_format=args.logging_format,
        log_dir=args.logs_dir, filename=args.logging_filename,
        max_bytes=args.logging_rotate_bytes, backup_count=args.logging_rotate_backup_count)
    logging_utils.redirect_stdout_stderr_if_needed(
        args.stdout_filepath, args.stderr_filepath,
        args.logging_rotate_bytes, args.logging_rotate_backup_count)
    gcs_client = GcsClient(address=args.gcs_address)
    LeanLogMonitor(args.node_ip_address, args.logs_dir, gcs_client,
                   log_monitor.is_proc_alive, gcs_address=args.gcs_address).run()


if __name__ == "__main__":
    main()
