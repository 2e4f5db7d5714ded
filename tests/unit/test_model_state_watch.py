"""The model-state long poll: gateway replicas learn of an unload at once, and an idle
gateway makes no calls while nothing changes (issue 20: no idle chatter)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from actors.model_state import ModelStateActor
from serve_app.gateway.model_state import MemoryModelState

DEADLINE_S = 5.0


async def test_watch_without_a_version_answers_at_once():
    actor = ModelStateActor(None)
    actor.set("m", False)
    async with asyncio.timeout(DEADLINE_S):
        version, state = await actor.watch(None, 60)
    assert state == {"m": False}
    assert version == actor.version


async def test_watch_with_an_old_version_answers_at_once():
    actor = ModelStateActor(None)
    old = actor.version
    actor.set("m", False)
    async with asyncio.timeout(DEADLINE_S):
        version, state = await actor.watch(old, 60)
    assert version != old and state == {"m": False}


async def test_watch_waits_until_a_change_and_then_answers_with_it():
    actor = ModelStateActor(None)
    version, _ = await actor.watch(None, 60)
    waiter = asyncio.ensure_future(actor.watch(version, 60))
    await asyncio.sleep(0)  # let the watcher park
    assert not waiter.done()
    actor.set("m", False)
    async with asyncio.timeout(DEADLINE_S):
        new_version, state = await waiter
    assert new_version != version and state == {"m": False}


async def test_a_set_from_another_thread_wakes_the_watcher():
    actor = ModelStateActor(None)
    version, _ = await actor.watch(None, 60)
    waiter = asyncio.ensure_future(actor.watch(version, 60))
    await asyncio.sleep(0)
    thread = threading.Thread(target=actor.set, args=("m", True))
    thread.start()
    async with asyncio.timeout(DEADLINE_S):
        _, state = await waiter
    thread.join()
    assert state == {"m": True}


async def test_watch_times_out_with_the_same_version():
    actor = ModelStateActor(None)
    version, _ = await actor.watch(None, 60)
    async with asyncio.timeout(DEADLINE_S):
        again, state = await actor.watch(version, 0.01)
    assert again == version and state == {}


def test_a_restarted_actor_never_reuses_a_version(tmp_path):
    path = str(tmp_path / "model_state.json")
    first = ModelStateActor(path)
    first.set("m", False)
    handed_out = first.version
    restarted = ModelStateActor(path)
    restarted.set("m", True)
    assert restarted.version != handed_out
    assert restarted.get_all() == {"m": True}


@pytest.mark.parametrize("loaded", [False, True])
async def test_memory_backend_is_the_same_long_poll(loaded):
    backend = MemoryModelState()
    version, _ = await backend.watch(None, 60)
    waiter = asyncio.ensure_future(backend.watch(version, 60))
    await asyncio.sleep(0)
    await backend.set("m", loaded)
    async with asyncio.timeout(DEADLINE_S):
        _, state = await waiter
    assert state == {"m": loaded} == backend.state
