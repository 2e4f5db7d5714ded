"""Session routing through real Serve (mock engine, two replicas): conversations stay on one
replica, different conversations spread over both, and one hot conversation spills over to
the idle replica instead of queueing on its own (issue 17)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import httpx
import pytest

PREFIX = "/sessions"
MODEL = "routed-mock"


@pytest.fixture(scope="module")
def url(serve_instance: int) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    args = {
        "models": [{
            "id": MODEL,
            "engine": {"type": "mock", "token_delay_ms": 25, "first_token_delay_ms": 0,
                       "ignore_eos": True},
            "deployment": {"num_replicas": 2, "max_ongoing_requests": 16,
                           "routing": {"policy": "session", "max_imbalance": 1},
                           "ray_actor_options": {"num_cpus": 0.05}},
        }],
        "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
        "metrics": {"enabled": False},
    }
    serve.run(build_app(args), name="sessions", route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{serve_instance}{PREFIX}"
    finally:
        serve.delete("sessions")


def replica_of(url: str, messages: list[dict[str, str]], max_tokens: int = 1,
               cache_key: Optional[str] = None) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
    if cache_key is not None:
        body["prompt_cache_key"] = cache_key
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.headers["x-troupe-replica"]


def conversation(i: int, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Conversation {i}: hello"}]
    for t in range(1, turns):
        messages += [{"role": "assistant", "content": f"answer {t}"},
                     {"role": "user", "content": f"follow-up {t}"}]
    return messages


def test_each_conversation_keeps_its_replica_and_conversations_spread(url: str) -> None:
    homes: dict[int, set[str]] = {}
    for turns in (1, 2, 3):
        for i in range(16):
            homes.setdefault(i, set()).add(replica_of(url, conversation(i, turns)))
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    # 16 conversations on one replica by chance: odds 2**-15.
    assert len(set().union(*homes.values())) == 2, homes


def test_prompt_cache_key_names_the_conversation(url: str) -> None:
    """Different openings with one ``prompt_cache_key`` share a replica."""
    seen = {replica_of(url, conversation(100 + i, 1), cache_key="shared-user-7")
            for i in range(8)}
    assert len(seen) == 1, seen


def test_a_hot_conversation_spills_over_to_the_idle_replica(url: str) -> None:
    """Eight concurrent 3-second requests of one conversation: with ``max_imbalance: 1``
    they may not all wait on the conversation's replica while the other one idles. (At 1 s
    each, a loaded machine once routed them so far apart that they never overlapped.)"""
    messages = conversation(999, 2)
    with ThreadPoolExecutor(8) as pool:
        replicas = list(pool.map(lambda _: replica_of(url, messages, max_tokens=120), range(8)))
    assert len(set(replicas)) == 2, replicas


def test_concurrent_requests_of_one_session_all_answer(url: str) -> None:
    """``n: 2`` fans one HTTP request out into two calls of one session at the same moment
    (they once stalled in Serve's router); several such requests at once, twice over."""
    def fan_out(i: int) -> int:
        body = {"model": MODEL, "messages": conversation(99, 1), "max_tokens": 1, "n": 2}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 200, response.text
        return len(response.json()["choices"])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(fan_out, range(8))) == [2] * 8
