"""Triton int8_mm (W8A8, bit-exact int32 accumulation) and int8_weight_only_mm against the reference."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from sparseq import reference as ref  # noqa: E402
from sparseq.kernels import int8_mm as k8  # noqa: E402
from sparseq.kernels import int8_weight_only_mm as kwo  # noqa: E402
from sparseq.kernels.configs import MatmulConfig  # noqa: E402
from sparseq.kernels.testing import assert_matmul_close  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
MS = [1, 3, 16, 17, 100, 257]
SHAPES = [(16, 32), (40, 100)]  # (N, K): a small multiple, and ragged N and K (any N, K are allowed)
NOT_INTERPRETED = pytest.mark.skipif(INTERPRET, reason="GPU test: the interpreter has no bf16")
# Forced configs: several K tiles per program, split-K (int32/fp32 partials + epilogue kernel), tiny tiles.
CONFIGS = [MatmulConfig(16, 32, 32, SPLIT_K=3), MatmulConfig(32, 16, 32, GROUP_M=2)]


def _w8a8_inputs(m, n, k, device=DEVICE, per_tensor=False):
    x, w = torch.randn(m, k), torch.randn(n, k)
    xq, xs = ref.quantize_per_token(x)
    if per_tensor:
        xs = torch.tensor([0.03])
    wq, ws = ref.quantize_per_channel(w)
    bias = torch.randn(n)
    return [t.to(device) for t in (xq, wq, xs, ws, bias)]


def _check_int8_mm(xq, wq, xs, ws, bias, out_dtype, config=None):
    out = k8.int8_mm(xq, wq, xs, ws, bias, out_dtype, config=config)
    expected = ref.int8_mm(xq, wq, xs, ws, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == expected.shape
    # The int32 accumulator is exact, so only the fp32 epilogue can differ (e.g. FMA contraction
    # on the GPU): the bound is one output rounding plus a few fp32 ulps.
    assert_matmul_close(out, expected, xq, wq, xs, ws, bias)
    return out, expected


def test_int32_accumulation_is_exact():
    # scale 1, no bias, fp32 out: the output is the int32 accumulator itself (|acc| < 2**24).
    xq = torch.randint(-127, 128, (17, 136), dtype=torch.int8).to(DEVICE)
    wq = torch.randint(-127, 128, (40, 136), dtype=torch.int8).to(DEVICE)
    one_x, one_w = torch.ones(17, device=DEVICE), torch.ones(40, device=DEVICE)
    for cfg in [None] + CONFIGS:
        out = k8.int8_mm(xq, wq, one_x, one_w, None, torch.float32, config=cfg)
        assert torch.equal(out, ref.int8_matmul_int32(xq, wq).float())


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_int8_mm_matches_reference(m, n, k, out_dtype):
    _check_int8_mm(*_w8a8_inputs(m, n, k), out_dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=["splitk3", "group2"])
@pytest.mark.parametrize("m", [3, 100])
def test_int8_mm_configs(config, m):
    xq, wq, xs, ws, bias = _w8a8_inputs(m, 40, 100)
    _check_int8_mm(xq, wq, xs, ws, bias, torch.float16, config)
    _check_int8_mm(xq, wq, xs, ws, None, torch.float32, config)


@pytest.mark.parametrize("m", [1, 17])
def test_int8_mm_per_tensor_scale(m):
    _check_int8_mm(*_w8a8_inputs(m, 16, 32, per_tensor=True), torch.float16)
    _check_int8_mm(*_w8a8_inputs(m, 16, 32, per_tensor=True), torch.float16, CONFIGS[0])


def _wo_inputs(m, n, k, dtype, device=DEVICE):
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k)
    wq, ws = ref.quantize_per_channel(w)
    bias = torch.randn(n).to(dtype)
    return [t.to(device) for t in (x, wq, ws, bias)]


def _check_wo(x, wq, ws, bias, config=None):
    out = kwo.int8_weight_only_mm(x, wq, ws, bias, config=config)
    assert_matmul_close(out, ref.int8_weight_only_mm(x, wq, ws, bias), x, wq, None, ws, bias)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_weight_only_matches_reference(m, n, k, dtype):
    _check_wo(*_wo_inputs(m, n, k, dtype))


@pytest.mark.parametrize("config", CONFIGS, ids=["splitk3", "group2"])
def test_weight_only_configs(config):
    x, wq, ws, bias = _wo_inputs(17, 40, 100, torch.float16)
    _check_wo(x, wq, ws, bias, config)
    _check_wo(x, wq, ws, None, config)
    _check_wo(x[:, :64].t().contiguous().t(), wq[:, :64].contiguous(), ws, None, config)  # column-major x


class _Boom:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched")


def test_bad_inputs_raise_before_launch(monkeypatch):
    monkeypatch.setattr(k8, "_int8_mm_kernel", _Boom())
    monkeypatch.setattr(kwo, "_int8_weight_only_mm_kernel", _Boom())
    xq, wq, xs, ws, bias = _w8a8_inputs(3, 16, 32)
    with pytest.raises(TypeError, match="xq must have dtype"):
        k8.int8_mm(xq.float(), wq, xs, ws)
    with pytest.raises(ValueError, match="x has K=32 but wq expects K=16"):
        k8.int8_mm(xq, wq[:, :16], xs, ws)
    with pytest.raises(ValueError, match=r"x_scale must have shape \(3,\) or \(1,\)"):
        k8.int8_mm(xq, wq, xs[:2], ws)
    with pytest.raises(TypeError, match="w_scale must have dtype"):
        k8.int8_mm(xq, wq, xs, ws.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        k8.int8_mm(xq, wq, xs, ws, bias[:8])
    with pytest.raises(TypeError, match="out_dtype"):
        k8.int8_mm(xq, wq, xs, ws, None, torch.int32)
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
        k8.int8_mm(xq.to("meta"), wq.to("meta"), xs.to("meta"), ws.to("meta"))
    x, wq2, ws2, b2 = _wo_inputs(3, 16, 32, torch.float16)
    with pytest.raises(TypeError, match="wq must have dtype"):
        kwo.int8_weight_only_mm(x, wq2.half(), ws2)
    with pytest.raises(ValueError, match="x has K=16"):
        kwo.int8_weight_only_mm(x[:, :16], wq2, ws2)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        kwo.int8_weight_only_mm(x, wq2, ws2[:4])
    with pytest.raises(ValueError, match="all inputs must be on the same device"):
        kwo.int8_weight_only_mm(x, wq2.to("meta"), ws2)
    with pytest.raises(ValueError, match="BLOCK_K must be a power of two"):
        MatmulConfig(16, 16, 48)


def test_opcheck():
    xq, wq, xs, ws, bias = _w8a8_inputs(3, 16, 32)
    op = torch.ops.sparseq.int8_mm_triton.default
    torch.library.opcheck(op, (xq, wq, xs, ws, bias, torch.float16))
    torch.library.opcheck(op, (xq, wq, xs[:1], ws, None, torch.float32))
    x, wq2, ws2, b2 = _wo_inputs(3, 16, 32, torch.float16)
    torch.library.opcheck(torch.ops.sparseq.int8_weight_only_mm_triton.default, (x, wq2, ws2, b2))


@pytest.mark.gpu
@NOT_INTERPRETED
@pytest.mark.parametrize("m", MS + [4096])
@pytest.mark.parametrize("n,k", SHAPES + [(512, 1024)])
def test_gpu_bf16(m, n, k):
    _check_int8_mm(*_w8a8_inputs(m, n, k, "cuda"), torch.bfloat16)
    _check_wo(*_wo_inputs(m, n, k, torch.bfloat16, "cuda"))
    for cfg in CONFIGS:
        _check_int8_mm(*_w8a8_inputs(m, n, k, "cuda"), torch.bfloat16, cfg)
        _check_wo(*_wo_inputs(m, n, k, torch.bfloat16, "cuda"), cfg)
