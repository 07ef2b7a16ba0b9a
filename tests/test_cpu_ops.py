"""The CPU backends: oneDNN int8 GEMM (sparseq.cpu_ops) against the reference W8A8 format,
and the CPU dispatch of every layer (dense copies built once; thread and compile safety)."""
import copy

import pytest
import torch
from torch import nn

import sparseq
import sparseq.nn
from sparseq import cpu_kernels, cpu_ops, dispatch
from sparseq import reference as ref
from sparseq.nn import FORMATS
from sparseq.testing import assert_layer_close, check_matmul_close

pytestmark = pytest.mark.usefixtures("exact_cpu_numerics")  # the bit-exact CPU paths (fast ones: test_cpu_fbgemm.py)
needs_onednn = pytest.mark.skipif(bool(cpu_ops.unavailable_reason()), reason=cpu_ops.unavailable_reason() or "ok")
GEMMS = ["onednn", "onednn-s8", "onednn-u8", "onednn-u8-torch-ops", "int_mm"]
"""oneDNN in this machine's activation form, in each form forced (``-torch-ops``: the
activations quantized and scaled by torch ops, as without ``sparseq._C_cpu``), and
``torch._int_mm``."""


def _kwargs(fmt):
    return {"prune": "magnitude"} if fmt.startswith("2:4") else {}


@needs_onednn
@pytest.mark.parametrize("m,n,k", [(1, 64, 96), (7, 48, 40), (33, 128, 256), (0, 16, 32)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemm", GEMMS)
def test_onednn_w8a8_is_the_reference_format(m, n, k, static, smooth, out_dtype, gemm, monkeypatch):
    """Per-token (or static) activation quantization bit-exact with the reference, exact int32
    accumulation, the epilogue in the reference's order: the output equals the reference's."""
    torch.manual_seed(m * 131 + n + k)
    x = torch.randn(m, k) * 3
    x[:, :1] *= 40  # an outlier channel, as SmoothQuant sees them
    if m:
        x[0] = 0.0  # an all-zero token: scale 1
    w = torch.randn(n, k)
    f = torch.rand(k) + 0.5 if smooth else None
    wq, ws = ref.quantize_per_channel(w)
    bias = torch.randn(n)
    xs = ref.per_tensor_scale(float((x / (f if smooth else 1)).abs().amax() * 0.8)) if static and m else None
    if static and not m:
        xs = torch.ones(1)
    y = cpu_ops.run_w8a8(x, _packed(wq, gemm, monkeypatch), ws, f, xs, bias, out_dtype)
    if static:
        xq, s = ref.quantize_per_tensor(x, xs, f), xs
    else:
        xq, s = ref.quantize_per_token(x, f)
    want = ref.int8_mm(xq, wq, s, ws, bias, out_dtype)
    msg = check_matmul_close(y, want, xq, wq, s, ws, bias, exact_accumulator=True)
    assert msg is None, msg
    assert torch.equal(y, want)


@pytest.mark.parametrize("m,k", [(1, 8), (5, 96), (64, 384), (3, 1)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_int8_is_the_reference_activation_grid(m, k, smooth, static, dtype):
    """The CPU quantizer equals ``reference.activation_grid`` bit for bit: ties (round half to
    even), clamping, all-zero rows (scale 1), denormal maxima, non-finite rows (scale NaN/Inf)."""
    torch.manual_seed(m * 7 + k)
    x = torch.randn(m, k) * 5
    x[0, 0] = 127.0  # with the row max 127: scale 1, so the .5 values below are exact ties
    x[0, 1:] = (torch.arange(k - 1) % 9 - 4) + 0.5
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2] = 1e-44 * torch.sign(torch.randn(k))  # denormal row maximum
    if m > 3:
        x[3, 0] = float("nan")
    if m > 4:
        x[4, -1] = float("inf")
    x = x.to(dtype)
    f = torch.rand(k) + 0.5 if smooth else None
    xs = ref.per_tensor_scale(3.5) if static else None
    q, s = cpu_ops.quantize_int8(x, f, xs)
    grid, want_s = ref.activation_grid(x, f, xs)
    u, s_u = cpu_ops.quantize_int8(x, f, xs, offset=True)  # oneDNN's uint8 form: q + 128
    assert u.dtype == torch.uint8 and torch.equal(u, (q.int() + 128).to(torch.uint8))
    torch.testing.assert_close(s_u, s, rtol=0, atol=0, equal_nan=True)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, want_s, rtol=0, atol=0, equal_nan=True)
    finite = torch.isfinite(want_s)
    assert torch.equal(q[finite], grid[finite].to(torch.int8))
    assert not finite[:3].logical_not().any()  # only the NaN / Inf rows are not finite


def _packed(wq, gemm, monkeypatch):
    """The weight as ``run_w8a8`` takes it for one GEMM (``prepack`` picks by layer size); an
    ``onednn-s8`` / ``onednn-u8`` GEMM also forces that activation form."""
    if gemm.startswith(("onednn-s8", "onednn-u8")):
        monkeypatch.setattr(cpu_ops, "signed_activations", lambda: gemm == "onednn-s8")
    if gemm.endswith("-torch-ops"):
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    return cpu_ops.onednn_prepack(wq) if gemm.startswith("onednn") else wq.contiguous()


@needs_onednn
def test_prepack_picks_int_mm_for_small_layers_only():
    small = torch.ones(64, cpu_ops.INT_MM_MAX_NK // 64, dtype=torch.int8)
    large = torch.ones(64, cpu_ops.INT_MM_MAX_NK // 64 + 8, dtype=torch.int8)
    assert not cpu_ops.prepack(small).is_mkldnn and cpu_ops.prepack(large).is_mkldnn
    assert cpu_ops.prepack(torch.ones(8, 1, dtype=torch.int8)).is_mkldnn  # K = 1: torch's _int_mm is wrong there


@needs_onednn
@pytest.mark.parametrize("gemm", GEMMS)
def test_onednn_accumulates_exactly_at_the_int8_extremes(gemm, monkeypatch):
    """All +-127 operands over K = 4096: any saturation or 16-bit intermediate would show."""
    k = 4096
    xq = torch.full((2, k), 127, dtype=torch.int8)
    xq[1, ::2] = -127
    wq = torch.full((3, k), 127, dtype=torch.int8)
    wq[2] = -127
    x = xq.float()  # scale 1 per token: quantizing x gives back xq
    y = cpu_ops.run_w8a8(x, _packed(wq, gemm, monkeypatch), torch.ones(3), None, None, None, torch.float32)
    exact = (xq.double() @ wq.double().T).float()
    assert torch.equal(y, exact), (y, exact)


ONEDNN_IMPLEMENTATION = """
import torch
from sparseq import cpu_ops
wq = torch.randint(-127, 128, (256, 512), dtype=torch.int8)
cpu_ops.run_w8a8(torch.randn(16, 512), cpu_ops.onednn_prepack(wq), torch.ones(256), None, None, None, torch.float32)
"""


@needs_onednn
def test_onednn_runs_an_optimized_kernel_for_the_activation_form_chosen_here():
    """oneDNN names the implementation it ran (``ONEDNN_VERBOSE=1``): a ``ref`` one is its scalar
    reference kernel, which it picks for int8 activations on CPUs without AMX (1.45 s vs 0.34 ms
    for 16 x 2048 x 2048 on AMD Zen 4): :func:`cpu_ops.signed_activations` must avoid it here."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", ONEDNN_IMPLEMENTATION], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr
    matmuls = [line for line in out.stdout.splitlines() if ",exec," in line and ",matmul," in line]
    assert matmuls, out.stdout[-2000:]  # the verbose lines are there: the check below can fail
    assert not [line for line in matmuls if ",ref" in line], matmuls


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layers_run_their_fast_backend_and_match_the_dense_layer(fmt, dtype):
    torch.manual_seed(0)
    layer = sparseq.nn.make_layer(nn.Linear(256, 96).to(dtype), fmt, **_kwargs(fmt))
    x = torch.randn(21, 256, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    backend = layer.backends[(torch.device("cpu"), dispatch.bucket_of(21), dtype)]
    if fmt in ("w8a8", "2:4+w8a8") and not cpu_ops.unavailable_reason():
        assert backend == "onednn"
    elif fmt not in ("w8a8", "2:4+w8a8"):
        assert backend == "dense"
    assert_layer_close(layer, x, out=y, dense_fallback=backend == "dense")


@pytest.mark.parametrize("fmt", ["int8_weight_only", "2:4+int8_weight_only"])
@pytest.mark.parametrize("n,k", [(96, 256), (384, 1536), (17, 48), (16, 40)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("woq", [False, True])
def test_weight_only_layers_read_int8_weights_in_bf16_at_m1(fmt, n, k, bias, woq, monkeypatch, xeon_tables):
    """Without sparseq's own kernel (``cpu_woq``: no AVX-512, no extension), bf16 at M = 1:
    torch._weight_int8pack_mm on the int8 weight (``int8pack``), within the format's bound of the
    dense layer; fp32, larger M, a bias (rounded after the kernel's own rounding) and K not a
    multiple of 16 (where torch's kernel is wrong) keep the dense copy. With it, ``cpu_woq``
    runs them on layers large enough (bf16 M = 5 at every size)."""
    if woq and not cpu_ops.woq_runs(torch.float32):
        pytest.skip("sparseq's int8 weight-only CPU kernel does not run here")
    if not woq:
        monkeypatch.setattr(cpu_ops, "woq_runs", lambda dtype: False)
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, 1) * 4)  # channel scales far apart
    cpu = torch.device("cpu")
    fast = "int8pack" if k % cpu_ops.WEIGHT_ONLY_K_MULTIPLE == 0 and not bias else "dense"
    cases = [(torch.bfloat16, 1, fast), (torch.bfloat16, 5, "dense"), (torch.float32, 1, "dense")]
    if woq:  # at M = 1 from N*K = 2**14 (bf16) / 2**16 (fp32): tiny layers' fixed costs win below
        cases = [(torch.bfloat16, 1, "cpu_woq" if n * k >= 2**14 else fast),
                 (torch.bfloat16, 5, "M<8: cpu_woq; M>=8: dense"),
                 (torch.float32, 1, "cpu_woq" if n * k >= 2**16 else "dense")]
    for dtype, m, want in cases:
        layer = sparseq.nn.make_layer(copy.deepcopy(lin).to(dtype), fmt, **_kwargs(fmt))
        x = torch.randn(m, k, dtype=dtype) * 3
        with torch.no_grad():
            y = layer(x)
        assert layer.backends[(cpu, dispatch.bucket_of(m), dtype)] == want
        assert_layer_close(layer, x, out=y, dense_fallback=want == "dense")


def test_weight_only_kernel_stays_within_the_bound_over_many_layers(monkeypatch):
    """Scales applied in fp32 after the kernel (bf16 scales inside it were 2 ulps off the
    reference on a 384x384 layer, found by bench_cpu.py --quick); layers with a bias decline.
    (torch's kernel: where sparseq's ``cpu_woq`` runs it comes first.)"""
    monkeypatch.setattr(cpu_ops, "woq_runs", lambda dtype: False)
    for seed in range(12):
        torch.manual_seed(seed)
        layer = sparseq.nn.make_layer(nn.Linear(384, 384, bias=False).to(torch.bfloat16), "int8_weight_only")
        x = torch.randn(1, 384, dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        assert layer.backends[(torch.device("cpu"), 0, torch.bfloat16)] == "int8pack"
        assert_layer_close(layer, x, out=y)


def test_weight_only_impl_declines_fp32_and_handles_empty_batches():
    wq = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    assert cpu_ops.weight_only_impl(wq, torch.ones(8), None, torch.float32) is None
    assert cpu_ops.weight_only_impl(wq, torch.ones(8), torch.zeros(8), torch.bfloat16) is None  # a bias
    run = cpu_ops.weight_only_impl(wq, torch.ones(8), None, torch.bfloat16)
    assert run(torch.empty(0, 16, dtype=torch.bfloat16)).shape == (0, 8)
    assert cpu_ops.weight_only_impl(wq[:, :8], torch.ones(8), None, torch.bfloat16) is None  # K % 16 != 0


def test_cpu_derived_tensors_are_built_once(monkeypatch):
    built = []
    real = cpu_ops.prepack
    monkeypatch.setattr(cpu_ops, "prepack", lambda wq: built.append(1) or real(wq))
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    sparseq.swap(model, {"0": "w8a8", "1": "2:4"}, prune="magnitude")
    calls = []
    real_dense = model[1].dense_weight
    monkeypatch.setattr(model[1], "dense_weight", lambda *a: calls.append(1) or real_dense(*a))
    with torch.no_grad():
        for m in (1, 3, 5, 16, 100, 3, 1):
            model(torch.randn(m, 64))
    assert len(calls) == 1  # the 2:4 dense copy: once for every bucket and call
    assert len(built) == (0 if cpu_ops.unavailable_reason() else 1)
    assert not any(k[0].startswith("dense") for k in model[1].state_dict())  # never saved


def test_threads_and_thread_counts_agree(race):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 64))
    sparseq.swap(model, {"0": "w8a8", "2": "2:4+w8a8", "3": "int8_weight_only"}, prune="magnitude")
    inputs = [torch.randn(i * 37 % 200 + 1, 128) for i in range(16)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            single = [model(x) for x in inputs]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # a GEMM may split K differently
    racing = copy.deepcopy(model)  # empty caches: the threads race on the first resolution
    results = {}

    def worker(i):
        with torch.no_grad():
            for j in range(i, len(inputs), 8):
                results[j] = racing(inputs[j])

    errors = race(worker, 8)
    assert not errors, errors
    for j, x in enumerate(inputs):
        torch.testing.assert_close(results[j], expected[j], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_layer_compiles():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sparseq.swap(model, "w8a8")
    sparseq.nn.prepare(model)  # the fast CPU path is what gets compiled
    assert {b for (_, bucket, _), b in model[0].backends.items() if bucket > 0} == {"onednn"}
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(9, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
