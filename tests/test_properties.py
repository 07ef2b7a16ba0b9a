"""Property tests: every backend on this machine agrees with the reference over hundreds of
random shapes per op (``SPARSEQ_PROPERTY_CASES``, default 200), within the reference's stated
tolerances: int8 results and accumulators bit for bit, floats within ``sparseq.testing``'s
bound. Backends: Triton (under ``TRITON_INTERPRET=1`` on a CPU, compiled on a GPU) per op, and
the CPU layer paths (oneDNN int8, the dense copy) per layer format. Shapes include M = 0, odd
M, N and K, non-contiguous activations and all-zero rows."""
import os
import random
from typing import Callable, List, Optional, Tuple

import pytest
import torch
from torch import nn

import sparseq
from sparseq import dispatch
from sparseq import reference as ref
from sparseq.testing import check_layer_close, check_matmul_close

CASES = int(os.environ.get("SPARSEQ_PROPERTY_CASES", "200"))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
FLOATS = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])  # the interpreter has no bf16


def _triton(op: str) -> Callable:
    if not (INTERPRET or ON_GPU):
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU")
    pytest.importorskip("triton")
    handle = dispatch.triton_op(op)
    if handle is None:
        pytest.fail(f"no Triton kernel for {op}")
    return handle


class Case:
    """Random shapes and values from one seed: M (0, 1, odd, bucket edges), N, K (multiples of
    8 where 2:4 needs them), a float dtype, activations with zero and large rows, maybe strided."""

    def __init__(self, seed: int, k_multiple: int = 1) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self.rng = rng
        self.gen = torch.Generator().manual_seed(seed)
        self.m = rng.choice([0, 1, 2, 3, 7, 16, 17, 31, 64, 65, 100, 129])
        self.n = rng.choice([1, 3, 8, 16, 24, 40, 64, 72, 96])
        self.k = k_multiple * rng.randint(1, max(1, 320 // k_multiple))
        self.dtype = rng.choice(FLOATS)
        self.strided = rng.random() < 0.25

    def __repr__(self) -> str:
        return f"seed={self.seed} M={self.m} N={self.n} K={self.k} {self.dtype} strided={self.strided}"

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * scale

    def activations(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        x = self.randn(self.m, self.k, scale=self.rng.choice([1e-3, 1.0, 30.0]))
        if self.m > 2:
            x[1] = 0  # an all-zero row: scale 1 by the format
            x[2] *= 1e3 if (dtype or self.dtype) != torch.float16 else 10
        x = x.to(dtype or self.dtype)
        if self.strided:  # a column slice of a wider tensor: row stride != K
            wide = torch.zeros(self.m, self.k + 8, dtype=x.dtype)
            wide[:, 4:4 + self.k] = x
            x = wide[:, 4:4 + self.k]
        return x.to(DEVICE)

    def maybe(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        return t.to(DEVICE) if self.rng.random() < 0.5 else None

    def smooth(self) -> Optional[torch.Tensor]:
        return self.maybe(torch.rand(self.k, generator=self.gen) * 4 + 0.25)

    def weight(self) -> torch.Tensor:
        return self.randn(self.n, self.k, scale=self.rng.choice([0.02, 1.0]))


def _run_cases(op: str, build: Callable[[Case], Tuple[tuple, Callable]], k_multiple: int = 1) -> None:
    """Run the Triton op on ``CASES`` random cases; ``build(case) -> (args, check)`` where
    ``check(out, args)`` returns None or what is wrong. Fails naming every bad case."""
    kernel = _triton(op)
    failures: List[str] = []
    for seed in range(CASES):
        case = Case(seed, k_multiple)
        args, check = build(case)
        try:
            out = kernel(*args)
            problem = check(out, args)
        except Exception as e:  # noqa: BLE001  (reported with the case)
            problem = f"{type(e).__name__}: {e}"
        if problem:
            failures.append(f"{case}: {problem}")
    assert not failures, f"{op}: {len(failures)} of {CASES} cases differ from the reference:\n" + \
        "\n".join(failures[:10])


def _equal(expected):
    def check(out, _):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        exps = expected if isinstance(expected, (tuple, list)) else (expected,)
        for a, b in zip(outs, exps):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
                return f"not bit-identical (dtype {a.dtype}/{b.dtype}, shape {tuple(a.shape)}/{tuple(b.shape)})"
        return None
    return check


def test_quantize_per_token():
    def build(c):
        args = (c.activations(), c.smooth())
        return args, _equal(ref.quantize_per_token(*args))
    _run_cases("quantize_per_token", build)


def test_quantize_per_tensor():
    def build(c):
        x = c.activations()
        scale = torch.tensor([c.rng.choice([1e-4, 0.01, 0.3])], device=DEVICE)
        args = (x, scale, c.smooth())
        return args, _equal(ref.quantize_per_tensor(*args))
    _run_cases("quantize_per_tensor", build)


def _w8a8(c: Case):
    xq, xs = ref.quantize_per_token(c.activations(torch.float32))
    if c.rng.random() < 0.3:
        xs = torch.tensor([0.02], device=DEVICE)  # static per tensor
    wq, ws = ref.quantize_per_channel(c.weight().to(DEVICE))
    return xq, wq, xs, ws


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 outputs may overflow
def test_int8_mm():
    def build(c):
        xq, wq, xs, ws = _w8a8(c)
        out_dtype = c.rng.choice(ref.INT8_OUT_DTYPES if ON_GPU else (torch.float32, torch.float16))
        bias = c.maybe(c.randn(c.n).to(out_dtype))
        args = (xq, wq, xs, ws, bias, out_dtype)
        expected = ref.int8_mm(*args)
        return args, lambda out, a: check_matmul_close(out, expected, xq, wq, xs, ws, bias)
    _run_cases("int8_mm", build)


def test_int8_weight_only_mm():
    def build(c):
        x = c.activations()
        wq, ws = ref.quantize_per_channel(c.weight().to(DEVICE))
        bias = c.maybe(c.randn(c.n).to(c.dtype))
        args = (x, wq, ws, bias)
        expected = ref.int8_weight_only_mm(*args)
        return args, lambda out, a: check_matmul_close(out, expected, x, wq, None, ws, bias)
    _run_cases("int8_weight_only_mm", build)


def test_sparse24_mm():
    def build(c):
        x = c.activations()
        values, meta = ref.prune_and_compress_24(c.weight().to(c.dtype).to(DEVICE))
        bias = c.maybe(c.randn(c.n).to(c.dtype))
        args = (x, values, meta, bias)
        expected = ref.sparse24_mm(*args)
        w = ref.decompress_24(values, meta)
        return args, lambda out, a: check_matmul_close(out, expected, x, w, bias=bias)
    _run_cases("sparse24_mm", build, k_multiple=8)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_sparse24_int8_mm_w8a8_and_weight_only():
    def build(c):
        values, meta, ws = ref.prune_and_compress_24(c.weight().to(DEVICE), quantize=True)
        wq = ref.decompress_24(values, meta)
        if c.rng.random() < 0.5:  # W8A8
            xq, xs = ref.quantize_per_token(c.activations(torch.float32))
            out_dtype = c.rng.choice(ref.INT8_OUT_DTYPES if ON_GPU else (torch.float32, torch.float16))
            bias = c.maybe(c.randn(c.n).to(out_dtype))
            args = (xq, values, meta, ws, xs, bias, out_dtype)
            expected = ref.sparse24_int8_mm(*args)
            return args, lambda out, a: check_matmul_close(out, expected, xq, wq, xs, ws, bias)
        x = c.activations()
        bias = c.maybe(c.randn(c.n).to(c.dtype))
        args = (x, values, meta, ws, None, bias, None)
        expected = ref.sparse24_int8_mm(*args)
        return args, lambda out, a: check_matmul_close(out, expected, x, wq, None, ws, bias)
    _run_cases("sparse24_int8_mm", build, k_multiple=8)


@pytest.mark.parametrize("op, quantize", [("prune_and_compress_24", False), ("prune_and_compress_24_int8", True)])
def test_prune_and_compress(op, quantize):
    def build(c):
        w = c.weight().to(c.dtype).to(DEVICE)
        if c.rng.random() < 0.2:
            w[0] = 0  # an all-zero row
        args = (w, c.maybe(c.weight().abs().to(c.dtype)))
        return args, _equal(ref.prune_and_compress_24(*args, quantize=quantize))
    _run_cases(op, build, k_multiple=8)


# ------------------------------------------------------------ the reference's own laws


def test_reference_round_trips_and_bounds():
    for seed in range(CASES):
        c = Case(seed, 8)
        w = c.weight().to(c.dtype)
        pruned = torch.where(ref.prune_24(w), w, torch.zeros_like(w))
        assert ref.is_24_sparse(pruned), c
        kept = (pruned != 0).reshape(c.n, -1, 4)
        dropped_max = (w.float().abs().reshape(c.n, -1, 4) * ~kept).amax(-1)
        kept_min = torch.where(kept, w.float().abs().reshape(c.n, -1, 4), torch.inf).amin(-1)
        assert bool((dropped_max <= kept_min).all()), f"{c}: magnitude pruning dropped a larger value"
        assert torch.equal(ref.decompress_24(*ref.compress_24(pruned)), pruned + 0.0), c
        q, s = ref.quantize_per_channel(w)
        err = (q.float() * s[:, None] - w.float()).abs()
        assert bool((err <= s[:, None] * (0.5 + 2**-16)).all()), f"{c}: per-channel error above s/2 (+ fp32 rounding)"
        assert int(q.min()) >= -127, c
        xq, _ = ref.quantize_per_token(c.activations().cpu())
        acc = ref.int8_matmul_int32(xq, q)
        assert torch.equal(acc.double(), xq.double() @ q.double().T), c


# -------------------------------------------------------------- the CPU layer paths

LAYER_FORMATS = ["w8a8", "2:4+w8a8", "2:4", "int8_weight_only", "2:4+int8_weight_only"]


@pytest.mark.parametrize("fmt", LAYER_FORMATS)
def test_cpu_layer_paths(fmt):
    """oneDNN int8 (W8A8 formats) equals the reference op bit for bit; the dense path is within
    the dense bucket's bound of the format (``check_layer_close(dense_fallback=True)``) under the
    exact CPU numerics, and under the fast ones (float activations for dynamic W8A8) within that
    plus ``cpu_fbgemm.error_bound``, as is fbgemm."""
    from sparseq import dispatch
    from sparseq.nn.swap import FORMATS

    onednn = sparseq.kernels_available().get("onednn") is True
    fbgemm = sparseq.kernels_available().get("fbgemm") is True
    failures = []
    for seed in range(CASES // 4):
        c = Case(seed, 8)
        if c.dtype != torch.float32:
            c.dtype = torch.float32  # CPU layers in fp32 (the oneDNN path computes in fp32)
        linear = nn.Linear(c.k, c.n, bias=c.rng.random() < 0.7)
        cls, fixed = FORMATS[fmt]
        kwargs = dict(fixed)
        if "w8a8" in fmt and c.rng.random() < 0.4:
            kwargs["smooth"] = torch.rand(c.k, generator=c.gen) + 0.5
        if "w8a8" in fmt and c.rng.random() < 0.3:
            kwargs["act_amax"] = 2.0
        if fmt.startswith("2:4"):
            kwargs["prune"] = "magnitude"
        layer = cls.from_linear(linear, **kwargs)
        x = c.activations(torch.float32).cpu()
        reference_out = layer.backend_impl("reference", max(c.m, 1), torch.float32, torch.device("cpu"))(x)
        for numerics in dispatch.CPU_NUMERICS:
            with sparseq.cpu_numerics(numerics):
                impl = layer._dense_impl(torch.device("cpu"), torch.float32)
            approximate = numerics == "fast" and "w8a8" in fmt and layer.x_scale is None
            assert getattr(impl, "approximate", False) == approximate
            problem = check_layer_close(layer, x, impl(x), dense_fallback=True, approximate=approximate)
            if problem:
                failures.append(f"{c} dense ({numerics}): {problem}")
        if fbgemm and "w8a8" in fmt and layer.x_scale is None:
            out = layer.backend_impl("fbgemm", max(c.m, 1), torch.float32, torch.device("cpu"))(x)
            problem = check_layer_close(layer, x, out, approximate=True)
            if problem:
                failures.append(f"{c} fbgemm: {problem}")
        if onednn and "w8a8" in fmt:
            out = layer.backend_impl("onednn", max(c.m, 1), torch.float32, torch.device("cpu"))(x)
            if not torch.equal(out, reference_out):
                failures.append(f"{c} onednn: not bit-identical to the reference op")
    assert not failures, "\n".join(failures[:10])
