"""The remote-provider matrix (tests/remote_matrix.py) in-process: the gateway app with
its engines in this process (no Ray) behind Starlette's test client, which the official
``openai`` and ``anthropic`` clients use as their HTTP client. The same table runs
through a real Serve app in tests/integration/test_remote_matrix.py."""

from __future__ import annotations

from typing import Any, Iterator

import openai
import pytest
from starlette.testclient import TestClient

from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.build.local_handle import LocalHandle
from serve_app.gateway.core import GatewayCore
from serve_app.settings import TroupeSettings
from tests.fake_openai import FakeOpenAI
from tests.fake_providers import FakeAnthropic, FakeGemini
from tests.remote_matrix import CASES, DOCUMENTED_400, PROVIDERS, SHAPES, check_400, engine, run_cell

KEY_ENV = "TROUPE_TEST_MATRIX_LOCAL_KEY"
BASE = "http://gw"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, "k-matrix-local")
    with FakeOpenAI() as oai, FakeAnthropic() as claude, FakeGemini() as gem:
        fakes = {"openai": oai, "anthropic": claude, "gemini": gem}
        settings = TroupeSettings.model_validate({"models": [
            {"id": f"m-{p}", "engine": engine(p, fakes, KEY_ENV), "vision": True}
            for p in PROVIDERS]})
        deployments = {m.id: LLMDeployment(m) for m in settings.models}
        core = GatewayCore(settings, {k: LocalHandle(v) for k, v in deployments.items()},
                           record=lambda event: None)
        with TestClient(build_fastapi_app(core), base_url=BASE) as tc:
            yield tc
            for deployment in deployments.values():
                tc.portal.call(deployment.shutdown)  # on the app's loop, where they started
    mp.undo()


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.name)
def shape(request: Any, client: TestClient) -> Any:
    return request.param(BASE, http_client=client)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_cell(shape: Any, case: str, provider: str, stream: bool) -> None:
    run_cell(shape, case, provider, stream)


@pytest.mark.parametrize("provider, extra, field", DOCUMENTED_400)
def test_documented_400(client: TestClient, provider: str, extra: dict[str, Any],
                        field: str) -> None:
    check_400(openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0,
                            http_client=client), provider, extra, field)
