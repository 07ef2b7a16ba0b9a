"""GPU tests of the CUTLASS 2:4 kernels (sparseq._C / sparseq._C_sm90a) against sparseq.reference.

int8 (W8A8) results must be bit-exact; 16-bit results must be within twice the error of a
dense cuBLAS matmul in the same dtype (both measured against an fp32 product of the exact
operands). Skipped without a GPU (tests/conftest.py) or without the built extensions.
"""
import pytest
import torch
import torch.nn.functional as F

import sparseq.cuda_ops as co
from sparseq import cutlass_layout as cl
from sparseq import reference as ref

pytestmark = pytest.mark.gpu

ISSUE_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
ISSUE_MS = [1, 16, 64, 256, 1024, 4096]
RAGGED = [(64, 128, 1), (192, 384, 3), (320, 640, 17), (256, 1280, 100), (128, 256, 257)]


@pytest.fixture(scope="module", autouse=True)
def _extensions():
    from sparseq.backends import kernels_available

    status = kernels_available()["cuda"]
    if not status:
        pytest.skip(f"CUDA extensions not available: {status.reason}")
    try:
        co.cutlass_arch()
    except RuntimeError as e:
        pytest.skip(str(e))


def _weight(n, k, dtype, device="cuda"):
    w = torch.randn(n, k, device=device)
    if dtype == torch.int8:
        return ref.prune_and_compress_24(w, quantize=True)
    values, meta = ref.prune_and_compress_24(w.to(dtype))
    return values, meta


def _check_float(x, values, meta, bias):
    prepared = co.prepare_sparse24_cutlass(values, meta)
    out = co.sparse24_mm_cutlass(x, values, prepared, bias)
    w = ref.decompress_24(values, meta)
    exact = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    dense = F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    err = (out.double() - exact).abs().max().item()
    dense_err = (dense.double() - exact).abs().max().item()
    assert out.shape == (x.shape[0], values.shape[0]) and out.dtype == x.dtype
    assert err <= 2 * dense_err + 1e-6, f"error {err} vs dense {dense_err}"


def _check_int8(xq, x_scale, values, meta, w_scale, bias, out_dtype):
    prepared = co.prepare_sparse24_cutlass(values, meta)
    out = co.sparse24_int8_mm_cutlass(xq, values, prepared, w_scale, x_scale, bias, out_dtype)
    expected = ref.sparse24_int8_mm(xq, values, meta, w_scale, x_scale, bias, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()


@pytest.mark.parametrize("n,k", ISSUE_SHAPES)
@pytest.mark.parametrize("m", ISSUE_MS)
def test_bf16_issue_shapes(n, k, m):
    values, meta = _weight(n, k, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    _check_float(x, values, meta, None)


@pytest.mark.parametrize("n,k", ISSUE_SHAPES)
@pytest.mark.parametrize("m", ISSUE_MS)
def test_int8_issue_shapes(n, k, m):
    values, meta, w_scale = _weight(n, k, torch.int8)
    xq, x_scale = ref.quantize_per_token(torch.randn(m, k, device="cuda"))
    _check_int8(xq, x_scale, values, meta, w_scale, None, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,m", RAGGED)
@pytest.mark.parametrize("with_bias", [False, True])
def test_float_ragged(dtype, n, k, m, with_bias):
    values, meta = _weight(n, k, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda") if with_bias else None
    _check_float(x, values, meta, bias)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,m", RAGGED)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_int8_ragged(out_dtype, n, k, m, with_bias, per_tensor):
    values, meta, w_scale = _weight(n, k, torch.int8)
    x = torch.randn(m, k, device="cuda")
    if per_tensor:
        x_scale = ref.per_tensor_scale(float(x.abs().max())).cuda()
        xq = ref.quantize_per_tensor(x, x_scale)
    else:
        xq, x_scale = ref.quantize_per_token(x)
    bias = torch.randn(n, device="cuda", dtype=out_dtype) if with_bias else None
    _check_int8(xq, x_scale, values, meta, w_scale, bias, out_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_gpu_converter_matches_reference(dtype):
    values, meta = _weight(320, 640, dtype)[:2]
    arch = co.cutlass_arch()
    prepared = co.prepare_sparse24_cutlass(values, meta)
    expected = cl.meta_to_cutlass(meta.cpu(), cl.element_bits(dtype), arch)
    assert torch.equal(prepared.cpu(), expected)
    assert torch.equal(co.unprepare_sparse24_cutlass(values, prepared), meta)


def test_bad_inputs_raise():
    values, meta = _weight(128, 256, torch.bfloat16)
    prepared = co.prepare_sparse24_cutlass(values, meta)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="prepare_sparse24_cutlass"):
        co.sparse24_mm_cutlass(x, values, meta)
    with pytest.raises(RuntimeError, match="must match x dtype"):
        co.sparse24_mm_cutlass(x.half(), values, prepared)
    with pytest.raises(RuntimeError, match="contiguous"):
        co.sparse24_mm_cutlass(torch.randn(256, 4, device="cuda", dtype=torch.bfloat16).T, values, prepared)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        big = torch.randn(4 * 256 + 1, device="cuda", dtype=torch.bfloat16)
        co.sparse24_mm_cutlass(big[1:].view(4, 256), values, prepared)
    with pytest.raises(RuntimeError, match="same device|CUDA tensor"):
        co.sparse24_mm_cutlass(x, values, prepared, torch.randn(128))
    with pytest.raises(RuntimeError, match="K=512"):
        co.sparse24_mm_cutlass(torch.randn(4, 512, device="cuda", dtype=torch.bfloat16), values, prepared)
    qv, qm, ws = _weight(128, 256, torch.int8)
    qp = co.prepare_sparse24_cutlass(qv, qm)
    xq = torch.zeros(4, 256, device="cuda", dtype=torch.int8)
    with pytest.raises(RuntimeError, match="x_scale must have shape"):
        co.sparse24_int8_mm_cutlass(xq, qv, qp, ws, torch.ones(3, device="cuda"))
    with pytest.raises(RuntimeError, match="float32"):
        co.sparse24_int8_mm_cutlass(xq, qv, qp, ws.half(), torch.ones(4, device="cuda"))
    with pytest.raises(RuntimeError, match="W8A8"):
        co.sparse24_int8_mm_cutlass(x, qv, qp, ws, torch.ones(4, device="cuda"))


def test_cuda_graph_capture():
    values, meta = _weight(256, 512, torch.bfloat16)
    prepared = co.prepare_sparse24_cutlass(values, meta)
    qv, qm, ws = _weight(256, 512, torch.int8)
    qp = co.prepare_sparse24_cutlass(qv, qm)
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    xq, xs = ref.quantize_per_token(x)
    bias = torch.randn(256, device="cuda")
    # warm up on a side stream (first calls may set kernel attributes), then capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        co.sparse24_mm_cutlass(x, values, prepared, bias)
        co.sparse24_int8_mm_cutlass(xq, qv, qp, ws, xs, bias)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = co.sparse24_mm_cutlass(x, values, prepared, bias)
        yq = co.sparse24_int8_mm_cutlass(xq, qv, qp, ws, xs, bias)
    x.copy_(torch.randn_like(x))
    xq2, xs2 = ref.quantize_per_token(x)
    xq.copy_(xq2)
    xs.copy_(xs2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, co.sparse24_mm_cutlass(x, values, prepared, bias))
    assert torch.equal(yq, ref.sparse24_int8_mm(xq, qv, qm, ws, xs, bias, torch.bfloat16))


def test_opcheck_cuda():
    values, meta = _weight(128, 256, torch.bfloat16)
    prepared = co.prepare_sparse24_cutlass(values, meta)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.sparseq.sparse24_mm_cutlass.default, (x, values, prepared, None))
    qv, qm, ws = _weight(128, 256, torch.int8)
    qp = co.prepare_sparse24_cutlass(qv, qm)
    xq, xs = ref.quantize_per_token(x.float())
    torch.library.opcheck(torch.ops.sparseq.sparse24_int8_mm_cutlass.default, (xq, qv, qp, ws, xs, None, None))
