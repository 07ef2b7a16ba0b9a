"""The op sweep checks every contender elementwise, within the bounds of ``sparseq.testing``.

A fast wrong kernel must become an error row, never a time: one wrong 16x32 tile of a larger
output is reported, int8 x int8 outputs are held to the exact-accumulator bound, a contender
without a reference is never silently passed, and ``--no-check`` results say so in the CSV
and the markdown.
"""
import argparse

import pytest
import torch
import torch.nn.functional as F

from sparseq import benchmarks as bm
from sparseq import reference as ref
from sparseq import testing

CPU = torch.device("cpu")


def _dense() -> bm.Contender:
    return bm.Contender("linear", "torch", "dense", lambda w: w, lambda w, x: lambda: F.linear(x, w))


def _sweep(contenders, n=256, k=256, ms=(64,), dtype="fp16", check=True):
    timer = bm.Timer(CPU, cpu_reps=1)
    return bm.sweep_shape(n, k, list(ms), dtype, [_dense(), *contenders], timer, check=check, log=lambda s: None)


def _timed(rows, backend):
    hits = [r for r in rows if r.backend == backend and r.op not in bm.ONE_TIME_OPS]
    assert hits, f"no row for {backend}"
    return hits


def _one_tile_off(y: torch.Tensor, factor: float = 1.05) -> torch.Tensor:
    """``y`` with one 16x32 tile (rows 16-31, columns 32-63) scaled by ``factor``."""
    y = y.clone()
    y[16:32, 32:64] *= factor
    return y


def test_one_wrong_tile_of_a_larger_output_is_a_wrong_result():
    wrong = bm.Contender("gemm", "tile", "2:4", lambda w: w, lambda w, x: lambda: _one_tile_off(F.linear(x, w)),
                         sparse=True)
    right = bm.Contender("gemm", "right", "2:4", lambda w: w, lambda w, x: lambda: F.linear(x, w), sparse=True)
    rows = _sweep([wrong, right])
    (bad,), (good,) = _timed(rows, "tile"), _timed(rows, "right")
    assert bad.error and "wrong result" in bad.error and bad.time_us is None
    assert "[16, 32]" in bad.error  # the first offending element is named
    assert good.error is None and good.time_us > 0 and good.checked == "yes"
    # what the old check let through: the tile is 3% of the output, its relative L2 error < 1%
    x, w = torch.randn(64, 256), torch.randn(256, 256)
    y = F.linear(x, w)
    assert float((_one_tile_off(y) - y).norm() / y.norm()) < 2e-2


def test_w8a8_output_is_held_to_the_exact_accumulator_bound():
    def call(st, x):
        xq, sx = ref.quantize_per_token(x)
        y = ref.int8_mm(xq, st[0], sx, st[1], None, x.dtype)
        y[40, 100] = y[40, 100] * (1 + 4 * torch.finfo(y.dtype).eps)  # a few ulps off in one element
        return lambda: y

    off = bm.Contender("gemm", "ulps", "w8a8", ref.quantize_per_channel, call, expect="w8a8")
    (row,) = _timed(_sweep([off]), "ulps")
    assert row.error and "wrong result" in row.error and "[40, 100]" in row.error


def test_int32_and_int8_outputs_must_be_exact():
    x, w = torch.randn(8, 64), torch.randn(32, 64) * 0.02
    xq, _ = ref.quantize_per_token(x)
    wq, _ = ref.quantize_per_channel(w)
    acc = ref.int8_matmul_int32(xq, wq)
    check = bm.reference_check("int32", x, w, torch.float16)
    assert check(acc) is None
    off = acc.clone()
    off[3, 7] += 1
    assert "[3, 7]" in check(off)
    sat = bm.reference_check("int8_saturated", x, w, torch.float16)
    assert sat(acc.clamp(-128, 127).to(torch.int8)) is None
    assert sat(acc.to(torch.int8)) is not None  # wrapped, not saturated: wrong


def test_every_torch_contender_has_a_reference():
    """The cuSPARSELt int8 contender used to be timed with ``expect=""`` (never checked)."""
    contenders = bm.torch_contenders(torch.float16)
    assert any(c.backend == "torch-cusparselt" and "int8" in c.format for c in contenders)
    for c in contenders:
        assert c.expect in bm.CHECK_KINDS, c.key
    kinds = {c.format: c.expect for c in contenders if c.backend == "torch-cusparselt"}
    assert kinds["2:4+int8 (int8 out)"] == "int8_saturated"


def test_unchecked_contender_is_not_silently_passed():
    silent = bm.Contender("gemm", "silent", "2:4", lambda w: w, lambda w, x: lambda: F.linear(x, w), expect="")
    said = bm.Contender("gemm", "said", "2:4", lambda w: w, lambda w, x: lambda: F.linear(x, w), expect="",
                        unchecked="no reference for this output")
    rows = _sweep([silent, said], n=64, k=64, ms=(4,))
    (s,), (d,) = _timed(rows, "silent"), _timed(rows, "said")
    assert s.error and "no reference" in s.error and s.time_us is None
    assert d.error is None and d.checked == "no: no reference for this output"
    md = bm.speedup_markdown(rows, bm.Environment("cpu", "t", "none", "abc"), "t")
    line = next(ln for ln in md.splitlines() if ln.startswith("| said"))
    assert bm.UNCHECKED_MARK in line
    assert "no reference for this output" in md


def test_no_check_rows_and_tables_carry_the_marker(tmp_path):
    p = argparse.ArgumentParser()
    bm.add_op_args(p)
    args = p.parse_args(["--smoke", "--no-check", "--m", "1", "--backends", "reference", "--out", str(tmp_path)])
    _, rows = bm.run_ops(args)
    csv_rows = bm.read_csv(tmp_path / "ops_smoke.csv")
    assert "checked" in bm.CSV_COLUMNS
    timed = [r for r in csv_rows if r["op"] not in bm.ONE_TIME_OPS and not r["time_us"].startswith(bm.ERROR_PREFIX)]
    assert timed and all(r["checked"] == "no: --no-check" for r in timed)
    md = (tmp_path / "ops_smoke.md").read_text()
    assert "--no-check" in md and "not checked" in md
    dense_line = next(ln for ln in md.splitlines() if ln.startswith("| torch dense"))
    assert bm.UNCHECKED_MARK in dense_line


def test_checked_run_marks_rows_checked(tmp_path):
    rows = _sweep([], n=64, k=64, ms=(1, 4))
    env = bm.Environment("cpu", "t", "none", "abc")
    back = bm.read_csv(bm.write_csv(tmp_path / "x.csv", rows, env))
    assert [r["checked"] for r in back if r["time_us"] and not r["time_us"].startswith(bm.ERROR_PREFIX)
            and r["op"] not in bm.ONE_TIME_OPS] == ["yes", "yes"]
    md = bm.speedup_markdown(rows, env, "t")
    assert bm.UNCHECKED_MARK not in md
    again = bm.rows_from_csv(tmp_path / "x.csv")
    assert [r.checked for r in again if r.M] == ["yes", "yes"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_device_check_agrees_with_sparseq_testing(dtype):
    """``testing.check_matmul_close`` by row blocks, computed where the tensors are."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 96, generator=gen).to(dtype)
    w = (torch.randn(40, 96, generator=gen) * 0.02).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    exp = (x.float() @ w.float().T + bias.float()).to(dtype)
    ok = F.linear(x, w, bias)
    assert testing.check_matmul_close(ok, exp, x, w, bias=bias) is None
    assert testing.check_matmul_close(ok, exp, x, w, bias=bias) is None
    bound = testing.matmul_bound(exp, 96, testing.magnitude(x, w, bias=bias))
    for factor, inside in ((0.5, True), (3.0, False)):  # half the bound in, three times out, at one element
        out = exp.clone()
        out[5, 9] = float(exp[5, 9].double() + factor * bound[5, 9])
        assert (testing.check_matmul_close(out, exp, x, w, bias=bias) is None) is inside
        assert (testing.check_matmul_close(out, exp, x, w, bias=bias) is None) is inside
        if not inside:
            assert "[5, 9]" in testing.check_matmul_close(out, exp, x, w, bias=bias)
    xq, sx = ref.quantize_per_token(x)
    wq, sw = ref.quantize_per_channel(w)
    y = ref.int8_mm(xq, wq, sx, sw, None, dtype)
    for out in (y, y.clone().index_put_((torch.tensor([2]), torch.tensor([3])), y[2, 3] * 1.01 + 1e-3)):
        assert (testing.check_matmul_close(out, y, xq, wq, sx, sw) is None) == \
               (testing.check_matmul_close(out, y, xq, wq, sx, sw) is None)
    assert testing.check_matmul_close(ok.double(), exp, x, w) == f"dtype torch.float64, expected {dtype}"
    assert testing.check_matmul_close(ok[:3], exp, x, w).startswith("shape (3, 40)")


def test_sparseq_layers_are_checked_against_the_dense_layer_they_replace(monkeypatch):
    """A ``sparseq.nn`` contender that drops the bias or is off in one tile is a wrong result."""
    from sparseq import dispatch, ops

    monkeypatch.setattr(dispatch, "preferences", lambda *a: ["reference"])  # the path the fault is put in

    contenders = [c for c in bm.swap_contenders()[0] if c.format in ("2:4", "int8_weight_only")]
    assert {c.expect for c in contenders} == {"layer"}
    rows = _sweep(contenders, n=128, k=128, ms=(48,))
    assert all(r.error is None and r.checked == "yes" for r in rows if r.backend == "sparseq.nn" and r.M)
    real = ops.sparse24_mm
    monkeypatch.setattr(ops, "sparse24_mm", lambda x, v, m, b=None: _one_tile_off(real(x, v, m, b), 1.01))
    rows = _sweep(contenders, n=128, k=128, ms=(48,))
    by = {r.format: r for r in rows if r.backend == "sparseq.nn" and r.M}
    assert "wrong result" in by["2:4"].error and by["int8_weight_only"].error is None


def test_bench_triton_reports_one_wrong_tile(monkeypatch, load_benchmark):
    """``benchmarks/bench_triton.py`` checks every kernel output elementwise (it used relative L2 <= 1e-2)."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU only in the interpreter")
    from sparseq.kernels import sparse24_mm

    script = load_benchmark("bench_triton", "_bench_triton_checks")
    real = sparse24_mm.sparse24_mm
    monkeypatch.setattr(sparse24_mm, "sparse24_mm", lambda *a, **k: _one_tile_off(real(*a, **k), 1.01))
    rows = script.run([(64, 128)], [32], "fp16", bm.Timer(CPU, cpu_reps=1), CPU)
    by = {(r.op, r.format): r for r in rows if r.M}
    assert "wrong result" in by[("gemm", "2:4")].error and "[16, 32]" in by[("gemm", "2:4")].error
    assert all(r.error is None and r.checked == "yes" for key, r in by.items() if key != ("gemm", "2:4"))


def test_layer_check_follows_sparseq_testing_and_the_dense_bucket(monkeypatch):
    """``bm.check_layer`` is ``testing.check_layer_close``, with the dense bucket's wider bound
    exactly when the layer ran its dense copy for that M (as it may on a GPU)."""
    from sparseq import dispatch
    from sparseq.nn import make_layer

    monkeypatch.setattr(dispatch, "preferences", lambda *a: ["reference"])  # a kernel path, not dense

    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    layer = make_layer(lin, "int8_weight_only")
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert bm.check_layer(layer, x, y) is None and testing.check_layer_close(layer, x, y) is None
    expected, xf, w = testing.layer_expected(layer, x)
    mag = testing.magnitude(xf, w, bias=layer.bias)
    bound = testing.matmul_bound(expected, 64, mag)
    off = expected.clone()
    off[2, 3] = float(expected[2, 3].double() + bound[2, 3] + 0.5 * torch.finfo(torch.bfloat16).eps * mag[2, 3])
    assert testing.check_layer_close(layer, x, off) is not None and bm.check_layer(layer, x, off) is not None
    assert testing.check_layer_close(layer, x, off, dense_fallback=True) is None
    key = (x.device, dispatch.bucket_of(6), torch.bfloat16)
    layer.backends[key] = "dense"  # what the layer records when its dense bucket ran
    assert bm.check_layer(layer, x, off) is None


def test_cutlass_contenders_run_on_prepared_meta_and_pass_the_check():
    """The CUTLASS ops take prepared metadata: the op sweep converts the canonical meta once
    (their CPU implementations run here), and the W8A8-only kernels get no weight-only row."""
    import sparseq.cuda_ops  # noqa: F401  (registers the CUTLASS ops and their CPU impls)

    torch.manual_seed(0)
    dtype = torch.bfloat16
    w = torch.randn(128, 256, dtype=dtype)
    w = w * sparseq.prune_24(w)
    x = torch.randn(5, 256, dtype=dtype)
    contenders = bm.op_contenders("cutlass", dtype)
    assert {c.format for c in contenders} == {"2:4", "2:4+w8a8"}
    for c in contenders:
        state = c.prepare(w)
        y = c.call(state, x)()
        assert bm.check_output(c, state, x, y, {}, w, dtype) == "yes", c
