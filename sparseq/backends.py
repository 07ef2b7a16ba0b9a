"""Which compute backends loaded (reference, triton, cuda) and why not.

Nothing here runs at import: the checks happen when ``kernels_available()`` is called, and
the compiled extensions are imported at most once, under a lock (thread-safe).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Dict, Optional

import torch

CUDA_EXTENSIONS = {"sm80": "sparseq._C", "sm90a": "sparseq._C_sm90a"}

_lock = threading.Lock()
_cuda_status: Optional[Dict[str, "BackendStatus"]] = None


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and a one-line reason."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    import triton

    version = getattr(triton, "__version__", "?")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendStatus(True, f"triton {version} (interpreter, TRITON_INTERPRET=1: CPU tensors)")
    if not torch.cuda.is_available():
        return BackendStatus(False, f"triton {version} installed but no CUDA GPU (set TRITON_INTERPRET=1 to interpret)")
    return BackendStatus(True, f"triton {version} on {torch.cuda.get_device_name()}")


def load_cuda_extensions() -> Dict[str, BackendStatus]:
    """Import the compiled extensions once; their CUDA ops register on import."""
    global _cuda_status
    with _lock:
        if _cuda_status is None:
            from . import cuda_ops  # noqa: F401  (schemas must exist before the .so registers impls)

            status = {}
            for arch, module in CUDA_EXTENSIONS.items():
                if importlib.util.find_spec(module) is None:
                    status[arch] = BackendStatus(False, f"{module} was not built (no nvcc/CUDA torch at install, or SPARSEQ_SKIP_CUDA_BUILD=1)")
                    continue
                try:
                    importlib.import_module(module)
                    status[arch] = BackendStatus(True, f"{module} loaded")
                except (ImportError, OSError) as e:
                    why = f"{module} failed to load: {e}"
                    if torch.version.cuda is None:
                        why = (f"{module} needs a CUDA build of torch >= 2.10; torch {torch.__version__} is a "
                               f"CPU build ({why})")
                    status[arch] = BackendStatus(False, why)
            _cuda_status = status
        return dict(_cuda_status)


def _cuda_backend_status() -> BackendStatus:
    exts = load_cuda_extensions()
    loaded = [arch for arch, s in exts.items() if s]
    detail = "; ".join(f"{arch}: {s.reason}" for arch, s in exts.items())
    if not loaded:
        return BackendStatus(False, detail)
    if not torch.cuda.is_available():
        return BackendStatus(False, f"extensions load but no CUDA GPU ({detail})")
    return BackendStatus(True, detail)


def _onednn_status() -> BackendStatus:
    from . import cpu_ops

    why = cpu_ops.unavailable_reason()
    if why:
        return BackendStatus(False, why)
    form = "int8 activations" if cpu_ops.signed_activations() else "activations offset to uint8 (zero point 128)"
    return BackendStatus(True, f"oneDNN int8 GEMM (torch.ops.onednn) for W8A8 layers on this CPU, {form}")


def _fbgemm_status() -> BackendStatus:
    from .cpu_fbgemm import default_form, exact_runs, packed_gemm_unavailable_reason, reduce_range, unavailable_reason

    why = unavailable_reason()
    if default_form() == "packed_gemm":
        how = ("fbgemm's packed int8 GEMM (torch.fbgemm_linear_int8_weight_fp32_activation) fed the format's "
               "int8 activations: bit-exact")
    else:
        bits = "7-bit activations: no VNNI" if reduce_range() else "8-bit activations"
        how = (f"fbgemm dynamic int8 linear (torch.ops.quantized.linear_dynamic, {bits}, "
               f"{'bit-exact' if exact_runs() else 'approximate'}; the packed GEMM "
               f"does not run: {packed_gemm_unavailable_reason()})")
    when = "under either CPU numerics" if exact_runs() else "under the 'fast' CPU numerics"
    return BackendStatus(not why, why or f"{how} for W8A8 layers at small M {when}")


def _cpu_extension_status() -> BackendStatus:
    from .cpu_kernels import unavailable_reason, weight_only_unavailable_reason

    why = unavailable_reason()
    woq = weight_only_unavailable_reason()
    return BackendStatus(not why, why or "sparseq._C_cpu: the W8A8 per-token quantization and epilogue of the "
                                        "oneDNN path in C++ (one pass each); the int8 weight-only GEMM ('cpu_woq'"
                                        + (f"; not used here: {woq})" if woq else ")"))


def kernels_available() -> Dict[str, BackendStatus]:
    """Per backend (``reference``, ``triton``, ``cuda``, ``onednn``, ``fbgemm``, ``cpu_extension``):
    whether it can run here and why not."""
    return {
        "reference": BackendStatus(True, f"pure PyTorch {torch.__version__}, any device"),
        "triton": _triton_status(),
        "cuda": _cuda_backend_status(),
        "onednn": _onednn_status(),
        "fbgemm": _fbgemm_status(),
        "cpu_extension": _cpu_extension_status(),
    }
