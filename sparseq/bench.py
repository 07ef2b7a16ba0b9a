"""``sparseq bench``: the op sweep (every sparseq backend and peer vs dense ``F.linear``) and its CLI.

Contenders are discovered at run time: the ``sparseq::<op>_<backend>`` ops registered once the
Triton kernels (``sparseq.kernels.*``) and the CUDA extensions are imported, the layers of
``sparseq.swap``, torch's 2:4 / int8 / fp8 paths and torchao when installed. One that is not
there or fails leaves its error message in the results instead of stopping the run. Every
output is checked elementwise against the reference math of its format, within the bounds of
``sparseq.testing``, before it is timed: a wrong one becomes an error row, never a time; a row
whose output was not checked (``--no-check``, a contender with no reference) says so in the
``checked`` column and carries a mark in the tables. ``benchmarks/bench_ops.py`` is the script
form of the same sweep.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import benchmarking as bm
from . import reference as ref
from .benchmarking import M_FULL, M_QUICK, M_SMOKE, MODEL_SHAPES, QUICK_SHAPES, SMOKE_SHAPES  # noqa: F401
from .benchmarking import all_shapes, minilm_shapes, parse_shape  # noqa: F401
from .benchmarking import check_layer, first_difference, ieee_fp32
from .testing import check_matmul_close
from .cli import command

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


def _quant_w(w: Tensor) -> Tuple[Tensor, Tensor]:
    return ref.quantize_per_channel(w)


def _quant_x(x: Tensor) -> Tuple[Tensor, Tensor]:
    return ref.quantize_per_token(x)


CHECK_KINDS = {
    "float": "x @ w^T in fp32, cast once (the float-matmul bound)",
    "int8_weight_only": "reference int8_weight_only_mm of the per-channel int8 weight",
    "w8a8": "reference int8_mm of per-token x and per-channel w (exact int32 accumulator)",
    "int32": "the exact int32 accumulator of per-token x and per-channel w (equal)",
    "int8_saturated": "that accumulator saturated to int8 (equal)",
    "fp8": "fp32 (x8 @ w8^T) * s_x * s_w of the per-tensor e4m3 operands",
    "layer": "the dense layer a sparseq.nn layer replaces (testing.layer_expected)",
}
"""Reference kinds a contender's output is checked against (``Contender.expect``)."""


def _reference(kind: str, x: Tensor, w: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tuple]]:
    """``(expected output, bound operands (x, w, x_scale, w_scale))`` of a kind; operands None: exact."""
    with ieee_fp32():
        if kind == "float":
            return (x.float() @ w.float().T).to(dtype), (x, w, None, None)
        if kind == "fp8":
            (x8, s_x), (w8, s_w) = _fp8(x), _fp8(w)
            xf, wf = x8.float(), w8.float()
            return ((xf @ wf.T) * (s_x * s_w)).to(dtype), (xf, wf, s_x.reshape(1), s_w.reshape(1).expand(w.shape[0]))
        wq, sw = _quant_w(w)
        if kind == "int8_weight_only":
            return ref.int8_weight_only_mm(x, wq, sw).to(dtype), (x, wq, None, sw)
        xq, sx = _quant_x(x)
        if kind == "w8a8":
            return ref.int8_mm(xq, wq, sx, sw, None, dtype), (xq, wq, sx, sw)
        if kind == "int32":
            return ref.int8_matmul_int32(xq, wq), None
        if kind == "int8_saturated":
            return ref.int8_matmul_int32(xq, wq).clamp(-128, 127).to(torch.int8), None
    raise ValueError(f"unknown reference kind {kind!r}; choose from {sorted(CHECK_KINDS)}")


def reference_check(kind: str, x: Tensor, w: Tensor, dtype: torch.dtype) -> Callable[..., Optional[str]]:
    """``check(out, tol=None) -> None or what is wrong`` against the reference ``kind`` of ``x @ w^T``:
    elementwise within ``sparseq.testing.check_matmul_close`` (integer outputs: equal), or relative L2 ``<= tol``."""
    expected, operands = _reference(kind, x, w, dtype)

    def check(out: Tensor, tol: Optional[float] = None) -> Optional[str]:
        out = out[0] if isinstance(out, (tuple, list)) else out
        if tol is not None:
            err = rel_error(out, expected)
            return None if err <= tol else f"relative L2 error {err:.3g} > {tol:g}"
        if operands is None:
            return first_difference(out, expected)
        return check_matmul_close(out, expected, *operands)

    return check


def _fp8(t: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-tensor e4m3 quantization: ``(t / s).to(fp8), s`` with ``s = max|t| / 448``."""
    s = (t.abs().max().float() / 448.0).clamp_min(1e-12)
    return (t.float() / s).to(torch.float8_e4m3fn), s


def torch_contenders(dtype: torch.dtype) -> List[Contender]:
    """Dense ``F.linear`` (the baseline, first) and PyTorch's own 2:4, int8 and fp8 paths."""
    dense = Contender("linear", "torch", "dense", lambda w: w, lambda w, x: lambda: F.linear(x, w))
    try:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CSLT
        from torch.sparse import SparseSemiStructuredTensorCUTLASS as CUTLASS
    except ImportError:
        CSLT = CUTLASS = None

    def int8_2to4(w: Tensor) -> Any:
        return CSLT.from_dense(_quant_w(w)[0])

    def fp8_state(w: Tensor) -> Tuple[Tensor, Tensor]:
        w8, s = _fp8(w)
        return w8, s

    def fp8_call(st: Tuple[Tensor, Tensor], x: Tensor) -> Callable[[], Tensor]:
        x8, sx = _fp8(x)
        return lambda: torch._scaled_mm(x8, st[0].t(), scale_a=sx, scale_b=st[1], out_dtype=dtype)

    def int_mm_call(wq: Tensor, x: Tensor) -> Callable[[], Tensor]:
        xq = _quant_x(x)[0]
        return lambda: torch._int_mm(xq, wq.t())

    def cslt_int8_call(ws: Any, x: Tensor) -> Callable[[], Tensor]:
        xq = _quant_x(x)[0]
        return lambda: torch.mm(xq, ws.t())

    semi = [] if CSLT is None else [
        Contender("linear", "torch-cusparselt", "2:4", CSLT.from_dense, lambda ws, x: lambda: F.linear(x, ws), sparse=True),
        Contender("linear", "torch-cutlass", "2:4", CUTLASS.from_dense, lambda ws, x: lambda: F.linear(x, ws), sparse=True),
        # int8 out: the exact int32 accumulator saturated to [-128, 127], compared for equality.
        Contender("gemm", "torch-cusparselt", "2:4+int8 (int8 out)", int8_2to4, cslt_int8_call, expect="int8_saturated",
                  sparse=True),
    ]
    return [dense, *semi,
            Contender("gemm", "torch._int_mm", "int8 (int32 out)", lambda w: _quant_w(w)[0], int_mm_call,
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


def torchao_contenders(dtype: torch.dtype) -> Tuple[List[Contender], List[bm.Row]]:
    """torchao's ``quantize_`` configs that this torchao has (none when it is not installed)."""
    try:
        import torchao.quantization as tq
    except Exception as e:  # noqa: BLE001  (any import failure: record it)
        return [], [bm.Row("import", "torchao", "*", "", 0, 0, None, error=bm.error_text(e))]
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


def swap_contenders() -> Tuple[List[Contender], List[bm.Row]]:
    """The ``sparseq.swap`` layers, one per format, timed as whole layers (dispatch included)."""
    try:
        from sparseq.nn import swap
    except Exception as e:  # noqa: BLE001
        return [], [bm.Row("import", "sparseq.nn", "*", "", 0, 0, None, error=bm.error_text(e))]

    def prepare(w: Tensor, fmt: str) -> torch.nn.Module:
        model = _linear_module(w)
        swapped = swap(model, fmt)
        return swapped if isinstance(swapped, torch.nn.Module) else model

    return [Contender("linear", "sparseq.nn", fmt, lambda w, fmt=fmt: prepare(w, fmt), lambda m, x: lambda: m(x),
                      expect="layer", sparse=fmt.startswith("2:4")) for fmt in SWAP_FORMATS], []


def load_backends() -> List[bm.Row]:
    """Import every ``sparseq.kernels`` module and the CUDA extensions so their ops register."""
    errors = []
    try:
        import sparseq.kernels as kernels

        for info in pkgutil.iter_modules(kernels.__path__, "sparseq.kernels."):
            try:
                importlib.import_module(info.name)
            except Exception as e:  # noqa: BLE001
                errors.append(bm.Row("import", "triton", info.name, "", 0, 0, None, error=bm.error_text(e)))
    except Exception as e:  # noqa: BLE001
        errors.append(bm.Row("import", "triton", "sparseq.kernels", "", 0, 0, None, error=bm.error_text(e)))
    try:
        from .backends import load_cuda_extensions

        load_cuda_extensions()
    except Exception as e:  # noqa: BLE001
        errors.append(bm.Row("import", "cuda", "sparseq.cuda_ops", "", 0, 0, None, error=bm.error_text(e)))
    return errors


def registered_backends(base: str) -> List[str]:
    """Backends that registered ``sparseq::<base>_<backend>`` (``""`` is the pinned reference,
    ``sparseq::<base>_reference``; the public ``sparseq::<base>`` dispatches by device and is not
    a contender of its own)."""
    from .ops import REFERENCE_OPS

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
    from .cuda_ops import prepare_sparse24_cutlass

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
    add("int8_weight_only_mm", "int8_weight_only", _quant_w, lambda f, st, x: lambda: f(x, *st), "int8_weight_only", False)
    add("int8_mm", "w8a8", _quant_w,
        lambda f, st, x: (lambda q: lambda: f(q[0], st[0], q[1], st[1], None, dtype))(_quant_x(x)), "w8a8", False)
    add("int8_mm", "w8a8", _quant_w,
        lambda f, st, x: lambda: _w8a8(f, quant, x, st[0], st[1], dtype), "w8a8", False, op="linear", who=qlabel)
    s24q = lambda w: ref.prune_and_compress_24(w, None, quantize=True)  # noqa: E731
    add("sparse24_int8_mm", "2:4+int8_weight_only", s24q,
        lambda f, st, x: lambda: f(x, st[0], st[1], st[2], None, None, None), "int8_weight_only", True)
    add("sparse24_int8_mm", "2:4+w8a8", s24q,
        lambda f, st, x: (lambda q: lambda: f(q[0], st[0], st[1], st[2], q[1], None, dtype))(_quant_x(x)), "w8a8", True)
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
             only: Sequence[str] = ()) -> Tuple[List[Contender], List[bm.Row]]:
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


# ------------------------------------------------------------------------------- sweep


def rel_error(y: Tensor, expected: Tensor) -> float:
    """``||y - expected|| / ||expected||`` in fp32."""
    y = y[0] if isinstance(y, (tuple, list)) else y
    if tuple(y.shape) != tuple(expected.shape):
        raise ValueError(f"output shape {tuple(y.shape)} != expected {tuple(expected.shape)}")
    diff = (y.float() - expected.float()).norm()
    return float(diff / expected.float().norm().clamp_min(1e-12))


def check_output(c: Contender, state: Any, x: Tensor, y: Tensor, refs: Dict[Tuple[str, bool], Callable],
                 w: Tensor, dtype: torch.dtype) -> str:
    """Check ``y`` of contender ``c`` (``w``: the weight it was given); returns the row's ``checked``
    value, raises ``AssertionError("wrong result: ...")`` when the output is wrong."""
    if not c.expect:
        if not c.unchecked:
            raise ValueError("no reference to check the output against: give the contender an expect kind "
                             "or an unchecked reason")
        return "no: " + c.unchecked
    if c.expect == "layer":
        msg = check_layer(state[0], x, y[0] if isinstance(y, (tuple, list)) else y)
    else:
        key = (c.expect, c.sparse)
        if key not in refs:
            refs[key] = reference_check(c.expect, x, w, dtype)
        msg = refs[key](y, c.tol)
    if msg is not None:
        raise AssertionError(f"wrong result: {msg} (vs the {c.expect} reference)")
    return "yes" if c.tol is None else f"approx: relative L2 <= {c.tol:g} vs the {c.expect} reference"


def compress_rows(w: Tensor, dtype_name: str) -> List[bm.Row]:
    """One-time costs of every registered compression/quantization op (the reference included)."""
    rows = []
    n, k = w.shape
    for base in COMPRESS_OPS:
        for b in registered_backends(base):
            row = bm.Row("compress", b or "reference", base, dtype_name, n, k, None)
            try:
                fn = sparseq_op(base, b)
                bm.time_once_us(lambda: fn(w), w.device)  # first call: compile / warm-up
                _, row.time_us = bm.time_once_us(lambda: fn(w), w.device)
            except Exception as e:  # noqa: BLE001
                row.error = bm.error_text(e)
            rows.append(row)
    return rows


def sweep_shape(n: int, k: int, ms: Sequence[int], dtype_name: str, contenders: Sequence[Contender],
                timer: bm.Timer, check: bool = True, log: Callable[[str], None] = print) -> List[bm.Row]:
    """All contenders on one weight shape and dtype for every M; dense runs first at each M."""
    device, dtype = timer.device, bm.DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(n * 131 + k)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    w24 = w * ref.prune_24(w)
    rows = compress_rows(w, dtype_name)
    states: Dict[Tuple[str, str, str], Any] = {}
    failed: Dict[Tuple[str, str, str], str] = {}
    for c in contenders:
        row = bm.Row("prepare", c.backend, c.format + ("" if c.op == "linear" else f" ({c.op})"), dtype_name, n, k, None)
        try:
            wc = w24 if c.sparse else w
            bm.time_once_us(lambda: c.prepare(wc), device)  # first call may compile
            states[c.key], row.time_us = bm.time_once_us(lambda: c.prepare(wc), device)
        except Exception as e:  # noqa: BLE001
            failed[c.key] = row.error = bm.error_text(e)
        if c.format != "dense":
            rows.append(row)
    for m in ms:
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        refs: Dict[Tuple[str, bool], Callable] = {}
        dense_us = None
        for c in contenders:
            row = bm.Row(c.op, c.backend, c.format, dtype_name, n, k, m, dense_us=dense_us, flops=2.0 * m * n * k)
            if c.key in failed:
                row.error = "prepare failed: " + failed[c.key]
                rows.append(row)
                continue
            try:
                fn = c.call(states[c.key], x)
                y = fn()
                checked = check_output(c, states[c.key], x, y, refs, w24 if c.sparse else w, dtype) if check \
                    else "no: --no-check"
                row.time_us = timer(fn)
                row.checked = checked
                out_bytes = y.numel() * y.element_size() if isinstance(y, Tensor) else 0
                row.bytes = float(bm.tensor_bytes(states[c.key]) + x.numel() * x.element_size() + out_bytes)
                if c.format == "dense":
                    dense_us = row.dense_us = row.time_us
                del y
            except Exception as e:  # noqa: BLE001  (incl. torch.cuda.OutOfMemoryError)
                row.error = bm.error_text(e)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
        log(f"  {n}x{k} {dtype_name} M={m}: dense {dense_us or float('nan'):.1f} us, "
            f"{sum(1 for r in rows if r.M == m and r.error)} failed of {len(contenders)}")
        del x, refs
    del states
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_op_sweep(shapes: Sequence[Tuple[int, int]], ms: Sequence[int], dtypes: Sequence[str], timer: bm.Timer,
                 include_reference: bool = False, only: Sequence[str] = (), check: bool = True,
                 log: Callable[[str], None] = print) -> List[bm.Row]:
    """The whole sweep: every shape x dtype x M x contender, plus one-time costs and import failures."""
    rows: List[bm.Row] = []
    with torch.no_grad():
        for dtype_name in dtypes:
            contenders, errors = discover(bm.DTYPES[dtype_name], timer.device, include_reference, only)
            if dtype_name == dtypes[0]:
                rows += errors
                log(f"contenders ({dtype_name}): " + ", ".join(" ".join(c.key[1:]) + f" [{c.op}]" for c in contenders))
            for n, k in shapes:
                rows += sweep_shape(n, k, ms, dtype_name, contenders, timer, check, log)
    return rows


# -------------------------------------------------------------------------------- CLI


def add_op_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``sparseq bench`` and ``benchmarks/bench_ops.py``."""
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny shapes, reference (+ interpreter) ops")
    p.add_argument("--quick", action="store_true", help="a few Llama-3-8B shapes and M values (< 2 min on a GPU)")
    p.add_argument("--shape", action="append", type=parse_shape, default=[], metavar="NxK",
                   help="an extra weight shape, N x K (out x in); repeatable")
    p.add_argument("--models", default="llama3-8b,llama3-70b,mistral-7b,minilm",
                   help="model shape sets of the full sweep (comma separated; 'none' for --shape only)")
    p.add_argument("--m", default=None, help="comma-separated M values (default: the issue's list)")
    p.add_argument("--dtype", default=None, help="comma-separated activation dtypes: bf16,fp16 (default both)")
    p.add_argument("--backends", default="", help="only contenders whose backend contains one of these (comma separated)")
    p.add_argument("--with-reference", action="store_true", help="also time the pure-PyTorch reference ops")
    p.add_argument("--no-check", action="store_true", help="skip checking each output against the reference math "
                   "(rows are marked 'no: --no-check', tables carry a note)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition budget per measurement (ms)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<gpu>/)")
    p.add_argument("--name", default=None, help="file stem (default ops / ops_quick / ops_smoke): split a long "
                   "sweep into runs with their own files, then --merge them")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="CSV",
                   help="measure nothing: combine these results CSVs into <out>/<name>.csv/.md/.png")


def _csv_list(text: Optional[str], cast: Callable[[str], Any]) -> List[Any]:
    return [cast(v) for v in text.split(",") if v.strip()] if text else []


def op_plan(args: argparse.Namespace) -> Tuple[str, List[Tuple[int, int]], List[int], List[str]]:
    """(mode, shapes, Ms, dtypes) from the options."""
    if args.smoke:
        mode, shapes, ms, dtypes = "smoke", list(SMOKE_SHAPES), list(M_SMOKE), ["fp16"]
    elif args.quick:
        mode, shapes, ms, dtypes = "quick", list(QUICK_SHAPES), list(M_QUICK), ["bf16"]
    else:
        models = [m for m in _csv_list(args.models, str) if m != "none"]
        try:
            shapes = list(all_shapes(models)) if models else []
        except ValueError as e:
            raise SystemExit(f"--models: {e}") from None
        mode, ms, dtypes = "full", list(M_FULL), ["bf16", "fp16"]
    shapes += [s for s in args.shape if s not in shapes]
    ms = _csv_list(args.m, int) or ms
    dtypes = _csv_list(args.dtype, str) or dtypes
    bad = [d for d in dtypes if d not in bm.DTYPES]
    if bad:
        raise SystemExit(f"unknown dtype {bad}; choose from {sorted(bm.DTYPES)}")
    return mode, shapes, ms, dtypes


def write_op_results(out: Path, stem: str, rows: Sequence[bm.Row], env: bm.Environment, title: str) -> None:
    """``<stem>.csv``, ``<stem>.md`` and ``<stem>_<N>x<K>_<dtype>.png`` under ``out``."""
    names = all_shapes()
    bm.write_csv(out / f"{stem}.csv", rows, env)
    bm.write_markdown(out / f"{stem}.md", bm.speedup_markdown(rows, env, title, names))
    bm.plot_speedups(rows, env, out, prefix=stem, shape_names=names)


def merge_ops(args: argparse.Namespace) -> Tuple[Path, List[bm.Row]]:
    """Combine results CSVs of split runs into one set of files (rows keep their own environment)."""
    rows = [r for path in args.merge for r in bm.rows_from_csv(path)]
    if not rows:
        raise SystemExit("--merge: the CSVs hold no rows")
    env = rows[0].env
    shas = sorted({r.env.git_sha for r in rows if r.env})
    if len(shas) > 1:
        env = bm.Environment(env.gpu, env.torch, env.cuda, "/".join(shas))
    out = Path(args.out) if args.out else bm.results_dir(env)
    write_op_results(out, args.name or "ops", rows, env, "sparseq op sweep")
    return out, rows


def run_ops(args: argparse.Namespace) -> Tuple[Path, List[bm.Row]]:
    """Run the op sweep the options describe and write ``ops[_mode].csv/.md`` and PNGs; returns (folder, rows)."""
    if getattr(args, "merge", None):
        return merge_ops(args)
    if not args.smoke and not torch.cuda.is_available():
        print("sparseq bench: no CUDA GPU here, so no speed can be measured; running the CPU smoke mode "
              "instead (checks that the benchmark works; its times are not speed claims).")
        args.smoke = True
    device = torch.device("cpu") if args.smoke else bm.default_device()
    mode, shapes, ms, dtypes = op_plan(args)
    env = bm.environment(device)
    smoke = args.smoke
    timer = bm.Timer(device, warmup_ms=5 if mode == "quick" else 10,
                     rep_ms=args.rep_ms or (20 if mode == "quick" else 50), cpu_reps=2 if smoke else 5)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="sparseq-bench-smoke-")) if smoke
                                           else bm.results_dir(env))
    print(f"sparseq bench ({mode}): {env.header()}")
    if smoke:
        print(bm.smoke_env_note())
    rows = run_op_sweep(shapes, ms, dtypes, timer, include_reference=args.with_reference or smoke,
                        only=_csv_list(args.backends, str), check=not args.no_check)
    stem = args.name or ("ops" if mode == "full" else f"ops_{mode}")
    title = f"sparseq op sweep ({mode})" + (" — CPU smoke run, not a speed claim" if smoke else "")
    write_op_results(out, stem, rows, env, title)
    return out, rows


@command("bench")
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark sparseq kernels and layers against dense and peers")
    p.add_argument("--full", action="store_true", help="the whole suite: full op sweep and end-to-end runs")
    add_op_args(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """``sparseq bench``: a quick sweep by default, ``--full`` for the suite, ``--smoke`` on the CPU."""
    if not args.smoke and not args.full:
        args.quick = True
    out, rows = run_ops(args)
    timed = [r for r in rows if r.op not in bm.ONE_TIME_OPS]
    if len(timed) <= 400:
        bm.print_rows(timed)
    else:
        print(f"{len(timed)} measurements, {sum(1 for r in timed if r.error)} failed: see the .md tables")
    print(f"results: {out}")
    if args.full and not args.smoke and not args.merge:
        return run_e2e_script(["--out", str(out)])
    return 0


def run_e2e_script(argv: List[str]) -> int:
    """Run ``benchmarks/bench_e2e.py`` of the source checkout (not installed with the package)."""
    root = bm.repo_root()
    script = root / "benchmarks" / "bench_e2e.py" if root else None
    if script is None or not script.exists():
        print("sparseq bench --full: the end-to-end benchmark lives in benchmarks/bench_e2e.py of the source "
              "checkout; run it from there (python benchmarks/bench_e2e.py).")
        return 0
    spec = importlib.util.spec_from_file_location("sparseq_bench_e2e", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)
