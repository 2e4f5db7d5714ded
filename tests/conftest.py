"""Shared test helpers (all layers)."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import time
from typing import Callable, Iterator, TypeVar

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The fake OpenAI upstream's key: set before Ray starts, so model replicas inherit it.
FAKE_OPENAI_KEY = "sk-test-troupe-fake-0123456789"
os.environ["TROUPE_TEST_OPENAI_KEY"] = FAKE_OPENAI_KEY
# State a test does not place itself (stores of apps without a store_url) goes to a fresh
# folder, never to the user's ~/.local/share/troupe. Set before Ray starts: replicas inherit it.
os.environ["TROUPE_STATE_DIR"] = tempfile.mkdtemp(prefix="troupe-test-state-")
# Removed when the test process exits (after every fixture, Ray's included, has stopped).
atexit.register(shutil.rmtree, os.environ["TROUPE_STATE_DIR"], ignore_errors=True)

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")
        time.sleep(interval)
        last = predicate()
    return last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_instance() -> Iterator[int]:
    """A private local Ray (never an existing cluster) + Serve's proxy on a random port.

    Shared by the whole session: each test module deploys its own application on it.
    """
    import ray
    from ray import serve

    from serve_app.cli.serve_env import fast_ingress_environment, make_haproxy_folder

    # The suite runs behind the ingress `troupe run` gives users (Serve's HAProxy by
    # default). Its variables reach Ray's processes through the raylet, which copies this
    # environment at ray.init; they leave this process's environment afterwards, so a
    # `troupe run` a test starts picks free ports of its own.
    haproxy_folder = make_haproxy_folder()
    saved = dict(os.environ)
    os.environ.update(fast_ingress_environment(os.environ, haproxy_folder))
    try:
        ray.init(address="local", include_dashboard=False, num_cpus=4, log_to_driver=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy_folder, ignore_errors=True)


# The session's Troupe app (mock engines + a fake OpenAI upstream), shared by the
# integration and browser suites: deployed once, on first use.
from tests.mock_app import base_url, fake_openai, http, ledger_path  # noqa: E402,F401
