"""Triton quantize_per_token: bit-exact against sparseq.reference (interpreter on CPU, or CUDA)."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from sparseq import reference as ref  # noqa: E402
from sparseq.kernels import quantize as kq  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
MS = [1, 3, 16, 17, 100, 257]
NOT_INTERPRETED = pytest.mark.skipif(INTERPRET, reason="GPU test: the interpreter has no bf16")


def _check(x, smooth=None, **kw):
    q, s = kq.quantize_per_token(x, smooth, **kw)
    qr, sr = ref.quantize_per_token(x, smooth)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [8, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(m, k, dtype):
    x = (torch.randn(m, k) * 4).to(dtype).to(DEVICE)
    smooth = (torch.rand(k) + 0.5).to(DEVICE)
    _check(x)
    _check(x, smooth)


def test_two_pass_long_rows():
    x = torch.randn(5, 200, dtype=torch.float16, device=DEVICE)
    _check(x, block_k=64)
    _check(x, (torch.rand(200) + 0.5).to(DEVICE), block_k=64)


def test_round_half_to_even_and_zero_rows():
    x = torch.zeros(3, 16, device=DEVICE)
    x[1, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])  # scale 1: exact ties
    x[2, :3] = torch.tensor([-127.0, 3.5, -4.5])
    q, s = kq.quantize_per_token(x)
    assert q[1, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]
    assert q[2, :3].tolist() == [-127, 4, -4]
    assert s.tolist() == [1.0, 1.0, 1.0]  # all-zero row: scale 1
    _check(x)


def test_strided_rows():
    x = torch.randn(6, 64, device=DEVICE)[::2]
    _check(x)


def test_bad_inputs_raise_before_launch(monkeypatch):
    class Boom:
        def __getitem__(self, grid):
            raise AssertionError("kernel launched")

    monkeypatch.setattr(kq, "_quantize_per_token_kernel", Boom())
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(TypeError, match="x must have dtype"):
        kq.quantize_per_token(x.to(torch.int8))
    with pytest.raises(ValueError, match="x must be 2-D"):
        kq.quantize_per_token(x[0])
    with pytest.raises(ValueError, match="smooth must have shape"):
        kq.quantize_per_token(x, torch.ones(8, device=DEVICE))
    with pytest.raises(TypeError, match="smooth must have dtype"):
        kq.quantize_per_token(x, torch.ones(16, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
        kq.quantize_per_token(torch.randn(2, 16, device="meta"))


def test_opcheck():
    x = torch.randn(3, 32, device=DEVICE)
    op = torch.ops.sparseq.quantize_per_token_triton.default
    torch.library.opcheck(op, (x, None))
    torch.library.opcheck(op, (x.half(), (torch.rand(32) + 0.5).to(DEVICE)))


@pytest.mark.gpu
@NOT_INTERPRETED
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [8, 100, 4096, 20000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(m, k, dtype):
    x = (torch.randn(m, k, device="cuda") * 4).to(dtype)
    _check(x)
    _check(x, torch.rand(k, device="cuda") + 0.5)


@pytest.mark.parametrize("m", [1, 17, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_tensor_matches_reference(m, dtype):
    x = (torch.randn(m, 100) * 4).to(dtype).to(DEVICE)
    scale = torch.tensor([0.05], device=DEVICE)
    smooth = (torch.rand(100) + 0.5).to(DEVICE)
    for f in (None, smooth):
        assert torch.equal(kq.quantize_per_tensor(x, scale, f), ref.quantize_per_tensor(x, scale, f))
    with pytest.raises(ValueError, match=r"scale must have shape \(1,\)"):
        kq.quantize_per_tensor(x, torch.ones(2, device=DEVICE))
    torch.library.opcheck(torch.ops.sparseq.quantize_per_tensor_triton.default, (x[:3], scale, None))


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the interpreter's numpy 0/0
def test_subnormal_rows_saturate_like_torch():
    x = torch.zeros(2, 16, device=DEVICE)
    x[0, :3] = torch.tensor([1e-44, -1e-44, 5e-45])  # amax / 127 underflows to 0: 0/0 -> 0, x/0 -> +-127
    x[1, :2] = torch.tensor([1e-39, -3e-39])
    _check(x)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN / NaN
@pytest.mark.parametrize("k", [300, 40000])  # one pass, and the looped two-pass kernel
def test_nan_row_gets_a_nan_scale(k):
    """As the reference's absmax_scale: a row holding NaN never gets a finite scale (the GPU's
    tl.max drops NaN; the kernel flags such rows), an Inf row gets an Inf scale."""
    x = torch.randn(4, k, device=DEVICE)
    x[1, k - 3] = float("nan")
    x[2, 5] = float("inf")
    _, s = kq.quantize_per_token(x)
    assert torch.isnan(s[1]) and torch.isinf(s[2]) and torch.isfinite(s[[0, 3]]).all()
