"""The realtime session state machine, with fake models and a loudness VAD (no Ray)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.unit.realtime_fakes import Client, FakeModels, silence, tone

PTT = {"audio": {"input": {"turn_detection": None}}}


async def test_session_created_then_update_and_a_bad_update_changes_nothing() -> None:
    c = Client()
    await c.session.start()
    created = c.of("session.created")[0]["session"]
    assert created["model"] == "llm" and created["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    await c.send({"type": "session.update", "session": {"output_modalities": ["text"],
                                                        "instructions": "Be terse."}})
    updated = c.of("session.updated")[0]["session"]
    assert updated["output_modalities"] == ["text"] and updated["instructions"] == "Be terse."
    await c.send({"type": "session.update", "event_id": "ev1",
                  "session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}}})
    err = c.of("error")[0]["error"]
    assert err["param"] == "session.audio.input.turn_detection.threshold" and err["event_id"] == "ev1"
    assert c.session.config.audio.input.turn_detection.threshold == 0.5
    assert c.session.config.output_modalities == ["text"]


async def test_push_to_talk_turn_gives_transcript_then_spoken_answer() -> None:
    c = Client(**PTT)
    await c.append_pcm(tone(0.5))
    assert not c.of("input_audio_buffer.speech_started")  # no VAD in push-to-talk
    await c.send({"type": "input_audio_buffer.commit"})
    done = await c.wait_for("conversation.item.input_audio_transcription.completed")
    assert done["transcript"] == "what is the capital of france"
    assert c.models.heard == [(24000, 24000)]  # 0.5 s of 24 kHz PCM16 reached the ASR
    await c.send({"type": "response.create"})
    final = await c.wait_for("response.done")
    kinds = c.types()
    order = ["response.created", "response.output_item.added", "response.content_part.added",
             "response.output_audio_transcript.delta", "response.output_audio.delta",
             "response.output_audio.done", "response.output_audio_transcript.done",
             "response.content_part.done", "response.output_item.done", "response.done"]
    assert [k for k in kinds if k in order and k not in order[3:5]] == [o for o in order if o not in order[3:5]]
    assert kinds.index("response.output_audio.delta") < kinds.index("response.output_audio.done")
    assert c.of("response.content_part.added")[0]["part"] == {"type": "audio", "transcript": ""}
    assert c.of("response.content_part.done")[0]["part"]["type"] == "audio"  # the events' part types
    assert final["response"]["output"][0]["content"][0]["type"] == "output_audio"  # the item's
    transcript = c.of("response.output_audio_transcript.done")[0]["transcript"]
    assert transcript == "Paris is the capital. It is in France."
    audio = b"".join(base64.b64decode(e["delta"]) for e in c.of("response.output_audio.delta"))
    # two sentences of 4 and 4 words, 0.1 s a word, resampled from 22.05 kHz to 24 kHz
    assert abs(len(audio) / 2 / 24000 - 0.8) < 0.01
    response = final["response"]
    assert response["status"] == "completed"
    assert response["usage"]["input_tokens"] == 7 and response["usage"]["output_tokens"] == 8
    assert response["troupe"]["audio_in_seconds"] == 0.5
    assert response["troupe"]["ttfa_ms"] is not None
    # the answer joins the conversation, and the next prompt carries both turns
    assert [i["role"] for i in c.session.conversation.items] == ["user", "assistant"]
    assert c.models.prompts[0][-1].content == "what is the capital of france"


async def test_server_vad_commits_at_end_of_speech_and_answers() -> None:
    c = Client()
    await c.append_pcm(silence(1.0) + tone(0.6) + silence(0.8))
    started = c.of("input_audio_buffer.speech_started")[0]
    stopped = c.of("input_audio_buffer.speech_stopped")[0]
    # speech at 1000 ms, minus the 300 ms prefix padding; stopped when the tone ended
    assert 650 <= started["audio_start_ms"] <= 736
    assert 1580 <= stopped["audio_end_ms"] <= 1650
    assert started["item_id"] == stopped["item_id"] == c.of("input_audio_buffer.committed")[0]["item_id"]
    await c.wait_for("response.done")
    heard_bytes, rate = c.models.heard[0]
    assert 0.85 <= heard_bytes / 2 / rate <= 1.6  # padding + speech + some of the silence
    assert c.of("response.done")[0]["response"]["status"] == "completed"


async def test_text_only_session_streams_text() -> None:
    c = Client(output_modalities=["text"], **PTT)
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]}})
    await c.send({"type": "response.create"})
    done = await c.wait_for("response.done")
    assert "response.output_audio.delta" not in c.types()
    assert "".join(e["delta"] for e in c.of("response.output_text.delta")) == c.models.answer
    assert c.of("response.output_text.done")[0]["text"] == c.models.answer
    assert done["response"]["output"][0]["content"][0]["type"] == "output_text"
    assert c.models.active == {"asr": 0, "llm": 0, "tts": 0}


@pytest.mark.parametrize("fmt,in_codec", [("audio/pcmu", "ulaw"), ("audio/pcma", "alaw")])
async def test_g711_in_and_out(fmt: str, in_codec: str) -> None:
    from serve_app.realtime.audio import FORMATS

    c = Client(audio={"input": {"format": {"type": fmt}, "turn_detection": None},
                      "output": {"format": {"type": fmt}}})
    g711 = FORMATS[fmt].from_pcm16(tone(0.4, rate=8000))
    await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(g711).decode()})
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    await c.wait_for("response.done")
    assert c.models.heard == [(6400, 8000)]  # decoded to 16-bit PCM at 8 kHz
    audio = b"".join(base64.b64decode(e["delta"]) for e in c.of("response.output_audio.delta"))
    assert abs(len(audio) / 8000 - 0.8) < 0.01  # one byte a sample at 8 kHz
    pcm = np.frombuffer(FORMATS[fmt].to_pcm16(audio), dtype="<i2")
    assert np.abs(pcm).max() > 4000  # the tone survived encoding


async def test_bad_input_gets_errors_and_the_session_stays_usable() -> None:
    c = Client(**PTT)
    bad = [
        ({"type": "input_audio_buffer.explode"}, "invalid_event_type", "type"),
        ({"no": "type"}, "invalid_request", "type"),
        (["not", "an", "object"], "invalid_request", "type"),
        ({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}, "invalid_audio", "audio"),
        ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}, "invalid_audio", "audio"),
        ({"type": "input_audio_buffer.append", "audio": 42}, "invalid_request", "audio"),
        ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty", "audio"),
        ({"type": "response.cancel"}, "response_cancel_not_active", "response_id"),
        ({"type": "conversation.item.delete", "item_id": "nope"}, "item_not_found", "item_id"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "output_text", "text": "x"}]}},
         "invalid_request", "item.content[0].type"),
        ({"type": "response.create", "response": {"output_modalities": ["video"]}},
         "invalid_request", "response.output_modalities.0"),
        ({"type": "session.update", "session": {"tools": [{"type": "mcp", "server_label": "f"}]}},
         "invalid_request", "session.tools.0.type"),
        ({"type": "session.update", "session": {"tool_choice": {"type": "function", "name": "f"}}},
         "invalid_request", "session.tool_choice"),
        ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "semantic_vad"}}}}}, "invalid_request", "session.audio.input.turn_detection.type"),
    ]
    for n, (event, code, param) in enumerate(bad, start=1):
        await c.send(event)
        assert len(c.of("error")) == n, event
        err = c.of("error")[-1]["error"]
        assert (err["code"], err["param"]) == (code, param), (event, err)
    # oversize: the buffer holds 5 s here; 6 s is refused whole, what was there stays
    await c.append_pcm(tone(0.5))
    await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(tone(6.0)).decode()})
    assert c.of("error")[-1]["error"]["code"] == "input_audio_buffer_full"
    assert c.session.input.ms == 500
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    assert (await c.wait_for("response.done"))["response"]["status"] == "completed"


async def test_barge_in_cancels_the_answer_and_truncates_it_at_what_was_played() -> None:
    models = FakeModels(answer=" ".join(["Word."] * 400), token_delay_s=0.01)
    c = Client(models)
    await c.append_pcm(silence(0.3) + tone(0.5) + silence(0.7))
    await c.wait_for("response.output_audio.delta")
    assert models.active["llm"] == 1
    await c.append_pcm(tone(0.3))  # the user speaks again while the answer plays
    assert len(c.of("input_audio_buffer.speech_started")) == 2
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert models.active == {"asr": 0, "llm": 0, "tts": 0}  # the engines' work stopped
    truncated = c.of("conversation.item.truncated")[0]
    run_item = done["output"][0]
    assert truncated["item_id"] == run_item["id"] and run_item["status"] == "incomplete"
    sent_ms = sum(len(base64.b64decode(e["delta"])) for e in c.of("response.output_audio.delta")) // 48
    assert 0 <= truncated["audio_end_ms"] <= sent_ms
    stored = c.session.conversation.get(run_item["id"])
    # only the words whose audio was played stay in the conversation
    assert len(stored["content"][0]["transcript"]) < len(c.of("response.output_audio_transcript.done")[0]["transcript"])


async def test_response_cancel_by_client() -> None:
    models = FakeModels(answer=" ".join(["word"] * 400), token_delay_s=0.01)
    c = Client(models, output_modalities=["text"], **PTT)
    await c.send({"type": "response.create"})
    await c.wait_for("response.output_text.delta")
    await c.send({"type": "response.create"})
    assert c.of("error")[-1]["error"]["code"] == "conversation_already_has_active_response"
    await c.send({"type": "response.cancel"})
    done = await c.wait_for("response.done")
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    assert models.active["llm"] == 0


async def test_items_create_delete_retrieve_truncate() -> None:
    c = Client(**PTT)
    for text in ("one", "two"):
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    first, second = (i["id"] for i in c.session.conversation.items)
    await c.send({"type": "conversation.item.create", "previous_item_id": "root", "item": {
        "id": "sys1", "type": "message", "role": "system", "content": [{"type": "input_text", "text": "zero"}]}})
    assert [i["id"] for i in c.session.conversation.items] == ["sys1", first, second]
    await c.send({"type": "conversation.item.delete", "item_id": first})
    assert c.of("conversation.item.deleted")[0]["item_id"] == first
    await c.send({"type": "conversation.item.retrieve", "item_id": second})
    assert c.of("conversation.item.retrieved")[0]["item"]["content"][0]["text"] == "two"
    await c.send({"type": "response.create"})
    done = await c.wait_for("response.done")
    answer = done["response"]["output"][0]["id"]
    await c.send({"type": "conversation.item.truncate", "item_id": answer, "content_index": 0,
                  "audio_end_ms": 400})
    assert c.of("conversation.item.truncated")[0]["audio_end_ms"] == 400
    assert c.session.conversation.get(answer)["content"][0]["transcript"] == "Paris is the capital."
    await c.send({"type": "conversation.item.truncate", "item_id": answer, "content_index": 0,
                  "audio_end_ms": 99999})
    assert c.of("error")[-1]["error"]["param"] == "audio_end_ms"
    assert [m.content for m in c.models.prompts[0]][1:] == ["zero", "two"]


async def test_user_audio_item_is_transcribed_and_answered() -> None:
    c = Client(**PTT)
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_audio", "audio": base64.b64encode(tone(0.3)).decode()}]}})
    done = await c.wait_for("conversation.item.input_audio_transcription.completed")
    assert done["transcript"] == "what is the capital of france"
    assert c.models.heard == [(14400, 24000)]
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "%%%"}]}})
    assert c.of("error")[-1]["error"]["param"] == "item.content[0].audio"
    await c.send({"type": "response.create"})
    assert (await c.wait_for("response.done"))["response"]["status"] == "completed"


async def test_speech_while_the_answer_waits_for_its_transcript_drops_that_answer() -> None:
    class SlowEars(FakeModels):
        def __init__(self) -> None:
            super().__init__()
            import asyncio

            self.release = asyncio.Event()

        async def transcribe(self, *args, **kwargs) -> str:  # type: ignore[override]
            await self.release.wait()
            return await super().transcribe(*args, **kwargs)

    models = SlowEars()
    c = Client(models)
    await c.append_pcm(silence(0.3) + tone(0.5) + silence(0.7))
    assert c.session.response_task is not None and c.session.response is None
    await c.append_pcm(tone(0.5) + silence(0.7))  # a second turn before the first was heard
    models.release.set()
    done = await c.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    assert len(c.of("response.created")) == 1  # one answer, to both turns
    assert [m.role for m in models.prompts[0]][1:] == ["user", "user"]


async def test_audio_formats_accept_beta_names_and_refuse_other_rates() -> None:
    c = Client(**PTT)
    await c.send({"type": "session.update", "session": {"audio": {"input": {"format": "g711_ulaw"}}}})
    assert c.of("session.updated")[-1]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu", "rate": 8000}
    await c.send({"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}})
    err = c.of("error")[-1]["error"]
    assert err["param"] == "session.audio.output.format" and "24000" in err["message"]
    await c.send({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}})
    assert c.of("error")[-1]["error"]["param"] == "session.audio.input.format"
    assert c.session.config.input_format.type == "audio/pcmu"  # the bad updates changed nothing


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


async def test_function_call_then_its_output_continues_the_conversation() -> None:
    c = Client(output_modalities=["text"], tools=[WEATHER], tool_choice="required", **PTT)
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}})
    await c.send({"type": "response.create"})
    done = (await c.wait_for("response.done"))["response"]
    sent = c.models.requests[0]
    assert [t.name for t in sent.tools] == ["get_weather"] and sent.tool_choice == "required"
    added = c.of("response.output_item.added")[0]
    assert added["item"]["type"] == "function_call" and added["item"]["name"] == "get_weather"
    call_id = added["item"]["call_id"]
    deltas = c.of("response.function_call_arguments.delta")
    assert len(deltas) == 2 and {d["call_id"] for d in deltas} == {call_id}
    args_done = c.of("response.function_call_arguments.done")[0]
    assert args_done["name"] == "get_weather" and args_done["arguments"] == '{"city": "Paris"}'
    assert "".join(d["delta"] for d in deltas) == args_done["arguments"]
    assert c.of("response.output_item.done")[0]["item"]["status"] == "completed"
    assert not c.of("response.output_text.delta")  # a call only: no message item
    assert done["status"] == "completed"
    assert [(o["type"], o["call_id"], o["arguments"]) for o in done["output"]] == [
        ("function_call", call_id, '{"city": "Paris"}')]
    # the caller runs the tool and sends its output; the next answer sees both turns
    await c.send({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": call_id, "output": '{"temp_c": 21}'}})
    await c.send({"type": "response.create", "response": {"tool_choice": "auto"}})
    await c.wait_for("response.done", 2)
    follow = c.models.requests[1].messages
    assert [m.role for m in follow[-3:]] == ["user", "assistant", "tool"]
    assert follow[-2].tool_calls[0].id == call_id and follow[-2].tool_calls[0].arguments == '{"city": "Paris"}'
    assert follow[-1].tool_call_id == call_id and follow[-1].content == '{"temp_c": 21}'
    assert c.of("response.output_text.done")[0]["text"] == "Paris is the capital. It is in France."
    # each response handed its figures to the ledger, under its own text-model request id
    assert len({rid for rid, _ in c.models.metered}) == 2


async def test_bad_tool_items_and_choices_are_errors_naming_the_field() -> None:
    c = Client(output_modalities=["text"], tools=[WEATHER], **PTT)
    await c.send({"type": "conversation.item.create", "item": {"type": "function_call_output",
                                                               "output": "x"}})
    assert c.of("error")[-1]["error"]["param"] == "item.call_id"
    await c.send({"type": "response.create", "response": {"tool_choice": {"type": "function",
                                                                          "name": "nope"}}})
    err = c.of("error")[-1]["error"]
    assert err["param"] == "response.tool_choice" and "nope" in err["message"]
    await c.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad"}}}}})
    assert "semantic_vad" in c.of("error")[-1]["error"]["message"]
    assert c.session.config.audio.input.turn_detection is None  # unchanged: push-to-talk
