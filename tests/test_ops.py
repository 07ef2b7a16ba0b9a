"""Every reference op is a registered ``sparseq::*`` op with a working fake and passes opcheck."""
import pytest
import torch

import sparseq
from sparseq import ops


def _sparse_int8(n=16, k=32):
    return sparseq.prune_and_compress_24(torch.randn(n, k), quantize=True)


def _cases():
    x = torch.randn(3, 32)
    xh = x.half()
    w = torch.randn(16, 32)
    values, meta = sparseq.prune_and_compress_24(w)
    qv, qmeta, qs = _sparse_int8()
    xq, xs = sparseq.quantize_per_token(x)
    wq, ws = sparseq.quantize_per_channel(w)
    bias = torch.randn(16)
    return {
        "prune_24": [(w, None), (w, w.abs() * 2)],
        "compress_24": [(torch.where(sparseq.prune_24(w), w, 0.0),)],
        "decompress_24": [(values, meta)],
        "prune_and_compress_24": [(w, None)],
        "prune_and_compress_24_int8": [(w, None)],
        "quantize_per_channel": [(w,)],
        "quantize_per_token": [(x, None), (xh, torch.rand(32) + 0.5)],
        "quantize_per_tensor": [(x, torch.tensor([0.05]), None)],
        "int8_mm": [(xq, wq, xs, ws, bias, torch.bfloat16), (xq, wq, xs[:1], ws, None, torch.float16)],
        "int8_weight_only_mm": [(xh, wq, ws, bias.half())],
        "sparse24_mm": [(x, values, meta, bias)],
        "sparse24_int8_mm": [(xh, qv, qmeta, qs, None, None, None), (xq, qv, qmeta, qs, xs, bias, torch.bfloat16)],
    }


CASES = _cases()


def test_every_op_has_cases():
    assert set(CASES) == set(ops.REFERENCE_OPS)


@pytest.mark.parametrize("pinned", [False, True], ids=["public", "reference"])
@pytest.mark.parametrize("name", sorted(ops.REFERENCE_OPS))
def test_opcheck(name, pinned):
    op = getattr(torch.ops.sparseq, f"{name}_reference" if pinned else name).default
    for args in CASES[name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", sorted(ops.REFERENCE_OPS))
def test_fake_matches_real(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.sparseq, name).default
    for args in CASES[name]:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake]


def test_fake_raises_shape_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(2, 16))
        values = mode.from_tensor(torch.zeros(4, 4))
        meta = mode.from_tensor(torch.zeros(4, 1, dtype=torch.uint8))
        with pytest.raises(ValueError, match="x has K=16 but values expects K=8"):
            torch.ops.sparseq.sparse24_mm(x, values, meta, None)


def test_compile_fullgraph_through_ops():
    qv, meta, ws = _sparse_int8()

    def f(x):
        xq, xs = sparseq.quantize_per_token(x)
        return sparseq.sparse24_int8_mm(xq, qv, meta, ws, xs, out_dtype=torch.float32)

    x = torch.randn(5, 32)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))
