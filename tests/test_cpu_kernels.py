"""sparseq._C_cpu (csrc/cpu): the C++ W8A8 activation quantization and epilogue equal the
reference arithmetic bit for bit, reject bad inputs with clear errors, and the torch-ops path
takes over where the extension is absent. Built by every install with a C++ compiler, so CI
requires it (SPARSEQ_REQUIRE_CPU_EXTENSION=1)."""
import os

import pytest
import torch

from sparseq import cpu_kernels, cpu_ops
from sparseq import reference as ref

if not cpu_kernels.available() and os.environ.get("SPARSEQ_REQUIRE_CPU_EXTENSION") == "1":
    pytest.fail(f"SPARSEQ_REQUIRE_CPU_EXTENSION=1 but {cpu_kernels.unavailable_reason()}", pytrace=False)
needs_extension = pytest.mark.skipif(not cpu_kernels.available(), reason=cpu_kernels.unavailable_reason() or "ok")


def _activations(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of magnitudes 1e-3..1e2 with exact ties, an all-zero row, a denormal maximum, NaN and Inf."""
    torch.manual_seed(m * 31 + k)
    x = torch.randn(m, k) * torch.logspace(-3, 2, max(m, 1))[:m, None]
    if m > 0 and k > 1:
        x[0, 0] = 127.0  # scale 1: the .5 values are exact ties (round half to even)
        x[0, 1:] = (torch.arange(k - 1) % 9 - 4) + 0.5
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2] = 1e-44 * torch.sign(torch.randn(k))
    if m > 3 and k:
        x[3, k // 2] = float("nan")
    if m > 4 and k:
        x[4, -1] = float("-inf")
    return x.to(dtype)


def _want(x, smooth, x_scale):
    grid, scale = ref.activation_grid(x, smooth, x_scale)
    return grid.to(torch.int8), scale  # NaN -> 0 in torch's cast: the reference's own int8 values


@needs_extension
@pytest.mark.parametrize("m,k", [(1, 16), (6, 384), (37, 1000), (3, 7), (5, 1), (0, 8), (4, 0), (600, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("offset", [False, True])
def test_quantize_equals_the_reference_bit_for_bit(m, k, dtype, smooth, static, offset):
    """Every row (also NaN/Inf ones: their int8 values and NaN/Inf scales); 600 x 256 splits
    over torch's intra-op threads. ``offset``: the same values + 128 as uint8 (oneDNN's form)."""
    x = _activations(m, k, dtype)
    f = torch.rand(k) + 0.5 if smooth else None
    xs = ref.per_tensor_scale(3.5) if static else None
    q, s = cpu_kernels.quantize_int8(x, f, xs, offset)
    want_q, want_s = _want(x, f, xs)
    if offset:
        want_q = (want_q.int() + 128).to(torch.uint8)
    assert q.dtype == want_q.dtype and s.dtype == torch.float32 and q.shape == (m, k) and s.shape == (m,)
    assert torch.equal(q, want_q), (q.int() - want_q.int()).abs().max()
    torch.testing.assert_close(s, want_s, rtol=0, atol=0, equal_nan=True)


@needs_extension
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n", [(1, 24), (9, 130), (300, 512), (0, 8)])
def test_epilogue_equals_the_reference_bit_for_bit(acc_dtype, bias, m, n):
    torch.manual_seed(m + n)
    acc = torch.randint(-(2**24), 2**24, (m, n), dtype=torch.int32)
    x_scale = torch.rand(m) * 1e-2
    if m > 2:
        x_scale[1] = float("nan")  # a row that held NaN: its output stays NaN
        x_scale[2] = float("inf")
    w_scale = torch.rand(n) * 1e-3
    b = torch.randn(n) * 10 if bias else None
    want = ref._epilogue(acc.float() * x_scale[:, None], w_scale[None, :], b, torch.float32)
    a = acc.to(acc_dtype)
    y = cpu_kernels.epilogue(a, x_scale, w_scale, b)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    if acc_dtype == torch.float32:
        assert y.data_ptr() == a.data_ptr()  # written in place: no second [M, N] buffer


@needs_extension
def test_bad_inputs_raise_clear_errors():
    op_q, op_e = torch.ops.sparseq.quantize_int8_cpu, torch.ops.sparseq.w8a8_epilogue_cpu
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"smooth must have shape \[8\], got \[7\]"):
        op_q(x, torch.ones(7), None)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        op_q(x.double(), None, None)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op_q(torch.randn(8, 4).t(), None, None)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op_q(torch.randn(8), None, None)
    with pytest.raises(RuntimeError, match="x_scale must be float32, got BFloat16"):
        op_q(x, None, torch.ones(1, dtype=torch.bfloat16))
    acc = torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"w_scale must have shape \[3\], got \[4\]"):
        op_e(acc, torch.ones(4), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="acc must be float32 or int32, got Long"):
        op_e(acc.long(), torch.ones(4), torch.ones(3), None)


def test_wrappers_decline_what_the_kernels_do_not_read():
    """Inputs the C++ ops do not take (float64, strided, bf16 smooth) get None, so the caller runs
    torch ops; cpu_ops.quantize_int8 then still equals the reference."""
    x = torch.randn(5, 16)
    f16 = torch.rand(16, dtype=torch.bfloat16) + 0.5
    assert cpu_kernels.quantize_int8(x.double(), None, None) is None
    assert cpu_kernels.quantize_int8(torch.randn(16, 5).t(), None, None) is None
    assert cpu_kernels.quantize_int8(x, f16, None) is None
    assert cpu_kernels.epilogue(torch.zeros(5, 3, dtype=torch.int64), torch.ones(5), torch.ones(3), None) is None
    q, s = cpu_ops.quantize_int8(x, f16, None)
    want_q, want_s = _want(x, f16, None)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)


@pytest.mark.parametrize("gemm", ["onednn", "int_mm"])
@pytest.mark.parametrize("extension", [True, False])
def test_run_w8a8_is_exact_with_and_without_the_extension(gemm, extension, monkeypatch):
    """The same bits whether the C++ ops or the torch ops quantize and scale."""
    if extension and not cpu_kernels.available():
        pytest.skip(cpu_kernels.unavailable_reason())
    if not extension:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.manual_seed(3)
    x = _activations(7, 96, torch.float32)
    wq, ws = ref.quantize_per_channel(torch.randn(40, 96))
    bias = torch.randn(40)
    packed = cpu_ops.onednn_prepack(wq) if gemm == "onednn" else wq
    y = cpu_ops.run_w8a8(x, packed, ws, None, None, bias, torch.float32)
    grid, s = ref.activation_grid(x)  # int8_mm's arithmetic without its value checks (NaN rows)
    acc = (grid.to(torch.int8).double() @ wq.double().T).float()
    want = ref._epilogue(acc * s[:, None], ws[None, :], bias, torch.float32)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(y[3]).any() and not torch.isfinite(y[4]).any()  # the NaN and Inf rows


def _normalize_with_torch_ops(x, smooth):
    """What sparseq/cpu_fbgemm.py computes in torch ops before fbgemm."""
    xs = x.float() if smooth is None else x.float() / smooth
    amax = xs.abs().amax(dim=1) if xs.shape[1] else xs.new_zeros(xs.shape[0])
    return torch.nan_to_num_(xs * (1.0 / amax)[:, None], 0.0, 0.0, 0.0), amax


@needs_extension
@pytest.mark.parametrize("m,k", [(1, 16), (6, 384), (37, 1000), (3, 7), (5, 1), (0, 8), (4, 0), (600, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_normalize_rows_equals_the_torch_ops_bit_for_bit(m, k, dtype, smooth):
    """Rows with ties, zeros (0/0 -> 0), denormal maxima, NaN (amax NaN, u zeroed) and -Inf."""
    x = _activations(m, k, dtype)
    f = torch.rand(k) + 0.5 if smooth else None
    u, amax = cpu_kernels.normalize_rows(x, f)
    want_u, want_amax = _normalize_with_torch_ops(x, f)
    assert u.dtype == torch.float32 and u.shape == (m, k) and amax.shape == (m,)
    torch.testing.assert_close(u, want_u, rtol=0, atol=0)
    torch.testing.assert_close(amax, want_amax, rtol=0, atol=0, equal_nan=True)
    assert (u.abs() <= 1).all()


@needs_extension
def test_normalize_rows_rejects_and_declines_bad_inputs():
    op = torch.ops.sparseq.normalize_rows_cpu
    with pytest.raises(RuntimeError, match=r"smooth must have shape \[8\], got \[7\]"):
        op(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        op(torch.randn(2, 8).double(), None)
    assert cpu_kernels.normalize_rows(torch.randn(8, 2).t(), None) is None
    assert cpu_kernels.normalize_rows(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16)) is None


@needs_extension
@pytest.mark.parametrize("m,k", [(1, 16), (6, 384), (37, 1000), (3, 7), (5, 1), (0, 8), (4, 0), (600, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_grid_equals_the_reference_integers_with_range_columns(m, k, dtype, smooth, static):
    """The reference's int8 values as fp32 (NaN -> 0 as the int8 cast), its scales (NaN/Inf
    ones too), then -128 and 127 in every row: the range fbgemm's quantizer reads."""
    x = _activations(m, k, dtype)
    f = torch.rand(k) + 0.5 if smooth else None
    xs = ref.per_tensor_scale(3.5) if static else None
    grid, s = cpu_kernels.quantize_grid(x, f, xs)
    want_q, want_s = _want(x, f, xs)
    assert grid.dtype == torch.float32 and grid.shape == (m, k + 2) and s.shape == (m,)
    assert torch.equal(grid[:, :k], want_q.float())
    assert torch.equal(grid[:, k:], torch.tensor([[-128.0, 127.0]]).expand(m, 2))
    torch.testing.assert_close(s, want_s, rtol=0, atol=0, equal_nan=True)


@needs_extension
def test_quantize_grid_rejects_bad_inputs():
    op = torch.ops.sparseq.quantize_grid_cpu
    with pytest.raises(RuntimeError, match=r"smooth must have shape \[8\], got \[7\]"):
        op(torch.randn(2, 8), torch.ones(7), None)
    with pytest.raises(RuntimeError, match=r"x_scale must have shape \[1\]"):
        op(torch.randn(2, 8), None, torch.ones(2))
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        op(torch.randn(2, 8).double(), None, None)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(torch.randn(8, 2).t(), None, None)
