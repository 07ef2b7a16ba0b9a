"""sparseq.nn layers: the reference path is wired to the reference ops, from_linear, buffers, repr,
errors; on the GPU, every format against the dense layer it replaces (the CPU comparison with
the dense layer, for every variant and dtype, is tests/test_layers_vs_dense.py)."""
import copy

import pytest
import torch
from torch import nn

import sparseq
from sparseq import dispatch
from sparseq import reference as ref
from sparseq.nn import FORMATS, Sparse24Linear
from sparseq.testing import assert_layer_close, check_layer_close


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 24, bias=False), nn.Linear(24, 10)).to(dtype)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_reference(fmt, dtype, monkeypatch):
    monkeypatch.setattr(dispatch, "preferences", lambda *a: ["reference"])  # the wiring of the reference path
    lin = nn.Linear(64, 32).to(dtype)
    layer = sparseq.nn.make_layer(lin, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
    x = torch.randn(2, 3, 64).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 32) and y.dtype == dtype
    x2 = x.reshape(-1, 64)
    b = lin.bias.detach()
    if fmt == "2:4":
        v, m = ref.prune_and_compress_24(lin.weight.detach())
        expected = ref.sparse24_mm(x2, v, m, b)
    elif fmt == "int8_weight_only":
        q, s = ref.quantize_per_channel(lin.weight.detach())
        expected = ref.int8_weight_only_mm(x2, q, s, b)
    elif fmt == "w8a8":
        q, s = ref.quantize_per_channel(lin.weight.detach())
        xq, xs = ref.quantize_per_token(x2)
        expected = ref.int8_mm(xq, q, xs, s, b, dtype)
    else:
        qv, m, s = ref.prune_and_compress_24(lin.weight.detach(), quantize=True)
        if fmt == "2:4+w8a8":
            xq, xs = ref.quantize_per_token(x2)
            expected = ref.sparse24_int8_mm(xq, qv, m, s, xs, b, dtype)
        else:
            expected = ref.sparse24_int8_mm(x2, qv, m, s, None, b)
    assert torch.equal(y.reshape(-1, 32), expected)  # CPU runs the reference op itself (wiring)
    assert set(layer.backends.values()) == {"reference"}
    assert_layer_close(layer, x, out=y)  # and that is the dense layer it replaces


def test_smoothquant_and_static_scales(monkeypatch):
    monkeypatch.setattr(dispatch, "preferences", lambda *a: ["reference"])  # bit-exact: the reference path
    lin = nn.Linear(32, 16)
    smooth = torch.rand(32) + 0.5
    x = torch.randn(4, 32)
    amax = float((x / smooth).abs().max())  # calibrated on the same data: no clamping
    layer = sparseq.Int8Linear.from_linear(lin, smooth=smooth, act_amax=amax)
    q, s = ref.quantize_per_channel(lin.weight.detach().float() * smooth)
    xs = ref.per_tensor_scale(amax)
    expected = ref.int8_mm(ref.quantize_per_tensor(x, xs, smooth), q, xs, s, lin.bias.detach(), torch.float32)
    assert torch.equal(layer(x), expected)
    # smoothing is exact in float: the layer approximates the dense output
    assert torch.allclose(layer(x), lin(x), atol=0.05)
    assert_layer_close(layer, x)  # and, with x quantized as the format says, is the dense layer
    assert layer.options() == {"smooth": True, "static": True}


def test_bad_input_features():
    layer = Sparse24Linear.from_linear(nn.Linear(16, 8), prune="magnitude")
    with pytest.raises(ValueError, match="input has 12 features, expected 16"):
        layer(torch.randn(2, 12))
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 8"):
        Sparse24Linear(12, 8)


def test_extra_repr_and_state_dict_is_compressed():
    layer = sparseq.Sparse24Int8Linear.from_linear(nn.Linear(32, 16), prune="magnitude")
    assert "format='2:4+w8a8'" in repr(layer)
    sd = layer.state_dict()
    assert set(sd) == {"bias", "values", "meta", "w_scale"}
    assert sd["values"].dtype == torch.int8 and sd["values"].shape == (16, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("m", [1, 16, 64, 300, 2048])
def test_cuda_layers_match_the_dense_layer(fmt, m):
    """The layer on the GPU (whatever backend dispatch picks) against the dense layer it
    replaces, within sparseq.testing's bound (computed on the CPU from a copy of the layer)."""
    lin = nn.Linear(256, 128).to(torch.bfloat16)
    layer = sparseq.nn.make_layer(lin, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    cpu_layer = copy.deepcopy(layer)
    layer = layer.cuda()
    with torch.no_grad():
        y = layer(x.cuda())
    backend = layer.prepare()[dispatch.BUCKET_NAMES[dispatch.bucket_of(m)]]  # resolved already
    msg = check_layer_close(cpu_layer, x, out=y.cpu(), dense_fallback=backend == "dense")
    assert msg is None, (backend, msg)
