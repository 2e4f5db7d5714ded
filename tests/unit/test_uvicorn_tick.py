"""uvicorn's housekeeping tick, slowed where Troupe's processes serve HTTP (issue 20's idle
CPU): a real uvicorn server still answers with a fresh Date header, still stops when told,
and wakes less often."""

from __future__ import annotations

import asyncio
import socket
from email.utils import parsedate_to_datetime

import pytest
import uvicorn

from serve_app.build import uvicorn_tick
from serve_app.build.uvicorn_tick import TICK_ENV, slow_uvicorn_tick, tick_from_env


@pytest.fixture(autouse=True)
def _restore_uvicorn(monkeypatch):
    """The patch is process-wide; each test gets uvicorn's own loop back afterwards."""
    monkeypatch.setattr(uvicorn.Server, "main_loop", uvicorn.Server.main_loop)
    monkeypatch.delenv(TICK_ENV, raising=False)


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _get_date(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = (await reader.read()).decode()
    writer.close()
    (line,) = [x for x in raw.split("\r\n") if x.lower().startswith("date:")]
    return line.split(":", 1)[1].strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serve_and_probe() -> tuple[int, list[str], float]:
    """Runs a real uvicorn server for about 2.2 s; returns its ticks, two Date headers
    2.2 s apart, and how long it took to stop once told."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_app, host="127.0.0.1", port=port,
                                           log_level="critical", lifespan="off"))
    ticks = 0
    on_tick = server.on_tick

    async def counting(counter: int) -> bool:
        nonlocal ticks
        ticks += 1
        return await on_tick(counter)

    server.on_tick = counting  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    ticks = 0
    first = await _get_date(port)
    await asyncio.sleep(2.2)
    second = await _get_date(port)
    loop = asyncio.get_running_loop()
    told = loop.time()
    server.should_exit = True
    await asyncio.wait_for(task, timeout=5)
    return ticks, [first, second], loop.time() - told


def test_a_slowed_server_wakes_less_keeps_its_date_fresh_and_still_stops():
    assert slow_uvicorn_tick(0.4) is True
    ticks, dates, stop_s = asyncio.run(_serve_and_probe())
    assert 4 <= ticks <= 8  # uvicorn's own loop: about 22 in the same 2.2 s
    first, second = (parsedate_to_datetime(d) for d in dates)
    # A wake at most 0.4 s before each request: 1.8 s or more apart, so whole seconds
    # apart in the header too (it refreshes on every wake).
    assert (second - first).total_seconds() >= 1
    assert stop_s < 0.4 + 1.0  # noticed at the next wake, then uvicorn's own shutdown


def test_uvicorns_own_tick_for_comparison():
    ticks, _, _ = asyncio.run(_serve_and_probe())
    assert ticks >= 15


def test_slowing_twice_keeps_one_wrapper_and_the_latest_period():
    assert slow_uvicorn_tick(2.0) and slow_uvicorn_tick(0.5)
    loop_fn = uvicorn.Server.main_loop
    assert loop_fn.troupe_tick_s == 0.5
    assert not hasattr(loop_fn.troupe_original, "troupe_tick_s")


def test_a_server_of_another_shape_is_left_alone(monkeypatch):
    original = uvicorn.Server.main_loop
    monkeypatch.setattr(uvicorn.Server, "on_tick", lambda self, counter: False)
    assert slow_uvicorn_tick(1.0) is False
    assert uvicorn.Server.main_loop is original


@pytest.mark.parametrize("value, slowed", [("", True), ("2", True), ("0.1", False),
                                           ("0", False), ("soon", False)])
def test_the_environment_sets_the_period(monkeypatch, value, slowed):
    original = uvicorn.Server.main_loop
    if value:
        monkeypatch.setenv(TICK_ENV, value)
    assert tick_from_env() is slowed
    if slowed:
        expected = float(value) if value else uvicorn_tick.DEFAULT_TICK_S
        assert uvicorn.Server.main_loop.troupe_tick_s == expected
    else:
        assert uvicorn.Server.main_loop is original


def test_the_ray_worker_hook_never_fails_the_worker(monkeypatch):
    # Ray ends a worker whose setup hook raises: a uvicorn it cannot patch is no reason.
    def broken(period_s: float) -> bool:
        raise ImportError("no uvicorn here")

    monkeypatch.setattr(uvicorn_tick, "slow_uvicorn_tick", broken)
    uvicorn_tick.worker_process_setup()
