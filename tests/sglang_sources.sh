#!/usr/bin/env bash
# SGLang's Python sources, without its GPU stack, for tests/test_sglang_layers.py: sglang 0.5.23
# and the pure-Python modules its linear layers, parameters and quantization registry import,
# installed --no-deps into one folder (SGLang itself pins torch 2.14.1 + CUDA 13 libraries,
# flashinfer and sgl-kernel: gigabytes that the CPU tests do not need). Then:
#   SPARSEQ_SGLANG_PATH=.cache/sglang-src python -m pytest tests/test_sglang_layers.py
# The test appends the folder to sys.path, so the main venv's own packages keep precedence.
#   DEST (first argument, default .cache/sglang-src); PYTHON (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.cache/sglang-src}
PY=${PYTHON:-.venv/bin/python}
if [ -f "$DEST/sglang/srt/layers/linear.py" ]; then
  echo "sglang sources already in $DEST"
  exit 0
fi
"$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$DEST" \
  sglang==0.5.23 apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 sentencepiece==0.2.1 \
  orjson pybase64 requests urllib3 certifi starlette msgspec pyzmq ipython traitlets aiohttp \
  multidict attrs yarl propcache aiohappyeyeballs aiosignal frozenlist torchvision dill loguru gguf
echo "sglang sources in $DEST ($(du -sh "$DEST" | cut -f1)): SPARSEQ_SGLANG_PATH=$DEST"
