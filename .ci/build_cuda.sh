#!/usr/bin/env bash
# CI: build the CUDA extensions (sparseq._C for sm_80, sparseq._C_sm90a for sm_90a) and the CPU
# one (sparseq._C_cpu) on a CPU-only machine, load them, and check that every CUDA op is registered. Nothing runs on a
# GPU here. Inputs: VENV (a venv with torch 2.14.1 + nvidia-cutlass), CUDA_HOME (default the
# CUDA 13 toolkit; the nvcc on PATH may be a wrapper), MAX_JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SPARSEQ_CUDA_ARCHS=${SPARSEQ_CUDA_ARCHS:-80;90a}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "build_cuda: no nvcc at CUDA_HOME=$CUDA_HOME" >&2
  exit 1
fi
"$VENV/bin/python" -c "import cutlass_library" 2>/dev/null || {
  echo "build_cuda: nvidia-cutlass is not installed in $VENV (pip install nvidia-cutlass==4.2.0.0)" >&2
  exit 1
}

# Cache the built extensions by the hash of everything that goes into them, so that a clean
# checkout on the same machine reuses them (SPARSEQ_BUILD_CACHE=off disables it).
CACHE_ROOT=${SPARSEQ_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparseq-build}
key=$( { "$VENV/bin/python" -c "import torch; print(torch.__version__, torch.version.cuda)";
         echo "$SPARSEQ_CUDA_ARCHS"; "$CUDA_HOME/bin/nvcc" --version | tail -n 1;
         git ls-files -s csrc;
         sed -n '/^TORCH_TARGET_VERSION/p;/^PY_LIMITED_API/p;/^EXTENSIONS = {/,/^}/p;/^def _cutlass_includes/,/^def _cmdclass/p' setup.py; } | sha256sum | cut -c1-16)
cache="$CACHE_ROOT/$key"
start=$(date +%s)
# One build: the binary wheel (cp310-abi3, both extensions, the Triton kernels) in dist/; the
# editable install of the checkout takes its extensions from that wheel. Cached: the compiled
# extensions, packed into a wheel of this checkout's Python code without compiling.
rm -f sparseq/_C*.so dist/sparseq-*.whl
if [ "$CACHE_ROOT" != off ] && ls "$cache"/_C*.abi3.so >/dev/null 2>&1; then
  cp "$cache"/_C*.abi3.so sparseq/
  SPARSEQ_PREBUILT_EXTENSIONS=1 "$VENV/bin/pip" wheel --disable-pip-version-check -q --no-build-isolation --no-deps -w dist .
  echo "build_cuda: reused the extensions cached in $cache"
else
  "$VENV/bin/pip" wheel --disable-pip-version-check -q --no-build-isolation --no-deps -w dist .
  echo "build_cuda: wheel built in $(( $(date +%s) - start )) s with MAX_JOBS=$MAX_JOBS"
fi
wheel=$(ls dist/sparseq-*-cp310-abi3-linux_*.whl)
echo "build_cuda: $wheel"
"$VENV/bin/python" - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    libs = [n for n in whl.namelist() if n.startswith("sparseq/_C") and n.endswith(".so")]
    assert sorted(libs) == ["sparseq/_C.abi3.so", "sparseq/_C_cpu.abi3.so", "sparseq/_C_sm90a.abi3.so"], libs
    assert any(n.startswith("sparseq/kernels/") for n in whl.namelist()), "no Triton kernels in the wheel"
    whl.extractall(".", libs)
print(f"build_cuda: extensions {libs} taken from the wheel")
PY
if [ "$CACHE_ROOT" != off ] && ! ls "$cache"/_C*.abi3.so >/dev/null 2>&1; then
  mkdir -p "$cache" && cp sparseq/_C*.abi3.so "$cache"/ && echo "build_cuda: cached in $cache"
fi
SPARSEQ_SKIP_CUDA_BUILD=1 SPARSEQ_SKIP_CPU_BUILD=1 "$VENV/bin/pip" install --disable-pip-version-check -q --no-build-isolation --no-deps -e .

"$VENV/bin/python" - <<'PY'
import importlib

import torch

import sparseq.cuda_ops as cuda_ops  # the schemas must exist before the extensions register

for module in sorted(set(cuda_ops.CUDA_OP_EXTENSION.values())):
    importlib.import_module(module)
    print(f"build_cuda: loaded {module}")
missing = [
    name for name in cuda_ops.CUDA_OP_SCHEMAS
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseq::{name}", "CUDA")
]
if missing:
    raise SystemExit(f"build_cuda: CUDA ops without a kernel: {missing}")
print(f"build_cuda: all {len(cuda_ops.CUDA_OP_SCHEMAS)} CUDA ops registered: {sorted(cuda_ops.CUDA_OP_SCHEMAS)}")
PY
