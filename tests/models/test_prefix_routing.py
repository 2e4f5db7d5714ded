"""Prefix-aware routing on two real replicas of the bundled SmolLM2 (issue 17).

A multi-turn conversation keeps landing on one replica (``x-troupe-replica``), and its next
turn's prefill is served from that replica's prefix cache
(``usage.prompt_tokens_details.cached_tokens``), whether the client names the conversation
with OpenAI's ``prompt_cache_key`` or not (the gateway then keys it by its opening turns).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import pytest
from openai import OpenAI

pytestmark = pytest.mark.models

PREFIX = "/prefixroute"
MODEL = "smollm2-routed"
SYSTEM = ("You are a concise assistant for a travel agency. Answer in one short sentence, "
          "name the country when you name a city, and never invent prices.")


@pytest.fixture(scope="module")
def client(serve_instance: int) -> Iterator[OpenAI]:
    from ray import serve

    from serve_app.build.app import build_app

    args = {
        "models": [{
            "id": MODEL,
            "engine": {"type": "transformers", "num_threads": 1, "max_num_seqs": 4,
                       "prefix_cache_tokens": 4096},
            "deployment": {"num_replicas": 2, "max_ongoing_requests": 16,
                           "routing": {"policy": "session"},
                           "ray_actor_options": {"num_cpus": 0.5}},
        }],
        "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
        "metrics": {"enabled": False},
    }
    serve.run(build_app(args), name="prefixroute", route_prefix=PREFIX)
    try:
        yield OpenAI(base_url=f"http://127.0.0.1:{serve_instance}{PREFIX}/v1", api_key="unused",
                     max_retries=0, timeout=120)
    finally:
        serve.delete("prefixroute")


def turn(client: OpenAI, messages: list[dict[str, str]],
         cache_key: Optional[str] = None) -> tuple[str, str, Any]:
    """One unary turn: (replica, answer, usage)."""
    extra = {"prompt_cache_key": cache_key} if cache_key else {}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, **extra)  # type: ignore[arg-type]
    completion = raw.parse()
    return raw.headers["x-troupe-replica"], completion.choices[0].message.content, completion.usage


@pytest.mark.parametrize("cache_key", [None, "trip-42"])
def test_a_conversation_stays_on_its_replica_and_reuses_its_prefix(
    client: OpenAI, cache_key: Optional[str],
) -> None:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Where is Lisbon? ({cache_key or 'no key'})"}]
    replica, answer, first = turn(client, messages, cache_key)
    for question in ("And Porto?", "Which one is bigger?"):
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": question}]
        again, answer, usage = turn(client, messages, cache_key)
        assert again == replica
        assert usage.prompt_tokens > first.prompt_tokens
        cached = usage.prompt_tokens_details.cached_tokens
        # At least the system prompt and the first question were served from cache.
        assert cached >= first.prompt_tokens - 1, usage
