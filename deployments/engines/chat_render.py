"""Chat messages with tools, tool calls and tool results, rendered for a local model's
chat template.

A template that renders tools itself (it mentions ``tools``, as Hermes/Qwen/Llama 3.1
templates do) gets them through ``apply_chat_template(..., tools=...)`` and assistant
turns with ``tool_calls`` in OpenAI's shape. A template that does not (the bundled
SmolLM2's) gets the Hermes convention written into the system turn by Troupe: the tools
as JSON inside ``<tools>``, calls as ``<tool_call>`` blocks, results as
``<tool_response>`` blocks in a user turn; the ``hermes`` parser reads the output back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from deployments.engines.base import check_prompt_ids
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import ChatMessage, GenerationRequest, NamedTool, ToolSpec

__all__ = ["template_renders_tools", "render_messages", "tool_json", "encode_prompt"]

_INSTRUCTIONS = (
    "You can call functions to help with the user's request. The functions are described "
    "as JSON inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
)
_AUTO = (
    "To call a function, answer with a JSON object holding its name and arguments inside "
    '<tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function name>, "arguments": '
    "<arguments object>}}\n</tool_call>\nOtherwise answer normally."
)
_REQUIRED = ('Answer with one function call as a JSON object: '
             '{"name": <function name>, "arguments": <arguments object>}.')
_NAMED = "Answer with the arguments of a call to the function {name} as one JSON object."


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(v) for v in template.values())
    return "tools" in template


def tool_json(tool: ToolSpec) -> dict:
    """A tool in OpenAI's function-tool shape (what templates and prompts show the model)."""
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _call_text(name: str, arguments: str) -> str:
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def _instructions(request: GenerationRequest) -> str:
    tools = "\n".join(json.dumps(tool_json(t), ensure_ascii=False) for t in request.tools)
    text = _INSTRUCTIONS.format(tools=tools)
    choice = request.tool_choice
    if isinstance(choice, NamedTool):
        return text + _NAMED.format(name=choice.name)
    return text + (_REQUIRED if choice == "required" else _AUTO)


def _hermes_turn(message: ChatMessage) -> dict:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.content}\n</tool_response>"}
    if message.role == "assistant" and message.tool_calls:
        calls = "\n".join(
            f"<tool_call>\n{_call_text(c.name, c.arguments)}\n</tool_call>" for c in message.tool_calls
        )
        return {"role": "assistant", "content": (message.content + "\n" if message.content else "") + calls}
    return {"role": message.role, "content": message.content}


def _native_turn(message: ChatMessage) -> dict:
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _loads(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        turn["name"] = message.name
    return turn


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_messages(request: GenerationRequest, tokenizer: Any) -> tuple[list[dict], Optional[list[dict]]]:
    """(template messages, ``tools`` for ``apply_chat_template`` or None) for ``request``.

    With ``tool_choice`` none the tools are not shown to the model at all.
    """
    messages = list(request.messages or [])
    use_tools = bool(request.tools) and request.tool_choice != "none"
    if template_renders_tools(tokenizer):
        turns = [_native_turn(m) for m in messages]
        if use_tools and request.tool_choice != "auto":
            # The template shows the tools; say how the constrained answer must look.
            _add_system(turns, _instructions(request).split("</tools>\n", 1)[1])
        return turns, ([tool_json(t) for t in request.tools] if use_tools else None)
    turns = [_hermes_turn(m) for m in messages]
    if use_tools:
        _add_system(turns, _instructions(request))
    return turns, None


def _add_system(turns: list[dict], text: str) -> None:
    """Append ``text`` to the system turn (one is inserted first when there is none)."""
    if turns and turns[0]["role"] == "system":
        turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + text}
    else:
        turns.insert(0, {"role": "system", "content": text})


def encode_prompt(tok: Any, request: GenerationRequest, model_id: str,
                  eos_ids: frozenset[int]) -> list[int]:
    """Prompt token ids for a local engine: checked ``prompt_token_ids``; the chat template
    for messages (tools rendered), and for a non-raw prompt to a chat model (one user turn);
    plain tokenization for a raw prompt."""
    if request.prompt_token_ids is not None:
        return check_prompt_ids(request.prompt_token_ids, len(tok))
    if request.messages is None and not request.raw and getattr(tok, "chat_template", None):
        # A native prompt for a chat model is one user turn (raw: sent as is).
        request = dataclasses.replace(request, messages=[ChatMessage("user", request.prompt or "")])
    if request.messages is not None:
        messages, tools = render_messages(request, tok)
        extra = {"tools": tools} if tools else {}
        try:
            enc = tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, **extra
            )
        except Exception as exc:  # jinja raises for roles/orders the template rejects
            raise InvalidRequest(
                f"The chat template of model {model_id!r} rejected these messages: {exc}",
                param="messages",
            ) from None
        ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    else:
        ids = tok(request.prompt or "", add_special_tokens=True)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    ids = [int(i) for i in ids]
    if not ids:  # an empty raw prompt: start from BOS (or EOS) like other engines do
        start = tok.bos_token_id if tok.bos_token_id is not None else min(eos_ids)
        ids = [int(start)]
    return ids
