"""int8 quantization rules: symmetric, clamp to [-127, 127], round half to even."""
import pytest
import torch

import sparseq

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS)
def test_per_channel_rule(dtype):
    w = torch.randn(64, 96).to(dtype)
    q, s = sparseq.quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (64,)
    wf = w.float()
    assert torch.equal(s, wf.abs().amax(1) / 127)
    assert torch.equal(q, torch.clamp(torch.round(wf / s[:, None]), -127, 127).to(torch.int8))
    assert (q.abs().amax(1) == 127).all()  # the absmax maps to +-127
    assert (q >= -127).all()  # -128 never appears


def test_round_half_to_even_and_zero_rows():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0.0] * 6])
    q, s = sparseq.quantize_per_channel(w)
    assert s.tolist() == [1.0, 1.0]  # zero row gets scale 1.0, not 0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2], [0] * 6]


@pytest.mark.parametrize("dtype", FLOATS)
def test_per_token_rule_with_smoothing(dtype):
    x = torch.randn(17, 64).to(dtype)
    smooth = torch.rand(64) + 0.5
    q, s = sparseq.quantize_per_token(x, smooth)
    xs = x.float() / smooth
    assert torch.equal(s, xs.abs().amax(1) / 127)
    assert torch.equal(q, torch.clamp(torch.round(xs / s[:, None]), -127, 127).to(torch.int8))
    q0, s0 = sparseq.quantize_per_token(x)
    assert torch.equal(s0, x.float().abs().amax(1) / 127)


def test_per_tensor_static():
    x = torch.randn(5, 32)
    scale = sparseq.reference.per_tensor_scale(2.0)
    q = sparseq.quantize_per_tensor(x, scale)
    assert torch.equal(q, torch.clamp(torch.round(x / (2.0 / 127)), -127, 127).to(torch.int8))
    big = torch.full((1, 8), 100.0)
    assert (sparseq.quantize_per_tensor(big, scale) == 127).all()  # clamped


def test_quantization_error_is_half_a_step():
    x = torch.randn(8, 256)
    q, s = sparseq.quantize_per_token(x)
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: sparseq.quantize_per_token(torch.zeros(2, 4, dtype=torch.int8)), TypeError, "x must have dtype"),
        (lambda: sparseq.quantize_per_token(torch.zeros(4)), ValueError, "x must be 2-D"),
        (lambda: sparseq.quantize_per_token(torch.zeros(2, 4), torch.ones(5)), ValueError, r"smooth must have shape \(4,\)"),
        (lambda: sparseq.quantize_per_token(torch.zeros(2, 4), torch.zeros(4)), ValueError, "smooth must be > 0"),
        (lambda: sparseq.quantize_per_token(torch.zeros(2, 4), torch.full((4,), float("nan"))), ValueError, "smooth contains NaN"),
        (lambda: sparseq.quantize_per_token(torch.full((2, 4), float("inf"))), ValueError, "x contains NaN or Inf"),
        (lambda: sparseq.quantize_per_tensor(torch.zeros(2, 4), torch.ones(2)), ValueError, r"scale must have shape \(1,\)"),
        (lambda: sparseq.quantize_per_tensor(torch.zeros(2, 4), torch.ones(1, dtype=torch.float16)), TypeError, "scale must have dtype"),
        (lambda: sparseq.quantize_per_tensor(torch.zeros(2, 4), torch.tensor([float("inf")])), ValueError, "scale contains NaN or Inf"),
        (lambda: sparseq.quantize_per_channel(torch.tensor([[float("nan"), 1.0]])), ValueError, "w contains NaN"),
        (lambda: sparseq.quantize_per_channel(torch.zeros(2, 4, dtype=torch.float64)), TypeError, "w must have dtype"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
