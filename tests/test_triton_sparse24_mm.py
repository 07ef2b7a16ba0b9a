"""Triton sparse24_mm / sparse24_int8_mm (2:4 tile expanded in registers) against the reference."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from sparseq import reference as ref  # noqa: E402
from sparseq.kernels import sparse24_mm as ks  # noqa: E402
from sparseq.kernels.configs import MatmulConfig  # noqa: E402
from sparseq.kernels.testing import assert_matmul_close  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
MS = [1, 3, 16, 17, 100, 257]
SHAPES = [(16, 64), (40, 136)]  # (N, K): K a multiple of 8 (the format's rule), ragged N and K tiles
NOT_INTERPRETED = pytest.mark.skipif(INTERPRET, reason="GPU test: the interpreter has no bf16")
# BLOCK_K 128: each of the 4 dots gets K = 32 (int8 tensor-core dots need K >= 32 on the GPU).
CONFIGS = [MatmulConfig(16, 32, 128, SPLIT_K=2), MatmulConfig(32, 16, 128, GROUP_M=2)]


def _weight(n, k):
    w = torch.randn(n, k)
    w[0, :16] = torch.tensor([0., 0., 0., 3., 0., -0., 0., 0., 1., 1., -1., 1., -0., 2., 2., 0.])  # fillers, ties
    return w


def _float_inputs(m, n, k, dtype, device=DEVICE):
    x = torch.randn(m, k).to(dtype)
    values, meta = ref.prune_and_compress_24(_weight(n, k).to(dtype))
    bias = torch.randn(n).to(dtype)
    return [t.to(device) for t in (x, values, meta, bias)]


def _check_float(x, values, meta, bias, config=None):
    out = ks.sparse24_mm(x, values, meta, bias, config=config)
    assert_matmul_close(out, ref.sparse24_mm(x, values, meta, bias), x, ref.decompress_24(values, meta), bias=bias)


def _int8_inputs(m, n, k, device=DEVICE):
    x = torch.randn(m, k)
    qv, meta, ws = ref.prune_and_compress_24(_weight(n, k), quantize=True)
    xq, xs = ref.quantize_per_token(x)
    return [t.to(device) for t in (x, xq, xs, qv, meta, ws, torch.randn(n))]


def _check_w8a8(xq, qv, meta, ws, xs, bias, out_dtype, config=None):
    out = ks.sparse24_int8_mm(xq, qv, meta, ws, xs, bias, out_dtype, config=config)
    expected = ref.sparse24_int8_mm(xq, qv, meta, ws, xs, bias, out_dtype)
    assert out.dtype == expected.dtype
    assert_matmul_close(out, expected, xq, ref.decompress_24(qv, meta), xs, ws, bias)


def _check_int8_weight_only(x, qv, meta, ws, bias, config=None):
    out = ks.sparse24_int8_mm(x, qv, meta, ws, None, bias, None, config=config)
    expected = ref.sparse24_int8_mm(x, qv, meta, ws, None, bias, None)
    assert_matmul_close(out, expected, x, ref.decompress_24(qv, meta), None, ws, bias)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse24_mm_matches_reference(m, n, k, dtype):
    _check_float(*_float_inputs(m, n, k, dtype))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_sparse24_int8_mm_matches_reference(m, n, k):
    x, xq, xs, qv, meta, ws, bias = _int8_inputs(m, n, k)
    _check_w8a8(xq, qv, meta, ws, xs, bias, torch.float16)
    _check_int8_weight_only(x.half(), qv, meta, ws, bias.half())


def test_w8a8_int32_accumulation_is_exact():
    x, xq, xs, qv, meta, ws, bias = _int8_inputs(17, 40, 136)
    ones_x, ones_w = torch.ones(17, device=DEVICE), torch.ones(40, device=DEVICE)
    exact = ref.int8_matmul_int32(xq, ref.decompress_24(qv, meta)).float()
    for cfg in [None] + CONFIGS:
        out = ks.sparse24_int8_mm(xq, qv, meta, ones_w, ones_x, None, torch.float32, config=cfg)
        assert torch.equal(out, exact)


@pytest.mark.parametrize("config", CONFIGS, ids=["splitk2", "group2"])
def test_configs(config):
    _check_float(*_float_inputs(17, 40, 136, torch.float16), config)
    x, xq, xs, qv, meta, ws, bias = _int8_inputs(100, 40, 136)
    _check_w8a8(xq, qv, meta, ws, xs, bias, torch.float32, config)
    _check_w8a8(xq, qv, meta, ws, xs[:1], None, torch.float16, config)  # per-tensor x scale
    _check_int8_weight_only(x, qv, meta, ws, None, config)


class _Boom:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched")


def test_bad_inputs_raise_before_launch(monkeypatch):
    monkeypatch.setattr(ks, "_sparse24_mm_kernel", _Boom())
    x, values, meta, bias = _float_inputs(3, 16, 64, torch.float16)
    with pytest.raises(TypeError, match="values dtype torch.float16 must match x dtype torch.float32"):
        ks.sparse24_mm(x.float(), values, meta)
    with pytest.raises(ValueError, match="x has K=32 but values expects K=64"):
        ks.sparse24_mm(x[:, :32], values, meta)
    with pytest.raises(ValueError, match=r"meta must have shape \(16, 8\)"):
        ks.sparse24_mm(x, values, meta[:, :4].contiguous())
    with pytest.raises(ValueError, match="values must be contiguous"):
        ks.sparse24_mm(x, values.t().contiguous().t(), meta)
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
        ks.sparse24_mm(x.to("meta"), values.to("meta"), meta.to("meta"))
    with pytest.raises(ValueError, match="need BLOCK_K >= 64"):
        ks.sparse24_mm(x, values, meta, config=MatmulConfig(16, 16, 32))
    xf, xq, xs, qv, qmeta, ws, b = _int8_inputs(3, 16, 64)
    with pytest.raises(ValueError, match="x_scale is required"):
        ks.sparse24_int8_mm(xq, qv, qmeta, ws)
    with pytest.raises(ValueError, match="x_scale must be None"):
        ks.sparse24_int8_mm(xf, qv, qmeta, ws, xs)
    with pytest.raises(TypeError, match="weight-only output dtype"):
        ks.sparse24_int8_mm(xf, qv, qmeta, ws, None, None, torch.float16)
    with pytest.raises(TypeError, match="values must have dtype"):
        ks.sparse24_int8_mm(xq, qv.float(), qmeta, ws, xs)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        ks.sparse24_int8_mm(xq, qv, qmeta, ws[:3], xs)


def test_opcheck():
    x, values, meta, bias = _float_inputs(3, 16, 64, torch.float32)
    torch.library.opcheck(torch.ops.sparseq.sparse24_mm_triton.default, (x, values, meta, bias))
    xf, xq, xs, qv, qmeta, ws, b = _int8_inputs(3, 16, 64)
    op = torch.ops.sparseq.sparse24_int8_mm_triton.default
    torch.library.opcheck(op, (xq, qv, qmeta, ws, xs, b, torch.float16))
    torch.library.opcheck(op, (xf.half(), qv, qmeta, ws, None, None, None))


@pytest.mark.gpu
@NOT_INTERPRETED
@pytest.mark.parametrize("m", MS + [4096])
@pytest.mark.parametrize("n,k", SHAPES + [(512, 1024)])
def test_gpu_bf16(m, n, k):
    for cfg in [None] + CONFIGS:
        _check_float(*_float_inputs(m, n, k, torch.bfloat16, "cuda"), cfg)
        x, xq, xs, qv, meta, ws, bias = _int8_inputs(m, n, k, "cuda")
        _check_w8a8(xq, qv, meta, ws, xs, bias, torch.bfloat16, cfg)
        _check_int8_weight_only(x.bfloat16(), qv, meta, ws, bias.bfloat16(), cfg)
