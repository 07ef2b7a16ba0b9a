"""Contenders of the op sweep: every way to compute ``Y = X W^T`` that is found at run time.

Dense ``F.linear`` (the baseline, always first), PyTorch's own 2:4 / int8 / fp8 paths, the
registered ``sparseq::<op>_<backend>`` ops (the Triton kernels and CUDA extensions once
imported), the ``sparseq.swap`` layers, and torchao when installed. One that is not there
leaves an ``import`` error row instead of stopping the run.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as ref
from .checks import fp8_per_tensor, quant_w, quant_x
from .results import Row, error_text

SWAP_FORMATS = ("2:4", "w8a8", "int8_weight_only", "2:4+w8a8", "2:4+int8_weight_only")
MATMUL_OPS = ("sparse24_mm", "sparse24_int8_mm", "int8_mm", "int8_weight_only_mm")
COMPRESS_OPS = ("prune_and_compress_24", "prune_and_compress_24_int8", "quantize_per_channel")


# -------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One way to compute ``Y = X W^T``.

    ``prepare(w)`` turns the dense weight (2:4-pruned when ``sparse``) into the contender's
    state once (a one-time cost, timed apart); ``call(state, x)`` returns the zero-argument
    function that is timed (``op="linear"``: float X in, float Y out, quantization included;
    ``op="gemm"``: inputs quantized beforehand, the kernel alone). ``expect`` is the kind of
    reference its output is checked against (:data:`CHECK_KINDS`), elementwise within the bound
    of ``sparseq.testing``; ``tol`` replaces that by a relative L2 bound (contenders that
    quantize with their own recipe: their rows are marked ``approx``). ``expect=""`` needs an
    ``unchecked`` reason (its rows are marked ``no: <reason>``); without one it is an error.
    """

    op: str
    backend: str
    format: str
    prepare: Callable[[Tensor], Any]
    call: Callable[[Any, Tensor], Callable[[], Tensor]]
    expect: str = "float"
    sparse: bool = False
    tol: Optional[float] = None
    unchecked: str = ""

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.op, self.backend, self.format)


def torch_contenders(dtype: torch.dtype) -> List[Contender]:
    """Dense ``F.linear`` (the baseline, first) and PyTorch's own 2:4, int8 and fp8 paths."""
    dense = Contender("linear", "torch", "dense", lambda w: w, lambda w, x: lambda: F.linear(x, w))
    try:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CSLT
        from torch.sparse import SparseSemiStructuredTensorCUTLASS as CUTLASS
    except ImportError:
        CSLT = CUTLASS = None

    def int8_2to4(w: Tensor) -> Any:
        return CSLT.from_dense(quant_w(w)[0])

    def fp8_state(w: Tensor) -> Tuple[Tensor, Tensor]:
        w8, s = fp8_per_tensor(w)
        return w8, s

    def fp8_call(st: Tuple[Tensor, Tensor], x: Tensor) -> Callable[[], Tensor]:
        x8, sx = fp8_per_tensor(x)
        return lambda: torch._scaled_mm(x8, st[0].t(), scale_a=sx, scale_b=st[1], out_dtype=dtype)

    def int_mm_call(wq: Tensor, x: Tensor) -> Callable[[], Tensor]:
        xq = quant_x(x)[0]
        return lambda: torch._int_mm(xq, wq.t())

    def cslt_int8_call(ws: Any, x: Tensor) -> Callable[[], Tensor]:
        xq = quant_x(x)[0]
        return lambda: torch.mm(xq, ws.t())

    semi = [] if CSLT is None else [
        Contender("linear", "torch-cusparselt", "2:4", CSLT.from_dense, lambda ws, x: lambda: F.linear(x, ws), sparse=True),
        Contender("linear", "torch-cutlass", "2:4", CUTLASS.from_dense, lambda ws, x: lambda: F.linear(x, ws), sparse=True),
        # int8 out: the exact int32 accumulator saturated to [-128, 127], compared for equality.
        Contender("gemm", "torch-cusparselt", "2:4+int8 (int8 out)", int8_2to4, cslt_int8_call, expect="int8_saturated",
                  sparse=True),
    ]
    return [dense, *semi,
            Contender("gemm", "torch._int_mm", "int8 (int32 out)", lambda w: quant_w(w)[0], int_mm_call,
                      expect="int32"),
            Contender("gemm", "torch._scaled_mm", "fp8 e4m3", fp8_state, fp8_call, expect="fp8")]


TORCHAO_CONFIGS = {
    # config class name in torchao.quantization -> (format, expected output, 2:4 weight). torchao
    # quantizes with its own recipe (scales, rounding), so its outputs are compared with sparseq's
    # reference of the format by relative L2 only, and its rows are marked "approx".
    "Int8DynamicActivationInt8WeightConfig": ("w8a8", "w8a8", False),
    "Int8WeightOnlyConfig": ("int8_weight_only", "int8_weight_only", False),
    "Float8DynamicActivationFloat8WeightConfig": ("fp8", "float", False),
    "Float8DynamicActivationFloat8SemiSparseWeightConfig": ("2:4+fp8", "float", True),
}


def torchao_contenders(dtype: torch.dtype) -> Tuple[List[Contender], List[Row]]:
    """torchao's ``quantize_`` configs that this torchao has (none when it is not installed)."""
    try:
        import torchao.quantization as tq
    except Exception as e:  # noqa: BLE001  (any import failure: record it)
        return [], [Row("import", "torchao", "*", "", 0, 0, None, error=error_text(e))]
    out = []
    for name, (fmt, expect, sparse) in TORCHAO_CONFIGS.items():
        config = getattr(tq, name, None)
        if config is None:
            continue

        def prepare(w: Tensor, config=config) -> torch.nn.Module:
            model = _linear_module(w)
            tq.quantize_(model, config())
            return model

        out.append(Contender("linear", "torchao", fmt, prepare, lambda m, x: lambda: m(x),
                             expect=expect, sparse=sparse, tol=0.1 if "fp8" in fmt else 5e-2))
    return out, []


def _linear_module(w: Tensor) -> torch.nn.Sequential:
    n, k = w.shape
    lin = torch.nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return torch.nn.Sequential(lin)


def swap_contenders() -> Tuple[List[Contender], List[Row]]:
    """The ``sparseq.swap`` layers, one per format, timed as whole layers (dispatch included)."""
    try:
        from sparseq.nn import swap
    except Exception as e:  # noqa: BLE001
        return [], [Row("import", "sparseq.nn", "*", "", 0, 0, None, error=error_text(e))]

    def prepare(w: Tensor, fmt: str) -> torch.nn.Module:
        model = _linear_module(w)
        swapped = swap(model, fmt)
        return swapped if isinstance(swapped, torch.nn.Module) else model

    return [Contender("linear", "sparseq.nn", fmt, lambda w, fmt=fmt: prepare(w, fmt), lambda m, x: lambda: m(x),
                      expect="layer", sparse=fmt.startswith("2:4")) for fmt in SWAP_FORMATS], []


def load_backends() -> List[Row]:
    """Import every ``sparseq.kernels`` module and the CUDA extensions so their ops register."""
    errors = []
    try:
        import sparseq.kernels as kernels

        for info in pkgutil.iter_modules(kernels.__path__, "sparseq.kernels."):
            try:
                importlib.import_module(info.name)
            except Exception as e:  # noqa: BLE001
                errors.append(Row("import", "triton", info.name, "", 0, 0, None, error=error_text(e)))
    except Exception as e:  # noqa: BLE001
        errors.append(Row("import", "triton", "sparseq.kernels", "", 0, 0, None, error=error_text(e)))
    try:
        from ..backends import load_cuda_extensions

        load_cuda_extensions()
    except Exception as e:  # noqa: BLE001
        errors.append(Row("import", "cuda", "sparseq.cuda_ops", "", 0, 0, None, error=error_text(e)))
    return errors


def registered_backends(base: str) -> List[str]:
    """Backends that registered ``sparseq::<base>_<backend>`` (``""`` is the pinned reference,
    ``sparseq::<base>_reference``; the public ``sparseq::<base>`` dispatches by device and is not
    a contender of its own)."""
    from ..ops import REFERENCE_OPS

    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseq::")}
    found = [""] if f"{base}_reference" in names else []
    for n in sorted(names):
        suffix = n[len(base) + 1:]
        # prune_and_compress_24_int8(_triton) is an op of its own, not a backend of prune_and_compress_24
        if n.startswith(base + "_") and suffix != "reference" and "_" not in suffix and n not in REFERENCE_OPS:
            found.append(suffix)
    return found


def sparseq_op(base: str, backend: str) -> Callable[..., Any]:
    return getattr(torch.ops.sparseq, f"{base}_{backend or 'reference'}").default


def _cutlass_layout(*weights: Tensor) -> Tuple[Tensor, ...]:
    """Canonical ``(values, meta[, scale])`` -> ``(values, prepared meta[, scale])`` for this GPU."""
    from ..cuda_ops import prepare_sparse24_cutlass

    arch = None if weights[0].device.type == "cuda" else 90  # off the GPU: the ops' CPU impls, sm90 layout
    return (weights[0], prepare_sparse24_cutlass(weights[0], weights[1], arch)) + tuple(weights[2:])


def layout_hook(base: str, backend: str) -> Optional[Callable[..., Tuple[Tensor, ...]]]:
    """The one-time conversion of the canonical weight tensors into the layout the backend's op
    takes (the CUTLASS 2:4 ops take prepared metadata), or None where the op takes them as they are.

    Besides the CUTLASS ops, a ``prepare_<base>_<backend>`` function in ``sparseq.cuda_ops`` or an
    imported ``sparseq.kernels.*`` module is used; the returned tensors replace the canonical
    ones in the op call (measured as a one-time cost).
    """
    if backend == "cutlass" and base in ("sparse24_mm", "sparse24_int8_mm"):
        return _cutlass_layout
    name = f"prepare_{base}_{backend}"
    modules = [m for k, m in list(sys.modules.items()) if k == "sparseq.cuda_ops" or k.startswith("sparseq.kernels.")]
    for module in modules:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def op_contenders(backend: str, dtype: torch.dtype) -> List[Contender]:
    """Contenders for the registered ``sparseq::*_<backend>`` matmul ops (``""``: the reference)."""
    label = backend or "reference"
    has_quant = not backend or backend in registered_backends("quantize_per_token")
    quant = sparseq_op("quantize_per_token", backend if has_quant else "")
    qlabel = label if has_quant else f"{label}+ref-quant"
    out: List[Contender] = []

    def hooked(base: str, weights: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        hook = layout_hook(base, backend) if backend else None
        return tuple(hook(*weights)) if hook else weights

    def add(base: str, fmt: str, prep: Callable[[Tensor], Tuple[Tensor, ...]], call: Callable, expect: str, sparse: bool,
            op: str = "gemm", who: str = label) -> None:
        if backend not in registered_backends(base):
            return
        if backend == "cutlass" and fmt == "2:4+int8_weight_only":
            return  # the CUTLASS 2:4 int8 kernels are W8A8 only
        fn = sparseq_op(base, backend)
        out.append(Contender(op, who, fmt, lambda w: hooked(base, prep(w)), lambda st, x: call(fn, st, x),
                             expect=expect, sparse=sparse))

    add("sparse24_mm", "2:4", lambda w: ref.compress_24(w), lambda f, st, x: lambda: f(x, *st), "float", True)
    add("int8_weight_only_mm", "int8_weight_only", quant_w, lambda f, st, x: lambda: f(x, *st), "int8_weight_only", False)
    add("int8_mm", "w8a8", quant_w,
        lambda f, st, x: (lambda q: lambda: f(q[0], st[0], q[1], st[1], None, dtype))(quant_x(x)), "w8a8", False)
    add("int8_mm", "w8a8", quant_w,
        lambda f, st, x: lambda: _w8a8(f, quant, x, st[0], st[1], dtype), "w8a8", False, op="linear", who=qlabel)
    s24q = lambda w: ref.prune_and_compress_24(w, None, quantize=True)  # noqa: E731
    add("sparse24_int8_mm", "2:4+int8_weight_only", s24q,
        lambda f, st, x: lambda: f(x, st[0], st[1], st[2], None, None, None), "int8_weight_only", True)
    add("sparse24_int8_mm", "2:4+w8a8", s24q,
        lambda f, st, x: (lambda q: lambda: f(q[0], st[0], st[1], st[2], q[1], None, dtype))(quant_x(x)), "w8a8", True)
    add("sparse24_int8_mm", "2:4+w8a8", s24q,
        lambda f, st, x: lambda: _s24_w8a8(f, quant, x, st, dtype), "w8a8", True, op="linear", who=qlabel)
    return out


def _w8a8(f: Callable, quant: Callable, x: Tensor, wq: Tensor, sw: Tensor, dtype: torch.dtype) -> Tensor:
    xq, sx = quant(x, None)
    return f(xq, wq, sx, sw, None, dtype)


def _s24_w8a8(f: Callable, quant: Callable, x: Tensor, st: Tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    xq, sx = quant(x, None)
    return f(xq, st[0], st[1], st[2], sx, None, dtype)


def discover(dtype: torch.dtype, device: torch.device, include_reference: bool = False,
             only: Sequence[str] = ()) -> Tuple[List[Contender], List[Row]]:
    """Every contender available here, dense first; plus ``import`` rows for what failed to load."""
    errors = load_backends()
    contenders = torch_contenders(dtype)
    backends = sorted({b for base in MATMUL_OPS for b in registered_backends(base) if b or include_reference})
    for b in backends:
        contenders += op_contenders(b, dtype)
    for extra in (swap_contenders(), torchao_contenders(dtype)):
        contenders += extra[0]
        errors += extra[1]
    if only:
        contenders = [c for i, c in enumerate(contenders) if i == 0 or any(s in c.backend for s in only)]
    return contenders, errors


QUANTIZE_DYNAMIC_TOL = 5e-2
"""quantize_dynamic vs the W8A8 reference, relative L2 (as the torchao rows of the GPU sweep)."""


def quantize_dynamic_contender() -> Contender:
    """PyTorch's own CPU int8 path, ``torch.ao.quantization.quantize_dynamic`` of the Linear (fbgemm /
    x86 engine, per-tensor dynamic activations): the peer of the W8A8 layers. Its activation
    quantization is not the format's (per token), so its output is held to the W8A8 reference
    by relative L2 only (rows marked ``approx``)."""

    def prepare(w: Tensor) -> torch.nn.Module:
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # its deprecation notices, once per layer
            warnings.simplefilter("ignore")
            return quantize_dynamic(_linear_module(w), {torch.nn.Linear}, dtype=torch.qint8)

    return Contender("linear", "torch.ao", "quantize_dynamic", prepare, lambda m, x: lambda: m(x),
                     expect="w8a8", tol=QUANTIZE_DYNAMIC_TOL)


def discover_cpu(dtype: torch.dtype, only: Sequence[str] = ()) -> Tuple[List[Contender], List[Row]]:
    """The CPU contenders: the dense ``nn.Linear`` (the baseline, first), the ``quantize_dynamic``
    peer (fp32 only: it takes fp32 activations) and every ``sparseq.swap`` layer, running what
    the CPU dispatch picks. All are called as the same one-layer module, so a row's speedup is
    the layer's, module-call overhead included on both sides."""
    contenders = [Contender("linear", "torch", "dense", _linear_module, lambda m, x: lambda: m(x))]
    if dtype == torch.float32:
        contenders.append(quantize_dynamic_contender())
    swapped, errors = swap_contenders()
    contenders += swapped
    if only:
        contenders = [c for i, c in enumerate(contenders) if i == 0 or any(s in c.backend for s in only)]
    return contenders, errors
