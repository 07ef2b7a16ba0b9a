#!/usr/bin/env bash
# CI: build the CUDA extensions (sparseq._C for sm_80, sparseq._C_sm90a for sm_90a) on a
# CPU-only machine, load them, and check that every CUDA op is registered. Nothing runs on a
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

start=$(date +%s)
"$VENV/bin/pip" install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
echo "build_cuda: extensions built in $(( $(date +%s) - start )) s with MAX_JOBS=$MAX_JOBS"

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
