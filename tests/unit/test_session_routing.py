"""Session keys for replica routing (no Ray)."""

from __future__ import annotations

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
