"""sparseq.nn at run time: dispatch cache, dense fallback, torch.compile, threads, casts,
reloads, autograd; GPU-marked CUDA-graph / compile / dispatch tests."""
import copy

import pytest
import torch
from torch import nn

import sparseq
from sparseq import dispatch
from sparseq import reference as ref
from sparseq.nn import Sparse24Linear
from sparseq.testing import assert_layer_close, check_layer_close


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 24, bias=False), nn.Linear(24, 16))
    return model.to(dtype)


def swapped(dtype=torch.float32):
    model = tiny_model(dtype)
    sparseq.swap(model, {"0": "2:4+w8a8", "2": "int8_weight_only", "3": "2:4"}, prune="magnitude")
    return model


def force_backends(monkeypatch, backends):
    """Make dispatch prefer ``backends`` on every device (a stand-in for a GPU table)."""
    monkeypatch.setattr(dispatch, "preferences", lambda *a: list(backends))


def test_compile_fullgraph_fresh_model_across_buckets(monkeypatch):
    """An unprepared CPU model compiles (the reference is traced: nothing is built while
    tracing) and equals the reference path run eagerly."""
    model = swapped()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fakes + one graph
    for m in (1, 5, 9, 33, 300):  # several M buckets, static then dynamic shapes
        x = torch.randn(m, 64)
        y = compiled(x)
        with monkeypatch.context() as patch:
            force_backends(patch, ["reference"])
            eager = copy.deepcopy(model)
            eager.apply(lambda mod: mod.reset() if isinstance(mod, sparseq.nn.CompressedLinear) else None)
            assert torch.equal(y, eager(x))


@pytest.mark.parametrize("prepared", [False, True], ids=["fresh", "prepared"])
def test_compile_inductor_cpu(prepared, exact_cpu_numerics):
    """Compiled equals eager: fresh (the traced reference) within the formats' bounds; prepared
    (the CPU fast path: dense copies, oneDNN int8) the same kernels, so closely."""
    model = swapped()
    x = torch.randn(2, 3, 64)
    if prepared:
        sparseq.nn.prepare(model)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_threads_share_one_model(race):
    model = swapped()
    inputs = [torch.randn(i * 37 % 300 + 1, 64) for i in range(8)]  # several buckets
    expected = [model(x) for x in inputs]
    fresh = copy.deepcopy(model)  # caches empty: threads race on the first resolution
    results = {}

    def work(i):
        for _ in range(5):
            results[i] = fresh(inputs[i])

    errors = race(work, 8)
    assert not errors
    assert all(torch.equal(results[i], expected[i]) for i in range(8))


def test_prepare_resolves_every_bucket(exact_cpu_numerics):
    model = swapped()
    chosen = sparseq.nn.prepare(model)
    assert set(chosen) == {"0", "2", "3"}
    # CPU: 2:4 runs a dense copy (x86 has no sparse instructions), so does int8 weight-only at
    # 64x64 (sparseq's cpu_woq kernel starts at N*K = 2**16), W8A8 oneDNN
    assert chosen["3"] == {b: "dense" for b in dispatch.BUCKET_NAMES}
    assert chosen["2"] == {b: "dense" for b in dispatch.BUCKET_NAMES}
    from sparseq import cpu_ops

    fast = "dense" if cpu_ops.unavailable_reason() else "onednn"  # a small layer: dense at M = 1
    assert chosen["0"] == {b: "dense" if b == "1" else fast for b in dispatch.BUCKET_NAMES}
    assert len(model[3].backends) == len(dispatch.BUCKET_NAMES)


def _dense_linear(layer):
    """An ``nn.Linear`` built here from the layer's buffers: the decompressed, dequantized
    weight in fp32 (divided by the SmoothQuant factors, as the dense copy is) and the bias."""
    buffers = dict(layer.named_buffers())
    w = buffers["weight_q"] if "weight_q" in buffers else ref.decompress_24(buffers["values"], buffers["meta"])
    w = w.float()
    if "w_scale" in buffers:
        w = w * buffers["w_scale"][:, None]
    if buffers.get("smooth") is not None:
        w = w / buffers["smooth"][None, :]
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(w)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


@pytest.mark.parametrize("numerics", ["exact", "fast"])
@pytest.mark.parametrize("fmt", sorted(sparseq.nn.FORMATS))
def test_dense_fallback_is_the_dense_linear(monkeypatch, fmt, numerics):
    force_backends(monkeypatch, ["dense", "reference"])
    monkeypatch.setattr(sparseq.dispatch, "_numerics", numerics)
    lin = nn.Linear(16, 8)
    layer = sparseq.nn.make_layer(lin, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
    x = torch.randn(3, 16)
    y = layer(x)
    assert set(layer.backends.values()) == {"dense"}
    if fmt.endswith("w8a8") and numerics == "fast":  # CPU, fast: the dense GEMM without quantizing
        assert torch.equal(y, _dense_linear(layer)(x))
    elif fmt.endswith("w8a8"):  # the format quantizes activations in every bucket, the dense one too
        xq, xs = ref.quantize_per_token(x)  # no smoothing here: the weight is q * s as built above
        assert torch.equal(y, _dense_linear(layer)(xq.float() * xs[:, None]))
    else:
        assert torch.equal(y, _dense_linear(layer)(x))  # same fp32 weight, same F.linear
    if fmt == "2:4":  # lossless: the dense copy is the original Linear, pruned by magnitude
        pruned = copy.deepcopy(lin)
        with torch.no_grad():
            pruned.weight.mul_(ref.prune_24(pruned.weight))
        assert torch.equal(y, pruned(x))


def test_dense_fallback_can_be_switched_off(monkeypatch):
    force_backends(monkeypatch, ["dense", "reference"])
    x = torch.randn(3, 16)
    off = Sparse24Linear.from_linear(nn.Linear(16, 8), prune="magnitude", dense_fallback=False)
    off(x)
    assert set(off.backends.values()) == {"reference"} and not off._derived
    assert "dense_fallback=False" in repr(off)
    report = sparseq.swap(nn.Sequential(nn.Linear(16, 8)), "w8a8", dense_fallback=False)
    assert report.rows[0].format == "w8a8"


def test_load_state_dict_drops_stale_dense_copy(monkeypatch):
    force_backends(monkeypatch, ["dense", "reference"])
    a = Sparse24Linear.from_linear(nn.Linear(16, 8), prune="magnitude")
    b = Sparse24Linear.from_linear(nn.Linear(16, 8), prune="magnitude")
    x = torch.randn(2, 16)
    a(x)  # builds a's dense copy
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


def test_cast_keeps_scales_fp32():
    model = swapped().to(torch.float16)
    layer = model[0]
    assert layer.dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert layer.w_scale.dtype == torch.float32 and layer.values.dtype == torch.int8
    x = torch.randn(4, 64, dtype=torch.float16)
    y = model(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    model.float()
    assert model[3].dtype == torch.float32 and model[3].values.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype must be float32"):
        Sparse24Linear(16, 8, dtype=torch.int8)


def test_gradients_reach_the_input():
    layer = sparseq.Int8Linear.from_linear(nn.Linear(32, 16), smooth=torch.rand(32) + 0.5)
    x = torch.randn(5, 32, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 16) @ layer.dense_weight())
    assert not any(b.requires_grad for b in layer.buffers())


def test_compiled_training_step_matches_eager():
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    sparseq.swap(model, {"2": "int8_weight_only"})
    x = torch.randn(4, 64)
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    compiled_grad = model[0].weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(compiled_grad, model[0].weight.grad)


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_graph_capture_matches_eager():
    model = swapped(torch.float16).cuda()  # moving to the GPU resolves kernels (prepare)
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    model(x)  # warm-up: kernels compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, model(x))


@pytest.mark.gpu
def test_cuda_compile_fullgraph_matches_eager():
    model = swapped(torch.bfloat16).cuda()
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 16, 300):
        x = torch.randn(m, 64, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), model(x), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_dispatch_follows_tuned_table(tmp_path, monkeypatch):
    import json

    lin = nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    cap = torch.cuda.get_device_capability()
    key = dispatch.tuned_key("sparse24_mm", 128, 256, torch.bfloat16, cap)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({key: {name: "dense" for name in dispatch.BUCKET_NAMES[1:]} | {"1": "triton"}}))
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    dispatch.reload_tables()
    try:
        layer = Sparse24Linear.from_linear(lin, prune="magnitude")
        chosen = layer.prepare()
        assert all(chosen[b] == "dense" for b in dispatch.BUCKET_NAMES[1:])
        assert chosen["1"] in ("triton", "dense", "reference")
        x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
        y = layer(x)
        pruned = copy.deepcopy(lin)  # the dense layer it replaces, built here
        with torch.no_grad():
            pruned.weight.mul_(ref.prune_24(pruned.weight))
        torch.testing.assert_close(y, pruned(x))
        assert_layer_close(copy.deepcopy(layer).cpu(), x.cpu(), out=y.cpu())
    finally:
        dispatch.reload_tables()


@pytest.mark.gpu
def test_cuda_load_prepares_kernels(tmp_path):
    model = swapped(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    sparseq.save(model, tmp_path)
    loaded = sparseq.load(tiny_model(torch.bfloat16), tmp_path, device="cuda")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, sparseq.nn.CompressedLinear)}
    assert set(layers) == {"0", "2", "3"}
    assert all(len(m.backends) == len(dispatch.BUCKET_NAMES) for m in layers.values())
    for name, m in layers.items():  # the loaded buffers are the saved ones
        saved = model.get_submodule(name).state_dict()
        assert all(torch.equal(t.cpu(), saved[k]) for k, t in m.state_dict().items())
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
             for name, m in layers.items()]
    with torch.no_grad():
        loaded(x.cuda())
    for h in hooks:
        h.remove()
    bucket = dispatch.BUCKET_NAMES[dispatch.bucket_of(5)]
    for name, (inp, out) in seen.items():  # each layer on the GPU against the dense layer it replaces
        cpu_layer = model.get_submodule(name)
        backend = layers[name].prepare()[bucket]
        msg = check_layer_close(cpu_layer, inp.cpu(), out=out.cpu(), dense_fallback=backend == "dense")
        assert msg is None, (name, backend, msg)
