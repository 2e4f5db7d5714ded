"""Remote embeddings through the real Serve app: the official openai client → Troupe →
the fake OpenAI upstream's /v1/embeddings (model "remote-embed" in tests/mock_app.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from openai import OpenAI

from tests.fake_openai import fake_embedding


def test_openai_client_embeds_through_the_remote_provider(base_url: str, fake_openai: Any) -> None:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    texts = ["remote vectors one", "remote vectors two words"]
    before = len([r for r in fake_openai.requests if r.path.endswith("/embeddings")])
    # base64 (the client's default) and float both decode to the provider's vectors.
    for extra in ({}, {"encoding_format": "float"}):  # {}: the client asks base64, decodes it
        out = client.embeddings.create(model="remote-embed", input=texts, **extra)
        for item, text in zip(out.data, texts):
            want = np.asarray(fake_embedding(text), dtype=np.float32)
            np.testing.assert_allclose(item.embedding, want / np.linalg.norm(want), rtol=1e-5)
        assert out.usage.prompt_tokens == 7  # the upstream's count (words)
    # Concurrent callers (Serve may batch them into shared upstream calls): every input
    # reaches the upstream exactly once, with the configured key.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.embeddings.create(
            model="remote-embed", input=f"caller {i}", encoding_format="float"), range(16)))
    calls = [r for r in fake_openai.requests if r.path.endswith("/embeddings")][before:]
    sent = [t for c in calls for t in c.body["input"]]
    assert sorted(sent) == sorted(texts * 2 + [f"caller {i}" for i in range(16)])
    assert all(c.headers.get("Authorization", "").startswith("Bearer sk-test") for c in calls)
