"""Triton prune_and_compress_24 (+int8): bit-exact against sparseq.reference.prune_and_compress_24."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from sparseq import reference as ref  # noqa: E402
from sparseq.kernels import prune_compress as kp  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
NOT_INTERPRETED = pytest.mark.skipif(INTERPRET, reason="GPU test: the interpreter has no bf16")


def _bits(t):
    """Exact bit patterns (so +0.0 and -0.0 differ)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.uint8) if t.element_size() == 1 \
        else t.view(torch.int16)


def _check(w, score=None, quantize=False, **kw):
    out = kp.prune_and_compress_24(w, score, quantize, **kw)
    expected = ref.prune_and_compress_24(w, score, quantize)
    assert len(out) == len(expected)
    for a, b in zip(out, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b))


def _weight(n, k, dtype):
    w = torch.randn(n, k)
    w[0, :16] = torch.tensor([0., -0., 0., 3., 1., 1., -1., 1., 0., 0., 0., 0., -0., 2., 2., 0.])
    w[-1, -8:] = torch.tensor([-2., 2., -2., 2., 0.5, -0., -0.5, 0.])
    return w.to(dtype).to(DEVICE)


@pytest.mark.parametrize("n,k", [(1, 16), (17, 40), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quantize", [False, True])
def test_matches_reference(n, k, dtype, quantize):
    _check(_weight(n, k, dtype), None, quantize)


@pytest.mark.parametrize("quantize", [False, True])
def test_score_ties_and_zero_weights(quantize):
    w = _weight(17, 40, torch.float16)
    score = torch.randint(0, 3, (17, 40)).float().to(DEVICE)  # many ties; kept entries may be zeros
    _check(w, score, quantize)
    _check(w, score.half(), quantize)


def test_several_k_tiles():
    w = _weight(5, 136, torch.float32)
    _check(w, None, False, block_k=32)
    _check(w, None, True, block_k=32)
    _check(w, w.abs() * 3, True, block_n=4, block_k=64)


def test_all_zero_rows_and_strided_input():
    w = torch.zeros(3, 16, device=DEVICE)
    _check(w, None, True)
    _check(_weight(8, 64, torch.float32)[::2], None, True)


def test_bad_inputs_raise_before_launch(monkeypatch):
    class Boom:
        def __getitem__(self, grid):
            raise AssertionError("kernel launched")

    monkeypatch.setattr(kp, "_prune_and_compress_24_kernel", Boom())
    w = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(TypeError, match="w must have dtype"):
        kp.prune_and_compress_24(w.to(torch.int8))
    with pytest.raises(ValueError, match="K \\(dim 1\\) must be a positive multiple of 8"):
        kp.prune_and_compress_24(w[:, :12])
    with pytest.raises(ValueError, match="score must have shape"):
        kp.prune_and_compress_24(w, w[:2])
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        kp.prune_and_compress_24(torch.full((4, 16), float("nan"), device=DEVICE))
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
        kp.prune_and_compress_24(torch.randn(4, 16, device="meta"))


def test_opcheck():
    w = torch.randn(16, 32, device=DEVICE)
    torch.library.opcheck(torch.ops.sparseq.prune_and_compress_24_triton.default, (w, None))
    torch.library.opcheck(torch.ops.sparseq.prune_and_compress_24_int8_triton.default, (w.half(), w.abs()))


@pytest.mark.gpu
@NOT_INTERPRETED
@pytest.mark.parametrize("n,k", [(17, 40), (512, 1024), (4096, 4104)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu(n, k, dtype):
    w = _weight(n, k, dtype)
    for quantize in (False, True):
        _check(w, None, quantize)
        _check(w, w.float().abs() * torch.rand(k, device="cuda"), quantize)
