"""Gemini API wire types (``generateContent`` and friends): request models, parsed strictly.

Pure data: pydantic only, no gateway imports. Gemini's JSON is lowerCamelCase, but its
servers also take the proto field names (snake_case) and the official ``google-genai``
client sends a mix (``inlineData.mime_type``, ``parameters_json_schema``), so every model
accepts both spellings. As on Gemini itself, an unknown nested field is a 400 naming it.

Fields Gemini defines that Troupe cannot honour are typed here (so they are recognised)
and refused in :mod:`serve_app.protocol.gemini_translate` with a 400 naming the field;
``safetySettings`` is accepted and ignored (see :mod:`serve_app.protocol.field_policy`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "GENERATE_EXAMPLE",
    "EMBED_EXAMPLE",
    "camel_keys",
    "Blob",
    "FileData",
    "FunctionCallIn",
    "FunctionResponseIn",
    "Part",
    "Content",
    "GenerationConfig",
    "FunctionDeclaration",
    "Tool",
    "FunctionCallingConfig",
    "ToolConfig",
    "GenerateContentRequest",
    "CountTokensRequest",
    "EmbedContentRequest",
    "BatchEmbedRequest",
]

GENERATE_EXAMPLE = '{"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}'
EMBED_EXAMPLE = '{"content": {"parts": [{"text": "Hello"}]}}'


def camel_keys(body: dict[str, Any]) -> dict[str, Any]:
    """A request's top-level keys in Gemini's camelCase (``system_instruction`` too)."""
    return {to_camel(k) if "_" in k else k: v for k, v in body.items()}


class _Strict(BaseModel):
    """camelCase on the wire, snake_case accepted, unknown fields refused (as Gemini does)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Blob(_Strict):
    """``inlineData``: base64 bytes with their MIME type."""

    mime_type: str = Field(..., min_length=1)
    data: str = Field(..., min_length=1)
    display_name: Optional[str] = None


class FileData(_Strict):
    """``fileData``: a file by URI (only http(s) images are usable here)."""

    mime_type: Optional[str] = None
    file_uri: str = Field(..., min_length=1)
    display_name: Optional[str] = None


class FunctionCallIn(_Strict):
    """A model turn's call; Gemini's ``id`` is optional (Troupe synthesizes one)."""

    id: Optional[str] = Field(None, max_length=256)
    name: str = Field(..., min_length=1, max_length=128)
    args: Optional[dict[str, Any]] = None


class FunctionResponseIn(_Strict):
    """A user turn's answer to a call, matched by ``id`` or else by name."""

    id: Optional[str] = Field(None, max_length=256)
    name: str = Field(..., min_length=1, max_length=128)
    response: dict[str, Any]
    will_continue: Optional[bool] = None
    scheduling: Optional[str] = None
    parts: Optional[list[Any]] = None


class Part(_Strict):
    """One part of a turn: exactly one data field (``thought`` flags are metadata)."""

    text: Optional[str] = None
    inline_data: Optional[Blob] = None
    file_data: Optional[FileData] = None
    function_call: Optional[FunctionCallIn] = None
    function_response: Optional[FunctionResponseIn] = None
    executable_code: Optional[dict[str, Any]] = None
    code_execution_result: Optional[dict[str, Any]] = None
    video_metadata: Optional[dict[str, Any]] = None
    thought: Optional[bool] = None
    thought_signature: Optional[str] = None
    part_metadata: Optional[dict[str, Any]] = None
    media_resolution: Optional[Any] = None


class Content(_Strict):
    """A turn: ``user`` or ``model`` (a system instruction may omit the role)."""

    role: Optional[Literal["user", "model"]] = None
    parts: list[Part] = Field(default_factory=list)


class GenerationConfig(_Strict):
    """``generationConfig``: every field the Gemini API defines."""

    stop_sequences: Optional[list[str]] = Field(None, max_length=16)
    response_mime_type: Optional[str] = None
    response_schema: Optional[dict[str, Any]] = None
    response_json_schema: Optional[Any] = None
    candidate_count: Optional[int] = Field(None, ge=1, le=8)
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    response_logprobs: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    enable_enhanced_civic_answers: Optional[bool] = None
    response_modalities: Optional[list[str]] = None
    speech_config: Optional[dict[str, Any]] = None
    thinking_config: Optional[dict[str, Any]] = None
    image_config: Optional[dict[str, Any]] = None
    media_resolution: Optional[str] = None
    audio_timestamp: Optional[bool] = None
    routing_config: Optional[dict[str, Any]] = None
    model_selection_config: Optional[dict[str, Any]] = None

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty_stops(cls, value):
        if value and any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value


class FunctionDeclaration(_Strict):
    """A function the model may call: ``parameters`` (Gemini Schema) or ``parametersJsonSchema``."""

    name: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    parameters_json_schema: Optional[Any] = None
    response: Optional[dict[str, Any]] = None
    response_json_schema: Optional[Any] = None
    behavior: Optional[str] = None


class Tool(_Strict):
    """A tool entry; only ``functionDeclarations`` can be served (the rest are a 400)."""

    function_declarations: Optional[list[FunctionDeclaration]] = Field(None, max_length=128)
    google_search: Optional[dict[str, Any]] = None
    google_search_retrieval: Optional[dict[str, Any]] = None
    code_execution: Optional[dict[str, Any]] = None
    url_context: Optional[dict[str, Any]] = None
    computer_use: Optional[dict[str, Any]] = None
    file_search: Optional[dict[str, Any]] = None
    google_maps: Optional[dict[str, Any]] = None
    retrieval: Optional[dict[str, Any]] = None
    enterprise_web_search: Optional[dict[str, Any]] = None
    mcp_servers: Optional[list[Any]] = None


class FunctionCallingConfig(_Strict):
    mode: Optional[Literal["MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"]] = None
    allowed_function_names: Optional[list[str]] = None


class ToolConfig(_Strict):
    function_calling_config: Optional[FunctionCallingConfig] = None
    retrieval_config: Optional[dict[str, Any]] = None


class _Lenient(BaseModel):
    """Top level: camelCase keys, unknown ones accepted and logged (Troupe's house rule)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class GenerateContentRequest(_Lenient):
    """``models/{model}:generateContent`` / ``:streamGenerateContent``.

    ``start_within`` and ``service_tier`` are Troupe's tier routing fields (as on the other
    shapes); ``safetySettings`` and ``cachedContent`` are left to the field policy.
    """

    model: Optional[str] = None
    contents: list[Content] = Field(..., min_length=1)
    system_instruction: Optional[Content] = None
    generation_config: Optional[GenerationConfig] = None
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    tool_config: Optional[ToolConfig] = None
    start_within: Optional[str] = Field(None, max_length=32)
    service_tier: Optional[str] = Field(None, max_length=32)


class CountTokensRequest(_Lenient):
    """``:countTokens``: ``contents``, or a whole ``generateContentRequest``."""

    contents: Optional[list[Content]] = None
    generate_content_request: Optional[GenerateContentRequest] = None


class EmbedContentRequest(_Strict):
    """``:embedContent``, and one entry of ``:batchEmbedContents``."""

    model: Optional[str] = None
    content: Content
    task_type: Optional[str] = None
    title: Optional[str] = None
    output_dimensionality: Optional[int] = Field(None, ge=1)


class BatchEmbedRequest(_Lenient):
    requests: list[EmbedContentRequest] = Field(..., min_length=1, max_length=2048)
