"""The CUDA ops' schemas, fakes and CPU reference impls (no GPU needed), and, where the
extensions are built, that every CUDA op has a registered CUDA kernel.

The CPU impls are checked against an independent computation: ``F.linear`` (or exact
integer math) on the dense 2:4 weight the test itself built, fed through the layout
converters (and, for sm80, PyTorch's own converter), within ``sparseq.testing``'s bound."""
import importlib.util

import pytest
import torch
from torch.nn import functional as F

import sparseq.cuda_ops as co
from sparseq import cutlass_layout as cl
from sparseq import reference as ref
from sparseq.testing import check_matmul_close


def _weight(n, k, dtype=torch.bfloat16, quantize=False):
    w = torch.randn(n, k)
    if quantize:
        values, meta, scale = ref.prune_and_compress_24(w, quantize=True)
        return values, meta, scale
    values, meta = ref.prune_and_compress_24(w.to(dtype))
    return values, meta


def test_every_cuda_op_has_a_schema_and_an_extension():
    assert set(co.CUDA_OP_SCHEMAS) == set(co.CUDA_OP_EXTENSION)
    for name in co.CUDA_OP_SCHEMAS:
        assert hasattr(torch.ops.sparseq, name), name
    assert {"sparse24_mm_cutlass", "sparse24_int8_mm_cutlass"} <= set(co.CUDA_OP_SCHEMAS)


def _dense_24(n, k, dtype, gen):
    """A 2:4 weight built here, not by sparseq: two random positions of every group of four
    hold a random non-zero value (int8: in [-127, 127]), the other two are zero."""
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    if dtype == torch.int8:
        sign = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
        w = torch.randint(1, 128, (n, k), generator=gen) * sign
    else:
        w = torch.randn(n, k, generator=gen).to(dtype)
        w = torch.where(w == 0, torch.ones_like(w), w)
    return torch.where(mask, w, torch.zeros_like(w)).to(dtype)


def _corrupt(prepared):
    """The same prepared metadata with its bytes shifted by one: every code is still valid
    (i0 < i1), but most groups now read another group's positions."""
    raw = prepared.contiguous().view(torch.uint8)
    return raw.reshape(-1).roll(1).reshape(raw.shape).view(prepared.dtype).reshape(prepared.shape)


def _pytorch_sm80(w):
    """Values and sm80 metadata from PyTorch's own CUTLASS 2.x converter (an independent
    compressor and layout), shaped like ``prepare_sparse24_cutlass``'s output."""
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    values, meta = conv.sparse_semi_structured_from_dense_cutlass(w)
    shape, dtype = cl.cutlass_meta_shape(w.shape[0], w.shape[1], cl.element_bits(w.dtype), 80)
    assert meta.dtype == dtype
    return values.contiguous(), meta.reshape(shape).contiguous()


def _check_mm(x, values, prepared, bias, w):
    """The CPU op against ``F.linear`` on the dense weight ``w`` the test built (fp32 math,
    one cast), within the kernel-vs-reference bound of ``sparseq.testing``."""
    out = co.sparse24_mm_cutlass(x, values, prepared, bias)
    expected = F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    return check_matmul_close(out, expected, x, w, bias=bias)


def _int8_expected(xq, wq, w_scale, x_scale, bias, out_dtype):
    """W8A8 on the dense int8 weight the test built: exact integer products in fp64, scaled,
    biased, cast once."""
    acc = xq.double() @ wq.double().T
    xs = x_scale.double()
    y = acc * (xs[:, None] if xs.numel() > 1 else xs) * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def _check_int8_mm(xq, values, prepared, w_scale, x_scale, bias, out_dtype, wq):
    out = co.sparse24_int8_mm_cutlass(xq, values, prepared, w_scale, x_scale, bias, out_dtype)
    expected = _int8_expected(xq, wq, w_scale, x_scale, bias, out_dtype)
    return check_matmul_close(out, expected, xq, wq, x_scale=x_scale, w_scale=w_scale, bias=bias)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse24_mm_cutlass_cpu_matches_dense(arch, dtype, with_bias):
    gen = torch.Generator().manual_seed(arch + with_bias)
    w = _dense_24(128, 256, dtype, gen)
    x = torch.randn(3, 256, generator=gen).to(dtype)
    bias = torch.randn(128, generator=gen).to(dtype) if with_bias else None
    values, meta = ref.compress_24(w)
    prepared = co.prepare_sparse24_cutlass(values, meta, arch=arch)
    assert torch.equal(co.unprepare_sparse24_cutlass(values, prepared), meta)
    assert _check_mm(x, values, prepared, bias, w) is None
    if arch == 80:  # values and layout from PyTorch's converter, not from sparseq
        assert _check_mm(x, *_pytorch_sm80(w), bias, w) is None


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [True, False])
def test_sparse24_int8_mm_cutlass_cpu_matches_dense(arch, out_dtype, per_token):
    gen = torch.Generator().manual_seed(arch + per_token)
    wq = _dense_24(64, 384, torch.int8, gen)
    w_scale = torch.rand(64, generator=gen) * 0.02 + 1e-3
    xq = torch.randint(-127, 128, (5, 384), generator=gen).to(torch.int8)
    x_scale = torch.rand(5 if per_token else 1, generator=gen) * 0.05 + 1e-3
    bias = torch.randn(64, generator=gen)
    values, meta = ref.compress_24(wq)
    prepared = co.prepare_sparse24_cutlass(values, meta, arch=arch)
    assert _check_int8_mm(xq, values, prepared, w_scale, x_scale, bias, out_dtype, wq) is None
    assert _check_int8_mm(xq, values, prepared, w_scale, x_scale, None, out_dtype, wq) is None
    if arch == 80:
        pv, pm = _pytorch_sm80(wq)
        assert _check_int8_mm(xq, pv, pm, w_scale, x_scale, bias, out_dtype, wq) is None


@pytest.mark.parametrize("arch", [80, 90])
def test_dense_comparison_catches_a_corrupted_prepared_meta(arch):
    """The checks above can fail: a prepared metadata whose codes point at the wrong
    positions, or a dropped bias, is out of tolerance."""
    gen = torch.Generator().manual_seed(arch)
    w = _dense_24(128, 256, torch.bfloat16, gen)
    x = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    bias = torch.randn(128, generator=gen).to(torch.bfloat16)
    values, meta = ref.compress_24(w)
    prepared = co.prepare_sparse24_cutlass(values, meta, arch=arch)
    assert _check_mm(x, values, prepared, bias, w) is None
    assert _check_mm(x, values, _corrupt(prepared), bias, w) is not None
    out = co.sparse24_mm_cutlass(x, values, prepared, None)  # the bias dropped
    expected = F.linear(x.float(), w.float(), bias.float()).to(x.dtype)
    assert check_matmul_close(out, expected, x, w, bias=bias) is not None

    wq = _dense_24(64, 256, torch.int8, gen)
    w_scale = torch.rand(64, generator=gen) * 0.02 + 1e-3
    xq = torch.randint(-127, 128, (4, 256), generator=gen).to(torch.int8)
    x_scale = torch.rand(4, generator=gen) * 0.05 + 1e-3
    qv, qm = ref.compress_24(wq)
    qp = co.prepare_sparse24_cutlass(qv, qm, arch=arch)
    assert _check_int8_mm(xq, qv, qp, w_scale, x_scale, None, torch.bfloat16, wq) is None
    assert _check_int8_mm(xq, qv, _corrupt(qp), w_scale, x_scale, None, torch.bfloat16, wq) is not None


def test_bad_inputs_raise_clear_errors():
    values, meta = _weight(64, 128)
    prepared = co.prepare_sparse24_cutlass(values, meta, arch=90)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="prepare_sparse24_cutlass"):
        co.sparse24_mm_cutlass(x, values, meta)  # canonical meta, not prepared
    with pytest.raises(ValueError, match="K=256"):
        co.sparse24_mm_cutlass(torch.randn(2, 256, dtype=torch.bfloat16), values, prepared)
    with pytest.raises(ValueError, match="arch=80 or arch=90"):
        co.prepare_sparse24_cutlass(values, meta)
    with pytest.raises(ValueError, match="multiple of 64"):
        v, m = _weight(32, 128)
        co.prepare_sparse24_cutlass(v, m, arch=90)
    qv, qm, ws = _weight(64, 128, quantize=True)
    qp = co.prepare_sparse24_cutlass(qv, qm, arch=80)
    with pytest.raises(TypeError, match="W8A8"):
        co.sparse24_int8_mm_cutlass(x, qv, qp, ws, torch.ones(2))
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        co.sparse24_int8_mm_cutlass(torch.zeros(2, 128, dtype=torch.int8), qv, qp, ws, torch.ones(2), None,
                                    torch.float32)


def test_fakes_give_shapes_on_meta_tensors():
    values = torch.empty(128, 128, dtype=torch.bfloat16, device="meta")
    meta = torch.empty(128, 32, dtype=torch.uint8, device="meta")
    for arch in (80, 90):
        prepared = getattr(torch.ops.sparseq, f"sparse24_meta_to_cutlass_sm{arch}")(values, meta)
        shape, dtype = cl.cutlass_meta_shape(128, 256, 16, arch)
        assert tuple(prepared.shape) == shape and prepared.dtype == dtype
        back = getattr(torch.ops.sparseq, f"sparse24_meta_from_cutlass_sm{arch}")(values, prepared)
        assert tuple(back.shape) == (128, 32)
        x = torch.empty(7, 256, dtype=torch.bfloat16, device="meta")
        assert tuple(torch.ops.sparseq.sparse24_mm_cutlass(x, values, prepared).shape) == (7, 128)


@pytest.mark.parametrize("arch", [80, 90])
def test_opcheck_cpu(arch):
    values, meta = _weight(64, 128)
    prepared = co.prepare_sparse24_cutlass(values, meta, arch=arch)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.sparseq.sparse24_mm_cutlass.default, (x, values, prepared, None))
    torch.library.opcheck(getattr(torch.ops.sparseq, f"sparse24_meta_to_cutlass_sm{arch}").default, (values, meta))
    torch.library.opcheck(getattr(torch.ops.sparseq, f"sparse24_meta_from_cutlass_sm{arch}").default,
                          (values, prepared))
    qv, qm, ws = _weight(64, 128, quantize=True)
    qp = co.prepare_sparse24_cutlass(qv, qm, arch=arch)
    xq, xs = ref.quantize_per_token(torch.randn(3, 128))
    torch.library.opcheck(torch.ops.sparseq.sparse24_int8_mm_cutlass.default,
                          (xq, qv, qp, ws, xs, None, torch.bfloat16))


def _built(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not (_built("sparseq._C") or _built("sparseq._C_sm90a")), reason="CUDA extensions not built")
def test_built_extensions_register_every_cuda_op():
    from sparseq.backends import load_cuda_extensions

    status = load_cuda_extensions()
    for name, module in co.CUDA_OP_EXTENSION.items():
        arch = "sm80" if module == "sparseq._C" else "sm90a"
        if not _built(module):
            continue
        assert status[arch], status[arch].reason
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseq::{name}", "CUDA"), name
