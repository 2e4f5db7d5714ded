"""Session keys for replica routing and the engine queue gauges a replica pushes (no Ray)."""

from __future__ import annotations

from typing import Any

from serve_app.build.queue_gauges import QueueGauges
from serve_app.build.session_router import session_key
from serve_app.protocol.internal import ChatMessage, GenerationRequest


def chat(*turns: tuple[str, str], cache_key: str | None = None) -> GenerationRequest:
    request = GenerationRequest("r", messages=[ChatMessage(role, text) for role, text in turns])
    request.session_key = cache_key
    return request


def test_every_turn_of_a_conversation_has_the_key_of_its_opening() -> None:
    opening = [("system", "Be brief."), ("user", "Where is Lisbon?")]
    later = [*opening, ("assistant", "In Portugal."), ("user", "And Porto?")]
    assert session_key(chat(*opening)) == session_key(chat(*later))
    assert session_key(chat(*opening)) != session_key(chat(("system", "Be brief."),
                                                           ("user", "Where is Oslo?")))
    assert session_key(chat(*opening)) != session_key(chat(("system", "Be long."), opening[1]))


def test_prompt_cache_key_wins_over_the_opening() -> None:
    a = chat(("user", "one"), cache_key="user-7")
    b = chat(("user", "two"), cache_key="user-7")
    assert session_key(a) == session_key(b) == "key:user-7"


def test_raw_prompts_are_keyed_by_their_start_and_control_calls_by_nothing() -> None:
    head = "x" * 300
    assert session_key(GenerationRequest("r", prompt=head + "turn 1")) == \
        session_key(GenerationRequest("r", prompt=head + "turn 1 turn 2"))
    assert session_key(GenerationRequest("r", prompt_token_ids=(1, 2, 3))) is not None
    assert session_key("stats") is None
    assert session_key(GenerationRequest("r")) is None


async def test_queue_gauges_push_on_change_and_on_heartbeat() -> None:
    pushed: list[list[Any]] = []
    stats = {"queue_depth": 3, "running": 8, "expected_wait_s": 1.5}

    async def sink(samples: list[Any]) -> None:
        pushed.append(samples)

    labels = {"deployment": "LLM_a", "model": "a", "replica": "r1"}
    gauges = QueueGauges(lambda: stats, sink, labels, heartbeat_s=3600)
    await gauges.tick()
    await gauges.tick()  # unchanged, heartbeat not due: nothing sent
    assert pushed == [[("engine_queue_depth", labels, 3.0),
                       ("engine_running_requests", labels, 8.0),
                       ("engine_expected_wait_seconds", labels, 1.5)]]
    stats["queue_depth"] = 0
    await gauges.tick()
    assert pushed[-1][0] == ("engine_queue_depth", labels, 0.0)
    gauges.heartbeat_s = 0.0
    await gauges.tick()
    assert len(pushed) == 3


async def test_queue_gauges_of_an_unloaded_engine_are_zero() -> None:
    pushed: list[list[Any]] = []

    async def sink(samples: list[Any]) -> None:
        pushed.append(samples)

    await QueueGauges(lambda: None, sink, {"replica": "r"}).tick()
    assert [value for _, _, value in pushed[0]] == [0.0, 0.0, 0.0]


def test_the_session_router_serves_a_model_with_several_replicas_that_asks_for_it() -> None:
    from serve_app.build.replicas import model_deployment
    from serve_app.settings import TroupeSettings

    settings = TroupeSettings.model_validate({"models": [
        {"id": "two", "engine": {"type": "mock"},
         "deployment": {"num_replicas": 2, "routing": {"policy": "session"}}},
        {"id": "scaled", "engine": {"type": "mock"},
         "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3},
                        "routing": {"policy": "session"}}},
        {"id": "one", "engine": {"type": "mock"}, "deployment": {"routing": {"policy": "session"}}},
        {"id": "serve-own", "engine": {"type": "mock"}, "deployment": {"num_replicas": 2}},
    ]})

    def router(model_id: str) -> str:
        model = next(m for m in settings.models if m.id == model_id)
        # Serve keeps the router choice in the deployment's config (no public reader).
        config = model_deployment(model)._deployment_config.request_router_config
        return config.request_router_class.rsplit(".", 1)[-1].rsplit(":", 1)[-1]

    assert [router(m) for m in ("two", "scaled", "one", "serve-own")] == [
        "SessionAffinityRouter", "SessionAffinityRouter",
        "PowerOfTwoChoicesRequestRouter", "PowerOfTwoChoicesRequestRouter"]
