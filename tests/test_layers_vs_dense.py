"""Every sparseq layer against the dense layer it replaces.

Two halves, which together tie a layer to the ``nn.Linear`` it was made from:

* the layer's output is the dense layer ``F.linear(x, W, bias)`` with the layer's own fp32
  weight ``W`` (W8A8: ``x`` quantized by the reference quantizer first), within the bound of
  ``sparseq.testing`` (``check_layer_close``); on CPU for every dtype the CPU path runs, on
  the GPU in the ``gpu``-marked tests;
* that weight is the original weight pruned (2:4 by magnitude, exactly) and/or quantized
  (int8: within half a quantization step per channel), SmoothQuant factors included.

And the check can fail: a layer that drops its bias is out of tolerance in every format.
"""
import copy

import pytest
import torch
from torch import nn

import sparseq
from sparseq import dispatch
from sparseq import reference as ref
from sparseq.nn import FORMATS, Int8Linear, Int8WeightOnlyLinear, Sparse24Int8Linear, Sparse24Linear
from sparseq.testing import assert_layer_close, check_layer_close

K, N = 64, 32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _smooth(k=K):
    return torch.rand(k, generator=torch.Generator().manual_seed(7)) + 0.5


def _amax(smooth=None, k=K):
    """A static activation maximum calibrated on other data than the test inputs (so some
    test activations clamp)."""
    calib = torch.randn(16, k, generator=torch.Generator().manual_seed(11))
    return float((calib if smooth is None else calib / smooth).abs().max())


# name -> (builder(linear) -> layer, format name, options the layer must report)
VARIANTS = {
    "2:4": (lambda lin: Sparse24Linear.from_linear(lin, prune="magnitude"), "2:4", {}),
    "int8_weight_only": (lambda lin: Int8WeightOnlyLinear.from_linear(lin), "int8_weight_only", {}),
    "w8a8": (lambda lin: Int8Linear.from_linear(lin), "w8a8", {"smooth": False, "static": False}),
    "w8a8-smooth": (lambda lin: Int8Linear.from_linear(lin, smooth=_smooth(lin.in_features)), "w8a8",
                    {"smooth": True, "static": False}),
    "w8a8-static": (lambda lin: Int8Linear.from_linear(lin, act_amax=_amax(k=lin.in_features)), "w8a8",
                    {"smooth": False, "static": True}),
    "w8a8-smooth-static": (lambda lin: Int8Linear.from_linear(
        lin, smooth=_smooth(lin.in_features), act_amax=_amax(_smooth(lin.in_features), lin.in_features)),
        "w8a8", {"smooth": True, "static": True}),
    "2:4+w8a8": (lambda lin: Sparse24Int8Linear.from_linear(lin, prune="magnitude"), "2:4+w8a8",
                 {"mode": "w8a8", "smooth": False, "static": False}),
    "2:4+w8a8-smooth": (lambda lin: Sparse24Int8Linear.from_linear(lin, prune="magnitude",
                                                                    smooth=_smooth(lin.in_features)),
                        "2:4+w8a8", {"mode": "w8a8", "smooth": True, "static": False}),
    "2:4+w8a8-static": (lambda lin: Sparse24Int8Linear.from_linear(lin, prune="magnitude",
                                                                    act_amax=_amax(k=lin.in_features)),
                        "2:4+w8a8", {"mode": "w8a8", "smooth": False, "static": True}),
    "2:4+w8a8-smooth-static": (lambda lin: Sparse24Int8Linear.from_linear(
        lin, prune="magnitude", smooth=_smooth(lin.in_features),
        act_amax=_amax(_smooth(lin.in_features), lin.in_features)),
        "2:4+w8a8", {"mode": "w8a8", "smooth": True, "static": True}),
    "2:4+int8_weight_only": (lambda lin: Sparse24Int8Linear.from_linear(lin, mode="weight_only", prune="magnitude"),
                             "2:4+int8_weight_only", {"mode": "weight_only", "smooth": False, "static": False}),
}


def _linear(dtype, bias=True, k=K, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))  # large enough that dropping it shows
    return lin.to(dtype)


def _inputs(dtype, shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _layer_weight_fp32(layer):
    """The layer's weight in fp32 from its public buffers (values/meta or weight_q, w_scale)."""
    buffers = dict(layer.named_buffers())
    w = buffers["weight_q"] if "weight_q" in buffers else ref.decompress_24(buffers["values"], buffers["meta"])
    w = w.float()
    if "w_scale" in buffers:
        w = w * buffers["w_scale"][:, None]
    return w


# ------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, K), (5, K), (2, 3, K), (33, K)], ids=str)
def test_layer_matches_the_dense_layer(variant, dtype, shape):
    build, fmt, options = VARIANTS[variant]
    layer = build(_linear(dtype))
    assert layer.FORMAT == fmt and layer.options() == options and layer.dtype == dtype
    x = _inputs(dtype, shape)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype
    assert_layer_close(layer, x, out=y, dense_fallback=_ran_dense(layer, x))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_without_bias_matches_the_dense_layer(variant, dtype):
    build, _, _ = VARIANTS[variant]
    layer = build(_linear(dtype, bias=False))
    assert layer.bias is None
    x = _inputs(dtype, (7, K))
    with torch.no_grad():
        y = layer(x)
    assert_layer_close(layer, x, out=y, dense_fallback=_ran_dense(layer, x))


def _ran_dense(layer, x) -> bool:
    """Whether dispatch ran the layer's dense bucket for ``x`` (on CPU: 2:4 and weight-only
    layers; its operands are rounded once to the layer dtype, see sparseq.testing)."""
    bucket = dispatch.bucket_of(x.reshape(-1, x.shape[-1]).shape[0])
    return any(b == "dense" for (_, bk, _), b in layer.backends.items() if bk == bucket)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_weight_is_the_compressed_dense_weight(variant, dtype):
    """The weight the dense comparison uses is the original one, pruned and/or quantized as
    the format says: 2:4 keeps the two largest |w| of each group of four exactly, int8 is
    within half a step of the (smoothed) weight, per output channel."""
    build, fmt, options = VARIANTS[variant]
    lin = _linear(dtype)
    layer = build(lin)
    w = lin.weight.detach()
    if fmt.startswith("2:4"):
        w = torch.where(ref.prune_24(w), w, torch.zeros_like(w))  # magnitude pruning of the original
    w = w.float()
    if options.get("smooth"):
        w = w * _smooth()[None, :]
    got = _layer_weight_fp32(layer)
    if fmt == "2:4":
        assert torch.equal(got, w)
    else:
        step = dict(layer.named_buffers())["w_scale"].float()[:, None]
        assert torch.equal(step.squeeze(1), ref.absmax_scale(w.abs().amax(dim=1)))
        assert bool(((got - w).abs() <= step * (0.5 + 1e-6)).all())
        assert bool((got[w == 0] == 0).all())  # pruned positions stay zero
    assert torch.equal(layer.bias, lin.bias.detach())
    if options.get("static"):
        smooth = _smooth() if options.get("smooth") else None
        assert torch.equal(layer.x_scale, ref.per_tensor_scale(_amax(smooth)))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropping_the_bias_fails_the_check(fmt, dtype, monkeypatch):
    """The dense comparison is tight enough to see a missing bias in every format, with the
    shape and default ``nn.Linear`` init of the GPU checks (whose old ``0.05 * max|y| + 1e-2``
    passed a dropped bias in all five formats). The reference path: the bound, not dispatch."""
    monkeypatch.setattr(dispatch, "preferences", lambda *a: ["reference"])
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(dtype)
    layer = sparseq.nn.make_layer(lin, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
    x = _inputs(dtype, (16, 256))
    assert check_layer_close(layer, x) is None
    no_bias = copy.deepcopy(layer)
    no_bias.bias = None
    with torch.no_grad():
        y = no_bias(x)
    msg = check_layer_close(layer, x, out=y)
    assert msg is not None and "out of tolerance" in msg, msg


def _fallback_params():
    for variant in sorted(VARIANTS):
        for dtype in DTYPES:
            yield pytest.param(variant, dtype, id=f"{variant}-{dtype}")


@pytest.mark.parametrize("variant,dtype", list(_fallback_params()))
def test_dense_fallback_matches_the_dense_layer(variant, dtype, monkeypatch):
    """The dense fallback (what a GPU's dispatch table picks where no kernel wins) is a
    backend like any other: the layer's output must still be the format's."""
    monkeypatch.setattr(dispatch, "preferences", lambda *a: ["dense", "reference"])
    layer = VARIANTS[variant][0](_linear(dtype))
    x = _inputs(dtype, (5, K))
    with torch.no_grad():
        y = layer(x)
    assert set(layer.backends.values()) == {"dense"}
    # W8A8 layers quantize activations in the dense bucket too (same answer in every bucket);
    # its operands are rounded once to the compute dtype (sparseq.testing: dense_fallback)
    assert_layer_close(layer, x, out=y, dense_fallback=True)


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 16, 64, 300, 2048])
def test_cuda_layer_matches_the_dense_layer(variant, dtype, m):
    """Whatever kernel dispatch picks on this GPU (Triton, CUTLASS, dense fallback) against
    the dense layer, computed on the CPU from a copy of the same layer."""
    build, _, _ = VARIANTS[variant]
    cpu_layer = build(_linear(dtype, k=256, n=128))
    x = _inputs(dtype, (m, 256))
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    with torch.no_grad():
        y = gpu_layer(x.cuda())
    torch.cuda.synchronize()
    backend = gpu_layer.prepare()[dispatch.BUCKET_NAMES[dispatch.bucket_of(m)]]  # resolved already
    msg = check_layer_close(cpu_layer, x, out=y.cpu(), dense_fallback=backend == "dense")
    assert msg is None, (backend, msg)
