#!/usr/bin/env bash
# CI: the binary wheel that .ci/build_cuda.sh made (dist/sparseq-*-cp310-abi3-*.whl, built
# against torch 2.14.1 / CPython 3.11) installs into a fresh venv with another torch, torch
# 2.13.0 (CPU build), and works there: `import sparseq`, `sparseq info` reporting exactly why the
# CUDA extensions cannot load on a CPU-only torch, a CPU layer forward, and the linkage audit of
# the .so files inside the wheel (sparseq.abi_audit). No compiler runs here.
#   WHEEL_VENV=.cache/venv-wheel   the fresh venv (rebuilt every run)
#   PYTHON=python3                 interpreter for it
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_VENV=$(realpath -m "${WHEEL_VENV:-.cache/venv-wheel}")
PY=${PYTHON:-python3}
start=$(date +%s)
wheel=$(ls dist/sparseq-*-cp310-abi3-linux_*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "check_wheel: no dist/sparseq-*-cp310-abi3-linux_*.whl (bash .ci/build_cuda.sh makes it)" >&2
  exit 1
fi
rm -rf "$WHEEL_VENV"
mkdir -p "$(dirname "$WHEEL_VENV")"
"$PY" -m venv "$WHEEL_VENV"
PIP="$WHEEL_VENV/bin/pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0" "numpy<2.3" safetensors tqdm
$PIP install --no-deps "$wheel"
echo "check_wheel: installed $(basename "$wheel") beside torch $("$WHEEL_VENV/bin/python" -c 'import torch; print(torch.__version__)') in $(( $(date +%s) - start )) s"

cd "$WHEEL_VENV"  # not the checkout: sparseq must come from the wheel
"$WHEEL_VENV/bin/sparseq" info
"$WHEEL_VENV/bin/python" - <<'PY'
import pathlib

import torch

import sparseq
from sparseq import abi_audit, machine_code
from sparseq.backends import load_cuda_extensions

where = pathlib.Path(sparseq.__file__).parent
assert "site-packages" in str(where), f"sparseq imported from {where}, not from the wheel"
libs = machine_code.extension_files()
assert sorted(p.name for p in libs) == ["_C.abi3.so", "_C_cpu.abi3.so", "_C_sm90a.abi3.so"], libs
problems = [line for so in libs for line in abi_audit.problems(so)]
assert not problems, problems
assert (where / "kernels").is_dir(), "the Triton kernels are not in the wheel"

# every stable C shim function the extensions import exists in this (other) torch, except the
# CUDA ones where this torch is a CPU build (they live in libtorch_cuda, which it lacks)
torch_lib = pathlib.Path(torch.__file__).parent / "lib"
for so in libs:
    missing = abi_audit.missing_shim_functions(so, torch_lib)
    if torch.version.cuda is None:
        missing = [n for n in missing if "cuda" not in n]
    assert not missing, f"{so.name} imports shim functions torch {torch.__version__} lacks: {missing}"
    print(f"check_wheel: {so.name}: all {len(abi_audit.torch_imports(so))} shim functions it imports exist in "
          f"torch {torch.__version__} (CUDA ones aside on a CPU build)")

status = load_cuda_extensions()
for arch, s in status.items():
    print(f"check_wheel: {arch}: {'loads' if s else 'does not load'}: {s.reason}")
    if torch.version.cuda is None:  # a CPU-only torch: the reason must name the missing CUDA piece
        assert not s and "CPU build" in s.reason, s.reason
    else:
        assert s, s.reason

from sparseq import cpu_kernels, cpu_ops, reference
from sparseq.nn import Int8Linear

# the CPU extension loads under this other torch (a CPU build) and equals the reference
assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
x = torch.randn(4, 256)
layer = Int8Linear.from_linear(torch.nn.Linear(256, 128))
assert layer(x).shape == (4, 128)
xq, scale = cpu_kernels.quantize_int8(x, None, None)
want_q, want_scale = reference.quantize_per_token(x)
assert torch.equal(xq, want_q) and torch.equal(scale, want_scale)
y = cpu_ops.run_w8a8(x, cpu_ops.prepack(layer.weight_q), layer.w_scale, None, None, layer.bias, torch.float32)
want = reference.int8_mm(want_q, layer.weight_q, want_scale, layer.w_scale, layer.bias, torch.float32)
assert torch.equal(y, want), (y - want).abs().max()
print("check_wheel: sparseq._C_cpu loads and equals the reference")
print(f"check_wheel: sparseq {sparseq.__version__} from the wheel works under torch {torch.__version__}")
PY
echo "check_wheel: done in $(( $(date +%s) - start )) s"
