"""Tokens per streamed chunk on the vLLM adapter (``stream_interval``, see vllm_stream):
a lone stream gets every token, a busy engine groups them, and the text, token counts and
first chunk a client reads stay what they are alone."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.engines.vllm_stream import RecentPeak, stream_interval, without_unknown_stream_interval
from tests.unit.vllm_fakes import chat, started_engine, vllm_config

TOKENS = [[f" t{i}"] for i in range(10)]  # ten engine steps of one token each


def chunks(outputs):
    return [(o.text, o.num_tokens) for o in outputs]


async def test_a_lone_stream_gets_every_token_as_it_is_made():
    engine, fake = await started_engine(script=TOKENS)
    outputs = [o async for o in engine.generate(chat(max_tokens=10))]

    assert [n for _, n in chunks(outputs)] == [1] * 10
    assert "stream_interval" not in fake.submitted[0].sampling_params.kwargs


async def test_under_load_chunks_grow_but_the_text_and_counts_stay_the_same():
    engine, fake = await started_engine(script=TOKENS)
    alone = [o async for o in engine.generate(chat("alone", max_tokens=10))]
    others = [engine.generate(chat(f"busy{i}", max_tokens=10)) for i in range(8)]
    for stream in others:  # eight streams running (each has its first token)
        await anext(stream)
    assert engine.active_requests() == 8

    loaded = [o async for o in engine.generate(chat("loaded", max_tokens=10))]
    for stream in others:
        await stream.aclose()

    # 1 + 8 // 4 = 3 tokens per chunk after the first; the rest with the finish.
    assert [n for _, n in chunks(loaded)] == [1, 3, 3, 3]
    assert loaded[0] == alone[0]  # the first token is not held back
    assert "".join(o.text for o in loaded) == "".join(o.text for o in alone)
    assert sum(o.num_tokens for o in loaded) == sum(o.num_tokens for o in alone) == 10
    assert loaded[-1].finish_reason == alone[-1].finish_reason == "stop"
    assert engine.active_requests() == 0


async def test_the_next_wave_after_a_busy_one_is_grouped_too():
    # Equal requests started together end together: the next one is admitted while none
    # runs, and still streams in chunks, since 8 ran at once a moment ago.
    engine, _ = await started_engine(script=TOKENS)
    wave = [engine.generate(chat(f"wave{i}", max_tokens=10)) for i in range(9)]
    for stream in wave:
        await anext(stream)
    for stream in wave:
        await stream.aclose()
    assert engine.active_requests() == 0

    after = [o async for o in engine.generate(chat("next", max_tokens=10))]
    assert [o.num_tokens for o in after] == [1, 3, 3, 3]


def test_the_recent_peak_holds_for_its_window_then_follows_the_load():
    now = [0.0]
    peak = RecentPeak(window_s=10.0, clock=lambda: now[0])
    assert [peak.update(n) for n in (0, 5, 15, 2)] == [0, 5, 15, 15]
    now[0] = 9.0
    assert peak.update(0) == 15
    now[0] = 10.5
    assert peak.update(1) == 1


async def test_a_configured_interval_applies_to_a_lone_stream_too():
    engine, _ = await started_engine(vllm_config(stream_interval=4), script=TOKENS)
    outputs = [o async for o in engine.generate(chat(max_tokens=10))]

    assert [n for _, n in chunks(outputs)] == [1, 4, 4, 1]
    assert "".join(o.text for o in outputs) == "".join(t for [t] in TOKENS)


def test_auto_adds_a_token_per_four_running_streams_up_to_eight():
    assert [stream_interval("auto", n) for n in (0, 1, 3, 4, 7, 8, 15, 16, 100)] == [
        1, 1, 1, 2, 2, 3, 4, 5, 8]
    assert stream_interval(2, 0) == stream_interval(2, 50) == 2


@pytest.mark.parametrize("bad", [0, 65, "fast"])
def test_an_out_of_range_interval_is_a_config_error_naming_it(bad):
    with pytest.raises(ValidationError, match="stream_interval"):
        vllm_config(stream_interval=bad)


def test_a_vllm_without_per_request_intervals_streams_every_token():
    class OldParams:  # vLLM < 0.11: a msgspec struct without the field
        __struct_fields__ = ("max_tokens", "temperature")

    class NewParams:
        __struct_fields__ = ("max_tokens", "stream_interval")

    kwargs = {"max_tokens": 8, "stream_interval": 3}
    assert without_unknown_stream_interval(kwargs, OldParams) == {"max_tokens": 8}
    assert without_unknown_stream_interval(kwargs, NewParams) == kwargs
    assert kwargs == {"max_tokens": 8, "stream_interval": 3}  # the caller's dict is kept
