"""Matmul references: int32 accumulation exact, scales/bias fused, 2:4 from compressed form."""
import pytest
import torch

import sparseq
from sparseq import reference as ref

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def int_matmul(xq, wq):
    """Independent integer ground truth: int64 matmul on CPU."""
    return (xq.to(torch.int64) @ wq.to(torch.int64).T)


@pytest.mark.parametrize("m, n, k", [(1, 8, 16), (3, 24, 64), (17, 64, 4096), (100, 8, 8)])
def test_int32_accumulation_is_exact(m, n, k):
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    acc = ref.int8_matmul_int32(xq, wq)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), int_matmul(xq, wq))


def test_int32_accumulation_extremes():
    k = 8192
    xq = torch.full((2, k), -127, dtype=torch.int8)
    wq = torch.full((3, k), 127, dtype=torch.int8)
    assert (ref.int8_matmul_int32(xq, wq) == -127 * 127 * k).all()


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_int8_mm_epilogue(out_dtype, per_tensor):
    m, n, k = 5, 16, 32
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    xs = torch.rand(1 if per_tensor else m) + 0.01
    ws = torch.rand(n) + 0.01
    bias = torch.randn(n).to(out_dtype)
    y = sparseq.int8_mm(xq, wq, xs, ws, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    expected = (int_matmul(xq, wq).float() * xs[:, None] * ws[None, :] + bias.float()).to(out_dtype)
    assert torch.equal(y, expected)


def test_w8a8_approximates_float():
    x, w = torch.randn(8, 256), torch.randn(32, 256)
    xq, xs = sparseq.quantize_per_token(x)
    wq, ws = sparseq.quantize_per_channel(w)
    y = sparseq.int8_mm(xq, wq, xs, ws, out_dtype=torch.float32)
    exact = x @ w.T
    sqnr = 10 * torch.log10(exact.pow(2).mean() / (y - exact).pow(2).mean())
    assert sqnr > 30  # dB; W8A8 on Gaussian data is ~35-38 dB


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_weight_only(dtype):
    x = torch.randn(3, 64).to(dtype)
    wq = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    ws = torch.rand(16) + 0.01
    y = sparseq.int8_weight_only_mm(x, wq, ws)
    assert y.dtype == dtype
    assert torch.equal(y, ((x.float() @ wq.float().T) * ws).to(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_sparse24_mm_equals_dense_on_decompressed(dtype):
    w = torch.randn(24, 64)
    values, meta = sparseq.prune_and_compress_24(w.to(dtype))
    x = torch.randn(7, 64).to(dtype)
    bias = torch.randn(24).to(dtype)
    y = sparseq.sparse24_mm(x, values, meta, bias)
    dense = sparseq.decompress_24(values, meta)
    assert torch.equal(y, (x.float() @ dense.float().T + bias.float()).to(dtype))


def test_sparse24_int8_both_modes():
    w = torch.randn(16, 64)
    qv, meta, ws = sparseq.prune_and_compress_24(w, quantize=True)
    wq = sparseq.decompress_24(qv, meta)
    x = torch.randn(4, 64, dtype=torch.float16)
    assert torch.equal(sparseq.sparse24_int8_mm(x, qv, meta, ws), sparseq.int8_weight_only_mm(x, wq, ws))
    xq, xs = sparseq.quantize_per_token(x)
    y = sparseq.sparse24_int8_mm(xq, qv, meta, ws, xs, out_dtype=torch.float16)
    assert torch.equal(y, sparseq.int8_mm(xq, wq, xs, ws, out_dtype=torch.float16))
    with pytest.raises(ValueError, match="x_scale is required"):
        sparseq.sparse24_int8_mm(xq, qv, meta, ws)
    with pytest.raises(ValueError, match="x_scale must be None"):
        sparseq.sparse24_int8_mm(x, qv, meta, ws, xs)
    with pytest.raises(TypeError, match="values must have dtype"):
        sparseq.sparse24_int8_mm(x, qv.half(), meta, ws)


def _int8_args():
    return (
        torch.zeros(2, 8, dtype=torch.int8),
        torch.zeros(4, 8, dtype=torch.int8),
        torch.ones(2),
        torch.ones(4),
    )


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda a: (a[0].float(),) + a[1:], TypeError, "xq must have dtype"),
        (lambda a: (a[0], torch.zeros(4, 16, dtype=torch.int8)) + a[2:], ValueError, "x has K=8 but wq expects K=16"),
        (lambda a: a[:2] + (torch.ones(3),) + a[3:], ValueError, r"x_scale must have shape \(2,\) or \(1,\)"),
        (lambda a: a[:3] + (torch.ones(4, dtype=torch.float16),), TypeError, "w_scale must have dtype"),
        (lambda a: a[:3] + (torch.tensor([1.0, float("nan"), 1.0, 1.0]),), ValueError, "w_scale contains NaN"),
        (lambda a: a[:3] + (torch.tensor([1.0, -1.0, 1.0, 1.0]),), ValueError, "w_scale must be > 0"),
        (lambda a: (a[0], a[1], torch.tensor([float("inf"), 1.0]), a[3]), ValueError, "x_scale contains NaN or Inf"),
        (lambda a: (a[0], a[1].reshape(4, 2, 4)) + a[2:], ValueError, "wq must be 2-D"),
        (lambda a: (a[0].to("meta"),) + a[1:], ValueError, "all inputs must be on the same device"),
    ],
)
def test_int8_mm_bad_input(mutate, err, match):
    with pytest.raises(err, match=match):
        ref.int8_mm(*mutate(_int8_args()))


def test_bad_bias_and_out_dtype():
    a = _int8_args()
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        sparseq.int8_mm(*a, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        sparseq.int8_mm(*a, out_dtype=torch.int32)
    values, meta = sparseq.prune_and_compress_24(torch.randn(4, 8))
    with pytest.raises(TypeError, match="values dtype .* must match x dtype"):
        sparseq.sparse24_mm(torch.randn(2, 8, dtype=torch.float16), values, meta)
    with pytest.raises(ValueError, match="x has K=16 but values expects K=8"):
        sparseq.sparse24_mm(torch.randn(2, 16), values, meta)
