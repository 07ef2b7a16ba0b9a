"""sparseq._C_cpu's int8 weight-only GEMM (csrc/cpu/woq_cpu.cpp, dispatch backend ``cpu_woq``):
within the format's tolerance of the reference for every dtype and the shapes that exercise the
register blocks' tails, NaN/Inf rows as the reference, clear errors, the portable loop, and the
layers' dispatch to it (and away from it where it is absent)."""
import os
import subprocess
import sys

import pytest
import torch

import sparseq
from sparseq import cpu_kernels, cpu_ops, dispatch
from sparseq import reference as ref
from sparseq.testing import assert_matmul_close, check_layer_close, runs_dense_bucket

runs_here = pytest.mark.skipif(bool(cpu_kernels.weight_only_unavailable_reason()),
                               reason=cpu_kernels.weight_only_unavailable_reason() or "ok")
if not cpu_kernels.available() and os.environ.get("SPARSEQ_REQUIRE_CPU_EXTENSION") == "1":
    pytest.fail(f"SPARSEQ_REQUIRE_CPU_EXTENSION=1 but {cpu_kernels.unavailable_reason()}", pytrace=False)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _problem(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    torch.manual_seed(m * 1009 + n * 31 + k)
    x = torch.randn(m, k).to(dtype)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    ws = torch.rand(n) * 0.02 + 1e-3
    b = torch.randn(n) if bias else None
    return x, wq, ws, b


def _op(x, wq, ws, b):
    return torch.ops.sparseq.int8_weight_only_cpu(x, wq, ws, b)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (1, 13, 17), (2, 5, 40), (3, 17, 15), (4, 16, 384), (5, 3, 1),
                                   (7, 40, 100), (8, 21, 70), (9, 33, 64), (10, 19, 33), (11, 18, 50),
                                   (12, 16, 40), (13, 40, 300), (16, 24, 48), (16, 16, 1), (17, 19, 130),
                                   (29, 35, 520), (64, 70, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_is_within_the_format_tolerance(dtype, m, n, k, bias):
    """Shapes cover M = 1 (8-row weight blocks), 2-15 (6 x 4 register blocks with 1-5 row tails),
    16+ (the lane kernel: 16 activation rows per vector, the rows past the last whole chunk
    through the register blocks, K across its 256-column panels), N not a multiple of the
    blocks, K % 16 != 0 (masked tails), K < 16."""
    x, wq, ws, b = _problem(m, n, k, dtype, bias)
    y = _op(x, wq, ws, b)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_matmul_close(y, ref.int8_weight_only_mm(x, wq, ws, b), x, wq, None, ws, b)


@runs_here
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [8, 16, 40])
def test_split_over_threads_gives_the_same_answer(threads, m):
    """Each output is one task's sums: the thread count changes who computes it, not its value
    (M = 16 and 40: the lane kernel, each task with its own lane-major copy of the activations)."""
    x, wq, ws, b = _problem(m, 1000, 512, torch.float32, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _op(x, wq, ws, b)
        torch.set_num_threads(threads)
        assert torch.equal(_op(x, wq, ws, b), one)
    finally:
        torch.set_num_threads(before)
    assert_matmul_close(one, ref.int8_weight_only_mm(x, wq, ws, b), x, wq, None, ws, b)


@runs_here
def test_concurrent_calls_give_the_serial_answers(race):
    """Calls from 8 threads at once (each lane-kernel call transposes the activations into its
    own thread's buffer) equal the same calls made one after another."""
    problems = [_problem(m, 200 + 16 * i, 96 * (i % 3 + 1), torch.float32, i % 2 == 0)
                for i, m in enumerate([1, 4, 13, 16, 20, 40, 64, 16] * 2)]
    serial = [_op(*p) for p in problems]
    results = {}

    def worker(i):
        for j in range(i, len(problems), 8):
            for _ in range(5):
                results.setdefault(j, []).append(_op(*problems[j]))

    errors = race(worker, 8)
    assert not errors, errors
    for j, want in enumerate(serial):
        assert all(torch.equal(y, want) for y in results[j]), j


@runs_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [4, 16])
def test_empty_and_non_finite_rows_follow_the_reference(dtype, m):
    """M = 4: the register blocks; M = 16: the lane kernel (a row per lane)."""
    x, wq, ws, b = _problem(m, 21, 37, dtype, True)
    x[1, 5] = float("nan")
    x[2, 36] = float("inf")  # in the masked K tail
    y, want = _op(x, wq, ws, b), ref.int8_weight_only_mm(x, wq, ws, b)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    assert y[1].isnan().all() and not y[2].isfinite().any()
    assert torch.isfinite(y[[0, 3]]).all() and torch.isfinite(y[3:]).all()
    assert _op(x[:0], wq, ws, b).shape == (0, 21)
    empty_k = _op(torch.zeros(3, 0, dtype=dtype), wq[:, :0].contiguous(), ws, b)
    assert torch.equal(empty_k, b.to(dtype).expand(3, 21))


def test_bad_inputs_raise_clear_errors():
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.unavailable_reason())
    x, wq, ws, b = _problem(2, 4, 8, torch.float32, True)
    with pytest.raises(RuntimeError, match="wq must be Char, got Float"):
        _op(x, wq.float(), ws, b)
    with pytest.raises(RuntimeError, match=r"x is \[2, 8\] but wq is \[4, 7\] \(K must match\)"):
        _op(x, wq[:, :7].contiguous(), ws, b)
    with pytest.raises(RuntimeError, match=r"w_scale must have shape \[4\], got \[3\]"):
        _op(x, wq, ws[:3], b)
    with pytest.raises(RuntimeError, match="bias must be Float, got BFloat16"):
        _op(x, wq, ws, b.bfloat16())
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        _op(torch.randn(8, 2).t(), wq, ws, b)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        _op(x.double(), wq, ws, b)


@runs_here
def test_wrapper_declines_what_the_kernel_does_not_read(monkeypatch):
    x, wq, ws, b = _problem(3, 8, 32, torch.float32, True)
    assert cpu_kernels.int8_weight_only(x.double(), wq, ws, b) is None
    assert cpu_kernels.int8_weight_only(x[None], wq, ws, b) is None
    assert cpu_kernels.int8_weight_only(x, wq, ws.double(), b) is None
    strided = torch.randn(32, 3).t()  # the wrapper makes activations contiguous
    assert_matmul_close(cpu_kernels.int8_weight_only(strided, wq, ws, b),
                        ref.int8_weight_only_mm(strided, wq, ws, b), strided, wq, None, ws, b)
    cpu_kernels.weight_only_unavailable_reason.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    try:
        assert "needs AVX-512 (torch reports AVX2)" in cpu_kernels.weight_only_unavailable_reason()
        assert cpu_kernels.int8_weight_only(x, wq, ws, b) is None
        assert cpu_ops.woq_impl(wq, ws, b, torch.float32) is None
    finally:
        cpu_kernels.weight_only_unavailable_reason.cache_clear()


_PORTABLE = """
import torch, sparseq.cpu_kernels, sparseq._C_cpu
from sparseq import reference as ref
from sparseq.testing import assert_matmul_close
torch.manual_seed(0)
for m, n, k in [(1, 13, 17), (5, 9, 40), (16, 24, 48)]:
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k).to(dtype); wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        ws = torch.rand(n) * 0.02 + 1e-3; b = torch.randn(n)
        y = torch.ops.sparseq.int8_weight_only_cpu(x, wq, ws, b)
        assert_matmul_close(y, ref.int8_weight_only_mm(x, wq, ws, b), x, wq, None, ws, b)
print("portable ok")
"""


def test_the_portable_loop_is_within_the_tolerance_too():
    """SPARSEQ_CPU_WOQ_PORTABLE=1 forces the loop CPUs without AVX-512 run (read once per process)."""
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.unavailable_reason())
    env = {**os.environ, "SPARSEQ_CPU_WOQ_PORTABLE": "1"}
    out = subprocess.run([sys.executable, "-c", _PORTABLE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "portable ok" in out.stdout, out.stderr[-2000:]


def _layer(fmt: str, n: int, k: int, dtype: torch.dtype):
    torch.manual_seed(n + k)
    model = torch.nn.Sequential(torch.nn.Linear(k, n).to(dtype))
    sparseq.swap(model, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
    return model[0]


@runs_here
@pytest.mark.parametrize("fmt", ["int8_weight_only", "2:4+int8_weight_only"])
def test_layers_dispatch_to_it_where_the_tables_say(fmt, xeon_tables):
    """fp32: M = 1, M = 2-16 on a MiniLM-sized layer with one intra-op thread (with more, its
    dense GEMV wins there: a per-call switch) and M = 17-64 (the lane kernel) with any;
    2048x2048 at M = 2-64 with any thread count; 384x384 dense from M = 2; bf16: M = 1-7, dense
    from M = 8 (AMX bf16 dense wins there); fp16: M = 1-16, dense from M = 17. Every output
    checked against the dense layer, at 1 and 2 threads."""
    cpu = torch.device("cpu")
    mid = _layer(fmt, 1536, 384, torch.float32)
    assert {b: mid.prepare(cpu)[b] for b in ("1", "2-16", "17-64", "65-256")} == \
        {"1": "cpu_woq", "2-16": "cpu_woq (1 thread) / dense", "17-64": "cpu_woq", "65-256": "dense"}
    assert {b: _layer(fmt, 2048, 2048, torch.float32).prepare(cpu)[b] for b in ("2-16", "17-64")} == \
        {"2-16": "cpu_woq", "17-64": "cpu_woq"}
    assert {b: _layer(fmt, 384, 384, torch.float32).prepare(cpu)[b] for b in ("2-16", "17-64")} == \
        {"2-16": "dense", "17-64": "dense"}
    bf16 = _layer(fmt, 1536, 384, torch.bfloat16)
    assert bf16.prepare(cpu)["2-16"] == "M<8: cpu_woq; M>=8: dense"
    fp16 = _layer(fmt, 1536, 384, torch.float16)
    assert {b: fp16.prepare(cpu)[b] for b in ("2-16", "17-64")} == {"2-16": "cpu_woq", "17-64": "dense"}
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for layer in (mid, bf16, fp16):
                    for m in (1, 3, 8, 16, 40):
                        check_layer_close(layer, torch.randn(m, 384).to(layer.dtype))
    finally:
        torch.set_num_threads(before)
    # behind the per-call switch, the checks see which side ran (the dense side rounds its weight
    # copy to bf16: a wider bound; bench_cpu.py flagged M = 16 cells before they did)
    assert runs_dense_bucket(bf16, torch.randn(16, 384, dtype=torch.bfloat16))
    assert not runs_dense_bucket(bf16, torch.randn(4, 384, dtype=torch.bfloat16))


@pytest.mark.parametrize("fmt", ["int8_weight_only", "2:4+int8_weight_only"])
def test_layers_fall_back_where_the_kernel_does_not_run(fmt, monkeypatch):
    monkeypatch.setattr(cpu_ops, "woq_runs", lambda dtype: False)
    layer = _layer(fmt, 1536, 384, torch.float32)
    backends = layer.prepare(torch.device("cpu"))
    assert "cpu_woq" not in " ".join(backends.values()) and backends["1"] == "dense"
    with torch.inference_mode():
        check_layer_close(layer, torch.randn(3, 384))


def test_tables_keep_large_bf16_layers_dense_from_m5(xeon_tables):
    """max_nk: bf16 cpu_woq only up to N*K = 2**21 in the 2-7 part (4096x4096 M = 5-7 lost)."""
    cpu = torch.device("cpu")
    prefs = dispatch.preferences("int8_weight_only_mm", 4096, 4096, torch.bfloat16, cpu, 4)
    assert prefs[0] == "dense"
    assert dispatch.preferences("int8_weight_only_mm", 4096, 4096, torch.bfloat16, cpu, 1)[0] == "cpu_woq"
    assert dispatch.preferences("int8_weight_only_mm", 384, 384, torch.bfloat16, cpu, 4)[0] == "cpu_woq"
    assert dispatch.preferences("int8_weight_only_mm", 384, 384, torch.float32, cpu, 4)[0] == "dense"
    assert dispatch.preferences("int8_weight_only_mm", 4096, 4096, torch.float32, cpu, 16)[0] == "cpu_woq"
    # tiny layers at M = 1: the fixed costs win (fp32 64x64 0.88-0.92x); bf16 from 128x128 (4x)
    assert "cpu_woq" not in dispatch.preferences("int8_weight_only_mm", 64, 64, torch.float32, cpu, 1)
    assert dispatch.preferences("int8_weight_only_mm", 256, 256, torch.float32, cpu, 1)[0] == "cpu_woq"
    assert dispatch.preferences("int8_weight_only_mm", 128, 128, torch.bfloat16, cpu, 1)[0] == "cpu_woq"


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_runs_the_kernel(dtype):
    """fullgraph: the op has a fake implementation, so torch.compile traces it without a break."""
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384)).to(dtype)
    sparseq.swap(model, "int8_weight_only")
    sparseq.nn.prepare(model)
    assert model[0].prepare(torch.device("cpu"), dtype)["1"] == "cpu_woq"
    x = torch.randn(1, 384).to(dtype)
    torch._dynamo.reset()  # a fresh recompile budget (the other compile tests share the forward code)
    try:
        with torch.no_grad():
            layer = torch.compile(model[0], fullgraph=True)  # the kernel alone: the same bits as eager
            torch.testing.assert_close(layer(x), model[0](x), rtol=0, atol=0)
            compiled = torch.compile(model, fullgraph=True)  # inductor's GELU rounds its own way
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
