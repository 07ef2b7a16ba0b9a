"""GPU-path behaviour checked on the CPU: public ops dispatch by device, signatures defined
once, fallbacks that say why, no per-call rebuilds, autocast, unchecked launches in layers."""
import os
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparseq
import sparseq.nn
from sparseq import cuda_ops, dispatch, ops, reference
from sparseq.nn import FORMATS, Sparse24Linear
from sparseq.nn.base import CompressedLinear
from sparseq.testing import assert_layer_close, check_layer_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs Triton kernels on the CPU (TRITON_INTERPRET=1)")


def _kwargs(fmt):
    return {"prune": "magnitude"} if fmt.startswith("2:4") else {}


def _force(monkeypatch, backends):
    monkeypatch.setattr(dispatch, "preferences", lambda *a, **k: list(backends))


# ----------------------------------------------------------------- item 12: one op per function


def test_public_ops_have_a_cuda_kernel_and_a_pinned_reference():
    for name in ops.REFERENCE_FUNCTIONS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseq::{name}", "CUDA"), name
        assert ops.schema_of(f"{name}_reference") == ops.schema_of(name)


def test_backend_schemas_come_from_the_public_op():
    sparseq.kernels.register() if hasattr(sparseq, "kernels") else __import__("sparseq.kernels").kernels.register()
    from sparseq.kernels import TRITON_OPS

    for triton_name in TRITON_OPS:
        name = triton_name[: -len("_triton")]
        assert ops.schema_of(triton_name) == ops.schema_of(name), triton_name
    assert ops.schema_of("sparse24_mm_cutlass") == ops.schema_of("sparse24_mm")
    assert ops.schema_of("sparse24_int8_mm_cutlass") == ops.schema_of("sparse24_int8_mm")


def test_api_functions_carry_the_reference_signature():
    import inspect

    assert inspect.signature(sparseq.sparse24_int8_mm) == inspect.signature(reference.sparse24_int8_mm)
    assert sparseq.int8_mm.__doc__ == reference.int8_mm.__doc__
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        sparseq.sparse24_mm(torch.randn(2, 8), [1.0], torch.zeros(4, 1, dtype=torch.uint8))


@needs_interpreter
def test_cuda_path_of_public_op_runs_the_triton_kernel(monkeypatch):
    """The public op's CUDA implementation (here called on CPU tensors under the interpreter)
    runs the Triton backend, and its result equals the reference's."""
    x = torch.randn(5, 64)
    values, meta = sparseq.prune_and_compress_24(torch.randn(32, 64))
    assert ops.backend_impl("sparse24_mm", "triton") is not None
    ran = []
    real = ops._backend_impls[("sparse24_mm", "triton")]
    monkeypatch.setitem(ops._backend_impls, ("sparse24_mm", "triton"), lambda *a: ran.append(1) or real(*a))
    out = ops._device_dispatch("sparse24_mm", reference.sparse24_mm)(x, values, meta, None)
    assert ran == [1]
    from sparseq.testing import assert_matmul_close

    assert_matmul_close(out, reference.sparse24_mm(x, values, meta), x, reference.decompress_24(values, meta))


# --------------------------------------------------------- item 10: failures are said, once


def test_broken_kernel_module_warns_with_its_cause(monkeypatch):
    pkg = types.ModuleType("broken_kernels")
    pkg.module_for = lambda name: "broken_kernels.mod"
    monkeypatch.setitem(sys.modules, "broken_kernels", pkg)
    monkeypatch.setattr(ops, "BACKEND_MODULES", {"broken": "broken_kernels"})
    monkeypatch.setattr(ops, "_unavailable", {})
    real_import = __import__("importlib").import_module

    def fake_import(name, *a):
        if name == "broken_kernels.mod":
            raise ImportError("cannot import name 'tl_missing' from 'triton.language'")
        return real_import(name, *a)

    monkeypatch.setattr(ops.importlib, "import_module", fake_import)
    with pytest.warns(RuntimeWarning, match="tl_missing"):
        assert ops.backend_impl("int8_mm", "broken") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.backend_impl("int8_mm", "broken") is None  # said once


def test_failed_prepare_on_gpu_is_warned(monkeypatch):
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")
    monkeypatch.setattr(layer, "_buffer_device", lambda: torch.device("cuda", 0))

    def boom(*a, **k):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(layer, "prepare", boom)
    with pytest.warns(RuntimeWarning, match="no kernel image is available"):
        layer._try_prepare()


# ------------------------------------------------- item 14: unsupported GPUs fall through


def test_backend_error_falls_through_to_the_next_backend(monkeypatch):
    _force(monkeypatch, ["cutlass", "reference"])
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")

    def unsupported(*a):
        raise RuntimeError("CUTLASS 2:4 kernels run on sm80-sm89 and sm90 GPUs, not sm120")

    monkeypatch.setattr(cuda_ops, "supported_arch", lambda device=None: None)
    real = layer.backend_impl
    monkeypatch.setattr(layer, "backend_impl", lambda b, *a: unsupported() if b == "cutlass" else real(b, *a))
    x = torch.randn(3, 64)
    with pytest.warns(RuntimeWarning, match="not sm120"):
        y = layer(x)
    assert set(layer.backends.values()) == {"reference"}
    assert_layer_close(layer, x, y)


def test_cutlass_is_skipped_on_unsupported_architectures(monkeypatch):
    from sparseq.nn import layers

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    monkeypatch.setattr(dispatch, "cutlass_op", lambda op: pytest.fail("must not look up the op"))
    layer = Sparse24Linear.from_linear(nn.Linear(256, 128, dtype=torch.bfloat16), prune="magnitude")
    assert layers._cutlass_ready(layer, "sparse24_mm", torch.bfloat16, torch.device("cuda", 0)) is None
    assert cuda_ops.supported_arch() is None
    with pytest.raises(RuntimeError, match="not sm120"):
        cuda_ops.cutlass_arch()


def test_gpu_last_resort_is_dense_even_without_dense_fallback(monkeypatch):
    """dense_fallback=False on a GPU where no kernel runs the layer: the dense copy, with a
    warning naming why, never the host-syncing reference."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv(dispatch.CACHE_ENV, "/nonexistent/tuned.json")
    dispatch.reload_tables()
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude", dense_fallback=False)
    monkeypatch.setattr(layer, "backend_impl", lambda *a: None)
    built = []
    monkeypatch.setattr(layer, "_dense_impl", lambda device, dtype: built.append((device, dtype)) or (lambda x: x))
    with pytest.warns(RuntimeWarning, match="despite dense_fallback=False"):
        backend, _ = layer._pick((torch.device("cuda", 0), 0, torch.float32))
    assert backend == "dense" and built == [(torch.device("cuda", 0), torch.float32)]
    dispatch.reload_tables()


# ------------------------------------------------------ item 13: sync-free GPU quantization


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_sync_free_quantizer_equals_the_reference(static, smooth):
    lin = nn.Linear(64, 32)
    s = torch.rand(64) + 0.5 if smooth else None
    layer = sparseq.nn.Int8Linear.from_linear(lin, smooth=s, act_amax=2.5 if static else None)
    x = torch.randn(9, 64) * 2
    q, xs = layer._quantizer("torch")(x)
    want_q, want_s = layer._quantizer("reference")(x)
    assert xs.shape == (9,)  # per row, a static scale too (so a non-finite row can be flagged)
    assert torch.equal(q, want_q) and torch.equal(xs, want_s.expand(9))
    x[3, 5] = float("nan")
    x[6, 0] = float("inf")
    _, xs = layer._quantizer("torch")(x)
    assert [i for i in range(9) if not torch.isfinite(xs[i])] == [3, 6]


# --------------------------------------------- items 15, 16, 17: built once, not per call


def test_load_state_dict_prepares_again_on_gpu(monkeypatch):
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")
    other = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")
    calls = []
    monkeypatch.setattr(layer, "_buffer_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(layer, "prepare", lambda *a, **k: calls.append(1))
    layer._impls[(torch.device("cpu"), 0, torch.float32)] = lambda x: x
    layer.load_state_dict(other.state_dict())
    assert calls == [1] and not layer._impls


def test_backward_builds_the_dense_weight_once(monkeypatch):
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")
    calls = []
    real = layer.dense_weight
    monkeypatch.setattr(layer, "dense_weight", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        x = torch.randn(4, 64, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.ones(4, 32) @ real(), rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_cast_copies_are_built_once():
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32, dtype=torch.bfloat16), prune="magnitude")
    cpu = torch.device("cpu")
    b1 = layer.cast("bias", torch.float32, cpu)
    assert b1 is layer.cast("bias", torch.float32, cpu) and b1.dtype == torch.float32
    assert layer.cast("bias", torch.bfloat16, cpu) is layer.bias
    assert torch.equal(b1, layer.bias.float())


def test_static_scale_rows_are_a_view_of_one_buffer():
    layer = sparseq.nn.Sparse24Int8Linear.from_linear(nn.Linear(256, 128), prune="magnitude", act_amax=3.0)
    cpu = torch.device("cpu")
    a, b = layer._static_scale_rows(cpu, 7), layer._static_scale_rows(cpu, 300)
    assert a.data_ptr() == b.data_ptr() and a.is_contiguous() and a.shape == (7,)
    assert torch.equal(b, layer.x_scale.expand(300))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_split_k_needs_no_zeroed_workspace(monkeypatch, dtype):
    """Each split writes its whole slice: a workspace full of garbage gives the same answer
    (the old atomics needed a zeroing launch per call), and two runs agree bit for bit."""
    from sparseq.kernels import _common, int8_mm, int8_weight_only_mm
    from sparseq.kernels.configs import MatmulConfig

    real = _common.splitk_workspace
    monkeypatch.setattr(int8_mm, "splitk_workspace", lambda *a: real(*a).fill_(77))
    monkeypatch.setattr(int8_weight_only_mm, "splitk_workspace", lambda *a: real(*a).fill_(77))
    cfg = MatmulConfig(16, 32, 32, SPLIT_K=3)
    wq, ws = reference.quantize_per_channel(torch.randn(40, 96))
    bias = torch.randn(40)
    if dtype == torch.int8:
        xq, xs = reference.quantize_per_token(torch.randn(5, 96))
        run = lambda: int8_mm.int8_mm(xq, wq, xs, ws, bias, torch.float32, config=cfg)  # noqa: E731
        want = reference.int8_mm(xq, wq, xs, ws, bias, torch.float32)
        assert torch.equal(run(), want)
    else:
        x = torch.randn(5, 96)
        run = lambda: int8_weight_only_mm.int8_weight_only_mm(x, wq, ws, bias, config=cfg)  # noqa: E731
        from sparseq.testing import assert_matmul_close

        assert_matmul_close(run(), reference.int8_weight_only_mm(x, wq, ws, bias), x, wq, None, ws, bias)
    assert torch.equal(run(), run())


# ---------------------------------------------------------------------------- item 18: autocast


@pytest.mark.parametrize("fmt", FORMATS)
def test_layers_follow_autocast_like_nn_linear(fmt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    sparseq.swap(model, fmt, filter=lambda name, m: name == "1", **_kwargs(fmt))
    layer = model[1]
    assert isinstance(layer, CompressedLinear) and layer.dtype == torch.float32
    x = torch.randn(6, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        assert h.dtype == torch.bfloat16
        y = layer(h)
    assert y.dtype == torch.bfloat16
    # autocast computes with the weight rounded to bf16 (as nn.Linear does): for float 2:4
    # values that is the bf16 copy of the layer; int8 weights and fp32 scales are exact in it
    import copy

    dense = any(b == "dense" for (_, bk, dt), b in layer.backends.items() if dt == torch.bfloat16)
    assert_layer_close(copy.deepcopy(layer).to(torch.bfloat16) if fmt == "2:4" else layer, h, y, dense_fallback=dense)


def test_float_24_layer_still_rejects_a_mismatched_dtype_without_autocast():
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")
    with pytest.raises(TypeError, match="must match the layer dtype"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))


# ------------------------------------------------------ item 19: eager layers skip the checks


@needs_interpreter
@pytest.mark.parametrize("fmt", FORMATS)
def test_eager_layers_launch_kernels_without_the_op_dispatch(monkeypatch, fmt):
    """On a kernel backend a layer calls the unchecked launcher in eager mode (not the checked
    op), and the answer is still within the format's bound of the dense layer."""
    _force(monkeypatch, ["triton", "reference"])
    sparseq.kernels.register() if hasattr(sparseq, "kernels") else __import__("sparseq.kernels").kernels.register()
    launched, checked = [], []
    for (name, backend), fn in list(ops._launchers.items()):
        if backend == "triton":
            monkeypatch.setitem(ops._launchers, (name, backend), lambda *a, fn=fn, n=name: launched.append(n) or fn(*a))
    for (name, backend), fn in list(ops._backend_impls.items()):
        if backend == "triton":
            monkeypatch.setitem(ops._backend_impls, (name, backend), lambda *a, fn=fn, n=name: checked.append(n) or fn(*a))
    layer = sparseq.nn.make_layer(nn.Linear(64, 48), fmt, **_kwargs(fmt))
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
    assert set(layer.backends.values()) == {"triton"}
    assert launched and not checked
    assert check_layer_close(layer, x, y) is None


def test_config_pick_is_memoized():
    from sparseq.kernels import configs

    a = configs.pick("sparse24", 1, 4096, 4096)
    assert configs.pick("sparse24", 1, 4096, 4096) is a
    t = configs.table("sparse24")
    t[1] = None  # a caller's copy: the shared table is untouched
    assert configs.table("sparse24")[1] is not None


# --------------------------------------------------------- item 3: tune checks before timing


def test_tune_never_chooses_a_fast_wrong_kernel(monkeypatch):
    from sparseq import tune

    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")
    right = layer.backend_impl("reference", 4, torch.float32, torch.device("cpu"))
    impls = {"fast_wrong": lambda x: right(x) - layer.bias, "slow_right": right}
    monkeypatch.setattr(layer, "backend_impl", lambda b, *a: impls[b])
    times = {"fast_wrong": 1.0, "slow_right": 5.0}
    timed = []
    best, us, rejected = tune.choose_backend(layer, torch.randn(4, 64), dense_us=10.0,
                                             backends=("fast_wrong", "slow_right"),
                                             time_us=lambda fn, x: timed.append(fn) or times[
                                                 "fast_wrong" if fn is impls["fast_wrong"] else "slow_right"])
    assert best == "slow_right" and us == 5.0
    assert "wrong output" in rejected["fast_wrong"] and timed == [impls["slow_right"]]


def test_dense_fallback_matches_an_independent_linear(monkeypatch):
    _force(monkeypatch, ["dense"])
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32), prune="magnitude")
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(reference.decompress_24(layer.values, layer.meta))
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, dense.weight, dense.bias))
