"""The ``openai-agents`` SDK's realtime agent against /v1/realtime (real Serve, mock engines).

The SDK's ``RealtimeModelConfig`` takes a ``url``, so a ``RealtimeAgent`` runs against
Troupe unchanged: it configures the session (its tools become realtime function tools),
the mock text model calls the tool the user names, the SDK runs the function and sends its
output back, and the next response answers in text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner

CALLS: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: The city to look up.
    """
    CALLS.append(city)
    return f"It is sunny and 21 degrees in {city or 'the city'}."


async def test_realtime_agent_calls_a_function_tool_and_answers(base_url: str) -> None:
    agent = RealtimeAgent(name="Weather", instructions="Answer weather questions with get_weather.",
                          tools=[get_weather])
    settings: Any = {
        "model_name": "mock-5ms", "modalities": ["text"],
        "input_audio_transcription": {"model": "mock-transcription"},
        "turn_detection": {"type": "server_vad"},
    }
    runner = RealtimeRunner(agent, config={"model_settings": settings, "tracing_disabled": True})
    url = base_url.replace("http://", "ws://") + "/v1/realtime?model=mock-5ms"
    session = await runner.run(model_config={"url": url, "api_key": "trp-unused",
                                             "initial_model_settings": settings})
    seen: list[Any] = []
    async with session:
        await session.send_message("What is the weather in Paris? Use get_weather.")
        async with asyncio.timeout(30):
            async for event in session:
                seen.append(event)
                assert event.type != "error", event
                if event.type == "raw_model_event" and event.data.type == "error":
                    raise AssertionError(event.data.error)
                if any(e.type == "tool_end" for e in seen) and assistant_text(seen):
                    break  # the answer after the tool's result
    start = next(e for e in seen if e.type == "tool_start")
    end = next(e for e in seen if e.type == "tool_end")
    assert start.tool.name == "get_weather" and end.output.startswith("It is sunny")
    assert len(CALLS) == 1  # called once, with arguments that parsed against its schema
    assert assistant_text(seen)


def assistant_text(events: list[Any]) -> str:
    """The newest assistant message's text in the session's history events."""
    for event in reversed(events):
        items = (event.history if event.type == "history_updated"
                 else [event.item] if event.type == "history_added" else [])
        for item in reversed(items):
            if getattr(item, "role", None) == "assistant":
                text = "".join(getattr(c, "text", None) or getattr(c, "transcript", None) or ""
                               for c in item.content)
                if text:
                    return text
    return ""
