"""fbgemm's int8 GEMM for W8A8 layers (``sparseq.cpu_fbgemm``): the ``packed_gemm`` form bit-identical
to the reference, the ``linear_dynamic`` form and the fast numerics' float-activation dense bucket
held to ``cpu_fbgemm.error_bound``; ``exact`` numerics bit-identical to the reference; the
dispatch choices of both modes."""
from __future__ import annotations

import gc

import pytest
import torch

import sparseq
from sparseq import cpu_fbgemm, cpu_kernels, cpu_ops, dispatch, reference, testing
from sparseq.nn import Int8Linear, Sparse24Int8Linear

# the backends these tests expect are the Xeon's tables (AMD's: test_dispatch.test_cpu_preferences_on_amd)
pytestmark = pytest.mark.usefixtures("xeon_tables")

needs_fbgemm = pytest.mark.skipif(bool(cpu_fbgemm.unavailable_reason()),
                                  reason=cpu_fbgemm.unavailable_reason() or "ok")
CPU = torch.device("cpu")
FORMS = [pytest.param(form, marks=pytest.mark.skipif(
    bool(cpu_fbgemm.packed_gemm_unavailable_reason()) if form == "packed_gemm" else False,
    reason=cpu_fbgemm.packed_gemm_unavailable_reason() or "ok")) for form in cpu_fbgemm.FORMS]
"""Both forms of the fbgemm GEMM, each where it runs (``packed_gemm`` needs VNNI and sparseq._C_cpu)."""


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes (1e-3 .. 1e2) with a few outliers: per-tensor
    quantization would fail these rows; per-token rounding must not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]
    x[:, :: max(1, k // 7)] *= 8.0
    return x


def _weight(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return reference.quantize_per_channel(torch.randn(n, k, generator=g) * 0.05)


def _ref(x, wq, ws, smooth, bias):
    xq, xs = reference.quantize_per_token(x, smooth)
    return reference.int8_mm(xq, wq, xs, ws, bias, torch.float32)


needs_packed_gemm = pytest.mark.skipif(bool(cpu_fbgemm.packed_gemm_unavailable_reason()),
                                       reason=cpu_fbgemm.packed_gemm_unavailable_reason() or "ok")
EXACT = not cpu_fbgemm.packed_gemm_unavailable_reason()
"""Whether fbgemm runs its exact form here (VNNI and sparseq._C_cpu)."""
EXACT_FORMS = [pytest.param(form, marks=pytest.mark.skipif(
    not (EXACT if form == "packed_gemm" else not cpu_fbgemm.unavailable_reason() and cpu_fbgemm.linear_dynamic_exact()),
    reason=f"fbgemm's {form} form does not run exactly here")) for form in cpu_fbgemm.FORMS]
"""Both forms, each where it runs exactly."""


@pytest.mark.parametrize("form", EXACT_FORMS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 48), (5, 96, 384), (16, 384, 384), (33, 130, 250), (64, 256, 1024),
                                   (3, 17, 1), (2, 9, 2), (300, 64, 128)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_forms_equal_the_reference_bit_for_bit(form, m, n, k, smooth, static, bias, dtype):
    """Per-token or static scales, SmoothQuant, bias, every activation dtype (the output in it);
    rows of magnitudes 1e-3 .. 1e2 (per-tensor rounding would fail them); K = 1 and 2."""
    x = _activations(m, k, seed=m + n).to(dtype)
    wq, ws = _weight(n, k, seed=k)
    s = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5 if smooth else None
    xs = reference.per_tensor_scale(20.0) if static else None
    b = torch.randn(n) if bias else None
    weight = cpu_fbgemm.PackedWeight(wq, ws, form=form)
    assert weight.exact
    y = cpu_fbgemm.run(x, weight, s, b, dtype, xs)
    xq, x_scale = (reference.quantize_per_token(x, s) if xs is None
                   else (reference.quantize_per_tensor(x, xs, s), xs))
    assert y.dtype == dtype
    assert torch.equal(y, reference.int8_mm(xq, wq, x_scale, ws, b, dtype))
    assert torch.equal(cpu_fbgemm.w8a8_impl(weight, s, b, xs)(x), y)  # a layer's call (its ops bound once)


@needs_packed_gemm
def test_packed_gemm_needs_its_range_columns():
    """Negative control: with the range columns zeroed, fbgemm's quantizer picks its scale from
    the integers' own range (not 1) and the product leaves the reference."""
    x = _activations(16, 384, seed=3)
    wq, ws = _weight(256, 384, seed=4)
    w = cpu_fbgemm.PackedWeight(wq, ws, form="packed_gemm")
    grid, scale = cpu_kernels.quantize_grid(x, None, None)
    want = cpu_kernels.epilogue(cpu_fbgemm._packed_gemm()(grid, w.shape_only, w.packed, w.col_offsets, 1.0, 0, w.zeros),
                                scale, w.w_scale, None)
    xq, xs = reference.quantize_per_token(x)
    assert torch.equal(want, reference.int8_mm(xq, wq, xs, ws, None, torch.float32))
    grid[:, -2:] = 0.0
    acc = cpu_fbgemm._packed_gemm()(grid, w.shape_only, w.packed, w.col_offsets, 1.0, 0, w.zeros)
    assert not torch.equal(cpu_kernels.epilogue(acc, scale, w.w_scale, None), want)


@needs_fbgemm
@pytest.mark.parametrize("m,n,k", [(1, 64, 48), (5, 96, 384), (16, 384, 384), (33, 130, 250), (64, 256, 1024)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_dynamic_within_its_bound_of_the_reference(m, n, k, smooth, bias):
    x = _activations(m, k, seed=m + n)
    wq, ws = _weight(n, k, seed=k)
    s = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5 if smooth else None
    b = torch.randn(n) if bias else None
    weight = cpu_fbgemm.PackedWeight(wq, ws, form="linear_dynamic", exact=False)
    assert not weight.exact
    y = cpu_fbgemm.run(x, weight, s, b, torch.float32)
    want = _ref(x, wq, ws, s, b)
    err = (y - want).abs()
    bound = cpu_fbgemm.error_bound(x, wq, ws, s, b)
    assert (err <= bound).all(), float((err / bound).max())
    assert err.max() > 0  # fbgemm really ran (it rounds otherwise than the reference)
    with pytest.raises(ValueError, match="dynamic activation scales only"):
        cpu_fbgemm.run(x, weight, s, b, torch.float32, reference.per_tensor_scale(3.0))


@needs_fbgemm
def test_the_bound_rejects_per_tensor_quantization():
    """Negative control: fbgemm on the raw activations (one scale for all rows, as
    quantize_dynamic does) breaks the bound on rows of small magnitude."""
    x = _activations(16, 384, seed=3)
    wq, ws = _weight(256, 384, seed=4)
    plain = torch.ops.quantized.linear_dynamic(x, cpu_fbgemm.prepack(wq, ws), cpu_fbgemm.reduce_range())
    bad = (plain - _ref(x, wq, ws, None, None)).abs() > cpu_fbgemm.error_bound(x, wq, ws, None, None)
    assert bad.any()


def test_packed_weight_forms():
    wq, ws = _weight(8, 16, seed=0)
    with pytest.raises(ValueError, match="form must be one of"):
        cpu_fbgemm.PackedWeight(wq, ws, form="onednn")
    if not cpu_fbgemm.unavailable_reason():
        with pytest.raises(ValueError, match="always exact"):
            cpu_fbgemm.PackedWeight(wq, ws, form="packed_gemm", exact=False, checked=False)
        assert cpu_fbgemm.PackedWeight(wq, ws, form="linear_dynamic").exact == cpu_fbgemm.linear_dynamic_exact()
        if not cpu_fbgemm.linear_dynamic_exact():
            with pytest.raises(ValueError, match="runs exactly only"):
                cpu_fbgemm.PackedWeight(wq, ws, form="linear_dynamic", exact=True)
    assert cpu_fbgemm.default_form() == ("linear_dynamic" if cpu_fbgemm.packed_gemm_unavailable_reason()
                                         else "packed_gemm")
    if cpu_fbgemm.packed_gemm_unavailable_reason():
        with pytest.raises(RuntimeError, match="does not run here"):
            cpu_fbgemm.PackedWeight(wq, ws, form="packed_gemm")
    else:
        w = cpu_fbgemm.PackedWeight(wq, ws)
        assert w.form == "packed_gemm" and w.exact
        assert w.shape_only.shape == (8, 16 + cpu_fbgemm.RANGE_COLUMNS) and w.shape_only.stride() == (0, 0)
        assert torch.equal(w.col_offsets, wq.sum(dim=1, dtype=torch.int32))


@needs_fbgemm
def test_no_deprecation_warning_reaches_the_user(tmp_path):
    """torch warns once that the packed GEMM is deprecated: the warning is consumed when the
    weight is packed, never shown (a fresh process, warnings as errors)."""
    import subprocess
    import sys

    code = ("import torch, sparseq\n"
            "from sparseq.nn import Int8Linear\n"
            "layer = Int8Linear.from_linear(torch.nn.Linear(1024, 2048))\n"
            "with torch.no_grad():\n"
            "    for m in (1, 4, 16):\n"
            "        layer(torch.randn(m, 1024))\n"
            "print(sorted(set(layer.backends.values())))\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fbgemm" in done.stdout


@needs_fbgemm
@pytest.mark.parametrize("form,exact", [pytest.param("packed_gemm", None, marks=needs_packed_gemm),
                                        ("linear_dynamic", None), ("linear_dynamic", False)])
def test_non_finite_and_zero_rows(form, exact):
    x = _activations(6, 128, seed=5)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, 0] = -float("inf")
    x[4] = 0.0
    wq, ws = _weight(64, 128, seed=6)
    b = torch.randn(64)
    packed = cpu_fbgemm.PackedWeight(wq, ws, form=form, exact=exact)
    y = cpu_fbgemm.run(x, packed, None, b, torch.float32)  # fbgemm alone raises on NaN or gives garbage
    assert not torch.isfinite(y[1:4]).any(dim=1).any()  # whole rows non-finite
    assert torch.equal(y[4], b)
    ok = [0, 5]
    if packed.exact:
        assert torch.equal(y[ok], _ref(x[ok], wq, ws, None, b))
    else:
        assert ((y[ok] - _ref(x[ok], wq, ws, None, b)).abs() <= cpu_fbgemm.error_bound(x[ok], wq, ws, None, b)).all()
    for i in (1, 2, 3):  # one row alone (linear_dynamic's decode path hands a finite row to fbgemm as it is)
        assert not torch.isfinite(cpu_fbgemm.run(x[i:i + 1], packed, None, b, torch.float32)).any()
    assert torch.equal(cpu_fbgemm.run(x[4:5], packed, None, b, torch.float32)[0], b)


@needs_fbgemm
def test_prepack_restores_the_quantized_engine():
    engines = torch.backends.quantized.supported_engines
    other = "qnnpack" if "qnnpack" in engines else engines[0]
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = other
    try:
        cpu_fbgemm.prepack(*_weight(8, 16, seed=0))
        assert torch.backends.quantized.engine == other
    finally:
        torch.backends.quantized.engine = before


_FBGEMM_TO = (17 if not cpu_kernels.available() else 10 if cpu_fbgemm.default_form() == "packed_gemm" else 8)
"""From this M a 2048x1024 dynamic W8A8 layer runs oneDNN instead of fbgemm: fbgemm's packed GEMM
wins to M = 9 on it (the table's max_nk), linear_dynamic to M = 7; without sparseq._C_cpu the
torch-ops quantization makes fbgemm win to M = 16."""
_FBGEMM_2_16 = f"M<{_FBGEMM_TO}: fbgemm; M>={_FBGEMM_TO}: onednn" if _FBGEMM_TO < 17 else "fbgemm"
"""That layer's backend in the M bucket 2-16 (split at 8 and 10 with sparseq._C_cpu)."""


def _layers(k=1024, n=2048):
    lin = torch.nn.Linear(k, n)
    smooth = torch.rand(k) + 0.5
    return {
        "w8a8": Int8Linear.from_linear(lin),
        "w8a8-smooth": Int8Linear.from_linear(lin, smooth=smooth),
        "w8a8-static": Int8Linear.from_linear(lin, act_amax=3.0),
        "2:4+w8a8": Sparse24Int8Linear.from_linear(lin, prune="magnitude"),
    }


@needs_fbgemm
def test_fast_numerics_dispatch_and_bounds():
    with sparseq.cpu_numerics("fast"):
        for name, layer in _layers().items():
            for m in (1, 4, 16, 64, 256):
                xm = _activations(m, 1024, seed=m)
                with torch.no_grad():
                    y = layer(xm)
                backend = layer.backends[(CPU, dispatch.bucket_of(m), torch.float32)]
                # fbgemm's exact form takes static scales too; its approximate one declines them
                static = name.endswith("static") and not EXACT
                # 2048x1024: fbgemm below _FBGEMM_TO, the exact oneDNN path from there
                runs = "onednn" if static or m >= _FBGEMM_TO else "fbgemm"
                if m == 1 or m >= 17 or static:
                    assert backend == runs, (name, m, backend)
                else:
                    assert backend == _FBGEMM_2_16, (name, m)
                approximate = runs == "fbgemm" and not EXACT
                assert testing.is_approximate(layer, xm) == approximate, (name, m, backend)
                testing.assert_layer_close(layer, xm, y)
                if not approximate:
                    assert torch.equal(y, layer.backend_impl("reference", m, torch.float32, CPU)(xm))


@needs_fbgemm
def test_exact_numerics_equal_the_reference_op():
    layer = _layers()["w8a8-smooth"]
    x = _activations(16, 1024, seed=9)
    want = layer.backend_impl("reference", 16, torch.float32, CPU)(x)
    with sparseq.cpu_numerics("exact"), torch.no_grad():
        for m in (1, 8, 16):  # fbgemm's exact form where the fast table runs fbgemm, oneDNN after
            assert torch.equal(layer(x[:m]), want[:m])
            assert not testing.is_approximate(layer, x[:m])
        backends = dict(layer.backends)
    if EXACT:
        assert backends[(CPU, 0, torch.float32)] == "fbgemm"
        assert backends[(CPU, 1, torch.float32)] == _FBGEMM_2_16
    else:
        assert "fbgemm" not in backends[(CPU, 1, torch.float32)]
        assert backends[(CPU, 1, torch.float32)] == ("dense" if cpu_ops.unavailable_reason() else "onednn")


@needs_fbgemm
def test_switching_numerics_re_resolves_and_the_context_restores():
    layer = _layers()["w8a8"]
    x = torch.randn(4, 1024)
    assert sparseq.get_cpu_numerics() == "fast"
    with torch.no_grad():
        y_fast = layer(x)
        assert layer.backends[(CPU, 1, torch.float32)] == _FBGEMM_2_16
        assert testing.is_approximate(layer, x) == (not EXACT)
        with sparseq.cpu_numerics("exact"):
            assert layer.backends == {}  # forgotten on the switch
            y_exact = layer(x)
            assert (layer.backends[(CPU, 1, torch.float32)] == _FBGEMM_2_16) == EXACT
            assert not testing.is_approximate(layer, x)
        assert sparseq.get_cpu_numerics() == "fast"
        assert torch.equal(layer(x), y_fast)
    assert torch.equal(y_fast, y_exact) == EXACT  # the same exact fbgemm path, else two roundings
    with pytest.raises(ValueError, match="one of"):
        sparseq.set_cpu_numerics("quick")


@needs_fbgemm
def test_small_dynamic_layer_at_m1_runs_dense_without_quantizing():
    """Below N*K = 2**18 at M = 1 no int8 path beats the dense GEMV: the fast dense bucket
    multiplies the dequantized weight by the float activations (within the bound); a static
    scale keeps its quantization, bit-exact."""
    lin = torch.nn.Linear(384, 384)
    dyn, static = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, act_amax=2.0)
    x = torch.randn(1, 384) * 3
    with torch.no_grad():
        y = dyn(x)
        ys = static(x)
    assert dyn.backends[(CPU, 0, torch.float32)] == "dense"
    assert testing.is_approximate(dyn, x) and not testing.is_approximate(static, x)
    assert torch.allclose(y, torch.nn.functional.linear(x, dyn.dense_weight(), lin.bias.detach()), atol=1e-5)
    testing.assert_layer_close(dyn, x, y)
    assert static.backends[(CPU, 0, torch.float32)] == "dense"
    testing.assert_layer_close(static, x, ys, dense_fallback=True)  # the format's quantization, F.linear's sum
    # the static clamp is kept: an activation beyond 127 steps saturates, as the format says
    big = x.clone()
    big[0, 0] = 1e4
    with torch.no_grad():
        assert not torch.allclose(static(big), torch.nn.functional.linear(big, static.dense_weight(), lin.bias.detach()))


@needs_fbgemm
def test_bf16_layers_follow_the_bf16_table():
    small = Int8Linear.from_linear(torch.nn.Linear(384, 384)).to(torch.bfloat16)
    big = Int8Linear.from_linear(torch.nn.Linear(1024, 1024)).to(torch.bfloat16)
    if cpu_kernels.available() and cpu_fbgemm.default_form() == "packed_gemm":
        # fbgemm's packed GEMM beats AMX bf16 dense from 2**17 to M = 9 (with one thread to 16, and
        # on 1024x1024 with two); oneDNN's exact path from M = 17 on 1024x1024
        cases = ((small, 16, "M<10: fbgemm; M>=10: fbgemm (1 thread) / dense"), (small, 1, "fbgemm"),
                 (big, 1, "fbgemm"), (big, 16, "fbgemm"), (big, 64, "onednn"), (small, 64, "dense"))
    elif cpu_kernels.available():  # oneDNN's exact int8 GEMM beats AMX bf16 from 2**17 at M < 8 (one thread: to 64)
        cases = ((small, 16, "M<8: onednn; M>=8: onednn (1 thread) / dense"), (small, 1, "fbgemm"),
                 (big, 1, "fbgemm"), (big, 16, "onednn"), (small, 64, "dense"))
    else:
        cases = ((small, 16, "dense"), (small, 1, "dense"), (big, 1, "fbgemm"), (big, 16, "dense"))
    with torch.no_grad():
        for layer, m, want in cases:
            x = torch.randn(m, layer.in_features, dtype=torch.bfloat16)
            y = layer(x)
            assert layer.backends[(CPU, dispatch.bucket_of(m), torch.bfloat16)] == want, (layer, m)
            assert y.dtype == torch.bfloat16
            testing.assert_layer_close(layer, x, y)


@needs_fbgemm
def test_compiled_fast_layer_matches_eager():
    model = torch.nn.Sequential(_layers()["w8a8-smooth"]).eval()
    x = torch.randn(4, 1024)
    sparseq.nn.prepare(model)
    torch._dynamo.reset()  # a fresh recompile budget (the other compile tests share the forward code)
    try:
        with torch.no_grad():
            eager = model(x)
            compiled = torch.compile(model, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert model[0].backends[(CPU, 1, torch.float32)] == _FBGEMM_2_16
    assert testing.is_approximate(model[0], x) == (not EXACT)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)


@needs_fbgemm
@pytest.mark.parametrize("m", [1, 3])
def test_compiled_impl_equals_eager_for_one_row_and_more(m):
    """The traced op runs the same code as an eager call: a single row and a batch give the
    same bits compiled, a static scale too where the exact form runs."""
    wq, ws = _weight(96, 256, seed=11)
    impls = [cpu_fbgemm.w8a8_impl(cpu_fbgemm.PackedWeight(wq, ws), None, torch.randn(96))]
    if EXACT:
        impls.append(cpu_fbgemm.w8a8_impl(cpu_fbgemm.PackedWeight(wq, ws), None, None, reference.per_tensor_scale(2.0)))
    x = _activations(m, 256, seed=12)
    for impl in impls:
        torch._dynamo.reset()
        try:
            compiled = torch.compile(impl, fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
        assert torch.equal(compiled, impl(x))


@needs_fbgemm
def test_packed_weights_are_freed_with_the_layer():
    gc.collect()  # layers of earlier tests
    before = len(cpu_fbgemm._packs)
    layer = _layers()["w8a8"]
    with torch.no_grad():
        layer(torch.randn(1, 1024))
        layer(torch.randn(2, 1024))
    assert len(cpu_fbgemm._packs) == before + 1  # one pack per layer and device, shared by buckets
    del layer
    gc.collect()
    assert len(cpu_fbgemm._packs) == before


def test_env_sets_the_initial_numerics(monkeypatch):
    monkeypatch.setenv(dispatch.NUMERICS_ENV, "EXACT")
    assert dispatch._initial_numerics() == "exact"
    monkeypatch.setenv(dispatch.NUMERICS_ENV, "bogus")
    with pytest.warns(UserWarning, match="not one of"):
        assert dispatch._initial_numerics() == "fast"


@needs_fbgemm
def test_threads_and_thread_counts_give_the_same_outputs(race):
    """Concurrent callers on one fresh layer (racing on the first resolution and the pack) and
    1 vs 2 intra-op threads: fbgemm's int32 accumulation is exact, so the outputs are equal."""
    import copy

    base = _layers()["w8a8-smooth"]
    inputs = [_activations(m, 1024, seed=m) for m in (1, 3, 16, 40, 1, 16, 7, 64)]
    with torch.no_grad():
        expected = [base(x) for x in inputs]
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = [base(x) for x in inputs]
            torch.set_num_threads(2)
            double = [base(x) for x in inputs]
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(expected, single, double))
    fresh = copy.deepcopy(base)
    fresh.reset()
    results = {}

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = fresh(inputs[i])

    assert not race(work, len(inputs))
    assert all(torch.equal(results[i], expected[i]) for i in range(len(inputs)))
    assert "fbgemm" in set(fresh.backends.values())


@needs_fbgemm
def test_m1_backend_follows_the_thread_count():
    """768x384 at M = 1 (N*K between the one-thread and two-thread thresholds, 2**18 and 2**19
    with fbgemm's packed GEMM; 2**18 and 2**20 with linear_dynamic): fbgemm with one intra-op
    thread, the dense GEMV with more (at 2 threads a small weight fits the cores' L2 halves); the
    layer switches per call, both within the bound."""
    layer = Int8Linear.from_linear(torch.nn.Linear(384, 768))
    x = _activations(1, 384, seed=2)
    threads = torch.get_num_threads()
    with torch.no_grad():
        try:
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
        finally:
            torch.set_num_threads(threads)
    assert layer.backends[(CPU, 0, torch.float32)] == "fbgemm (1 thread) / dense"
    assert torch.equal(two, torch.nn.functional.linear(x, layer.dense_copy(CPU, torch.float32), layer.bias))
    assert not torch.equal(one, two)  # fbgemm quantized the activations, the fast dense bucket did not
    testing.assert_layer_close(layer, x, one)
    testing.assert_layer_close(layer, x, two)
    pref = dispatch.preferences("int8_mm", 768, 384, torch.float32, CPU, 1, one_thread=True)
    assert pref[0] == "fbgemm"
    assert dispatch.preferences("int8_mm", 768, 384, torch.float32, CPU, 1) == ["dense", "reference"]


@pytest.mark.skipif(cpu_fbgemm.unavailable_reason() != "" or not cpu_fbgemm.linear_dynamic_exact(),
                    reason="fbgemm's linear_dynamic form does not run exactly here")
def test_layer_on_the_exact_linear_dynamic_form(monkeypatch):
    """Where torch has dropped the packed GEMM, a VNNI CPU runs linear_dynamic exactly: a layer
    then takes fbgemm under the exact numerics and with a static scale, bit for bit."""
    monkeypatch.setattr(cpu_fbgemm, "default_form", lambda: "linear_dynamic")
    layers = _layers()
    x = _activations(4, 1024, seed=21)
    with sparseq.cpu_numerics("exact"), torch.no_grad():
        for name in ("w8a8-smooth", "w8a8-static"):
            layer = layers[name]
            y = layer(x)
            assert "fbgemm" in layer.backends[(CPU, 1, torch.float32)], name
            assert layer._derived["fbgemm_packed", CPU].form == "linear_dynamic"
            assert not testing.is_approximate(layer, x)
            assert torch.equal(y, layer.backend_impl("reference", 4, torch.float32, CPU)(x)), name
