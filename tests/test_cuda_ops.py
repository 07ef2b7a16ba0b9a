"""The CUDA ops' schemas, fakes and CPU reference impls (no GPU needed), and, where the
extensions are built, that every CUDA op has a registered CUDA kernel."""
import importlib.util

import pytest
import torch

import sparseq.cuda_ops as co
from sparseq import cutlass_layout as cl
from sparseq import reference as ref


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


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_mm_cutlass_cpu_reference(arch, dtype):
    values, meta = _weight(128, 256, dtype)
    prepared = co.prepare_sparse24_cutlass(values, meta, arch=arch)
    assert torch.equal(co.unprepare_sparse24_cutlass(values, prepared), meta)
    x = torch.randn(3, 256).to(dtype)
    bias = torch.randn(128)
    out = co.sparse24_mm_cutlass(x, values, prepared, bias)
    assert torch.equal(out, ref.sparse24_mm(x, values, meta, bias))


@pytest.mark.parametrize("arch", [80, 90])
def test_sparse24_int8_mm_cutlass_cpu_reference(arch):
    values, meta, w_scale = _weight(64, 384, quantize=True)
    prepared = co.prepare_sparse24_cutlass(values, meta, arch=arch)
    xq, x_scale = ref.quantize_per_token(torch.randn(5, 384))
    out = co.sparse24_int8_mm_cutlass(xq, values, prepared, w_scale, x_scale, None, torch.float16)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref.sparse24_int8_mm(xq, values, meta, w_scale, x_scale, None, torch.float16))


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
