"""sparseq.nn layers and swap(): CPU forward equals the reference ops, report, errors, interop."""
import copy
import threading

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import sparseq
from sparseq import reference as ref
from sparseq.nn import FORMATS, Sparse24Linear


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 24, bias=False), nn.Linear(24, 10)).to(dtype)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_reference(fmt, dtype):
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
    assert torch.equal(y.reshape(-1, 32), expected)  # CPU runs the reference op itself
    assert layer.last_backend == "reference"


def test_smoothquant_and_static_scales():
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
    assert layer.options() == {"smooth": True, "static": True}


def test_swap_report_and_recipe_patterns():
    model = tiny_model()
    x = torch.randn(5, 64)
    report = sparseq.swap(model, {"0": "2:4", "2": "w8a8", "*": "dense"}, prune="magnitude")
    assert isinstance(model[0], Sparse24Linear) and isinstance(model[2], sparseq.Int8Linear)
    assert type(model[3]) is nn.Linear
    assert [r.format for r in report.rows] == ["2:4", "w8a8", "dense"]
    assert report.rows[0].bytes_after < report.rows[0].bytes_before
    text = str(report)
    assert "2 of 3 Linear layers swapped" in text and "recipe says dense" in text
    assert model(x).shape == (5, 10)


def test_swap_filter_and_unsupported_shapes():
    model = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 16), nn.Linear(16, 8))
    report = sparseq.swap(model, "2:4", filter=lambda name, m: name != "2", prune="magnitude")
    notes = {r.name: (r.format, r.note) for r in report.rows}
    assert notes["0"][0] == "dense" and "multiple of 8" in notes["0"][1]
    assert notes["1"][0] == "2:4"
    assert notes["2"] == ("dense", "excluded by filter")


def test_not_24_weight_raises_naming_layer():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"layer '0' \(2:4\): weight is not 2:4 sparse"):
        sparseq.swap(model, "2:4")
    with pytest.raises(ValueError, match="unknown format 'bogus'"):
        sparseq.swap(model, "bogus")
    with pytest.raises(ValueError, match="prune must be one of"):
        sparseq.swap(model, "2:4", prune="wanda")


def test_torch_prune_mask_is_honoured():
    lin = nn.Linear(16, 8)
    mask = ref.prune_24(torch.randn(8, 16))
    torch.nn.utils.prune.custom_from_mask(lin, "weight", mask)
    model = nn.Sequential(lin)
    expected_w = (lin.weight_orig * mask).detach().clone()
    sparseq.swap(model, "2:4")  # no prune=: the mask already makes it 2:4
    assert torch.equal(model[0].dense_weight(), expected_w)

    lin2 = nn.Linear(16, 8)
    torch.nn.utils.prune.custom_from_mask(lin2, "weight", torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="not 2:4"):
        sparseq.swap(nn.Sequential(lin2), "2:4")


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


def test_compile_fullgraph_cpu():
    model = tiny_model()
    sparseq.swap(model, {"0": "2:4+w8a8", "2": "int8_weight_only", "3": "2:4"}, prune="magnitude")
    x = torch.randn(4, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), eager)


def test_threads_share_one_model():
    model = tiny_model()
    sparseq.swap(model, "2:4+w8a8", filter=lambda n, m: m.in_features % 8 == 0, prune="magnitude")
    inputs = [torch.randn(i + 1, 64) for i in range(8)]
    expected = [model(x) for x in inputs]
    fresh = copy.deepcopy(model)  # caches empty: threads race on the first resolution
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = fresh(inputs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[i], expected[i]) for i in range(8))


def test_dense_fallback_copy_and_switch_off():
    layer = Sparse24Linear.from_linear(nn.Linear(16, 8), prune="magnitude")
    run = layer._dense_impl()
    x = torch.randn(3, 16)
    assert torch.allclose(run(x), torch.nn.functional.linear(x, layer.dense_weight(), layer.bias))
    layer.dense_fallback = False
    assert layer._dense_impl() is None


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("m", [1, 16, 64, 300, 2048])
def test_cuda_layers_match_reference(fmt, m):
    lin = nn.Linear(256, 128).to(torch.bfloat16)
    layer = sparseq.nn.make_layer(lin, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    expected = layer(x).float()
    layer = layer.cuda()
    y = layer(x.cuda()).float().cpu()
    err = (y - expected).abs().max().item()
    assert err <= 0.05 * expected.abs().max().item() + 1e-2, (layer.last_backend, err)


@pytest.mark.gpu
def test_cuda_graph_capture_matches_eager():
    model = tiny_model(torch.float16).cuda()
    sparseq.swap(model, "2:4", filter=lambda n, m: m.in_features % 8 == 0, prune="magnitude")
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    eager = model(x)  # warm-up resolves the kernels outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
