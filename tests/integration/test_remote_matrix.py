"""Any caller shape to any provider through a real Serve app (deployed once for the
module): the table in tests/remote_matrix.py, caller shapes (chat completions and
Responses with the ``openai`` client, Messages with ``anthropic``, Gemini's
generateContent with ``google-genai``) × OpenAI, Azure,
Anthropic and Gemini fakes × {text, tool call round trip, json_schema, image input} ×
{stream, non-stream}, plus the documented 400s."""

from __future__ import annotations

import os
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.fake_openai import FakeOpenAI
from tests.fake_providers import FakeAnthropic, FakeGemini
from tests.remote_matrix import CASES, DOCUMENTED_400, PROVIDERS, SHAPES, check_400, engine, run_cell

KEY_ENV = "TROUPE_TEST_MATRIX_KEY"
os.environ[KEY_ENV] = "k-matrix"  # set at import, before the session's Ray starts


@pytest.fixture(scope="module")
def url(serve_instance: int) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    with FakeOpenAI() as oai, FakeAnthropic() as claude, FakeGemini() as gem:
        fakes = {"openai": oai, "anthropic": claude, "gemini": gem}
        args = {
            "models": [{"id": f"m-{p}", "engine": engine(p, fakes, KEY_ENV), "vision": True,
                        "deployment": {"ray_actor_options": {"num_cpus": 0.05}}}
                       for p in PROVIDERS],
            "gateway": {"ray_actor_options": {"num_cpus": 0.2}},
            "metrics": {"enabled": False},  # the session's shared app owns the metrics actor
            # Its own session actor: the shared one knows only the first app's credentials.
            "session": {"actor_name": "troupe-session-matrix"},
        }
        serve.run(build_app(args), name="matrix", route_prefix="/matrix")
        base = f"http://127.0.0.1:{serve_instance}/matrix"
        assert httpx.get(base + "/health", timeout=60).status_code == 200
        yield base
        serve.delete("matrix")


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.name)
def shape(request: Any, url: str) -> Any:
    return request.param(url)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_cell(shape: Any, case: str, provider: str, stream: bool) -> None:
    run_cell(shape, case, provider, stream)


@pytest.mark.parametrize("provider, extra, field", DOCUMENTED_400)
def test_documented_400(url: str, provider: str, extra: dict[str, Any], field: str) -> None:
    check_400(openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0),
              provider, extra, field)
