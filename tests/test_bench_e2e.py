"""``benchmarks/bench_e2e.py`` runs every recipe and checks its output against the dense model.

The dense reference is the model with each sparseq layer replaced by the dense layer it stands
for (2:4 recipes: the pruned weights). A wrong layer (one tile off, a dropped bias) must turn
the recipe's rows into failures, through the per-layer checks and through the end-to-end
comparison alone; a recipe that fails is a benchmark failure unless it is listed as
unsupported on the device, with a reason.
"""

import pytest
import torch
import torch.nn.functional as F

from sparseq import benchmarks as bm
from sparseq import ops
from sparseq.nn.base import CompressedLinear



@pytest.fixture(scope="module")
def be(load_benchmark):
    return load_benchmark("bench_e2e", "_sparseq_bench_e2e_checks")


def _run(be, tmp_path, *args):
    code = be.main(["--smoke", "--out", str(tmp_path), *args])
    return code, bm.read_csv(tmp_path / "e2e_smoke.csv")


def _tile_off(fn, factor=1.01):
    """``fn`` with rows 0-15, columns 32-63 of its output scaled by ``factor`` (one wrong tile)."""

    def wrong(*args, **kwargs):
        y = fn(*args, **kwargs).clone()
        y[:16, 32:64] *= factor
        return y

    return wrong


def _failed(rows, recipe):
    mine = [r for r in rows if r["format"] == recipe]
    assert mine
    return all(r["time_us"].startswith(bm.ERROR_PREFIX) and "wrong result" in r["time_us"] for r in mine)


def test_dense_reference_of_a_24_recipe_is_the_pruned_model(be):
    cfg = be.SMOKE_LLAMA
    dense = be.build_llama(cfg, torch.device("cpu"), torch.float32)
    model = be.apply_recipe(be.build_llama(cfg, torch.device("cpu"), torch.float32), "2:4", "layers")
    layer = model.layers[0].attention.wqkv
    assert isinstance(layer, CompressedLinear)
    x = torch.randn(3, cfg.dim)
    with be.dense_reference(model) as n:
        assert n == 5 * cfg.n_layers  # wqkv, wo, w1, w3, w2 per block
        stand_in = model.layers[0].attention.wqkv
        assert not isinstance(stand_in, CompressedLinear)
        y = stand_in(x)
    assert isinstance(model.layers[0].attention.wqkv, CompressedLinear)  # put back
    pruned = layer.dense_weight()
    assert bool((pruned.reshape(pruned.shape[0], -1, 4) != 0).sum(-1).le(2).all())
    torch.testing.assert_close(y, F.linear(x, pruned), rtol=0, atol=1e-6)
    assert not torch.allclose(y, F.linear(x, dense.layers[0].attention.wqkv.weight), atol=1e-3)


def _reference_path(monkeypatch):
    """Layers run the reference ops (on CPU dispatch would pick dense copies / oneDNN)."""
    from sparseq import dispatch

    monkeypatch.setattr(dispatch, "preferences", lambda *a: ["reference"])


def test_wrong_tile_in_a_24_layer_fails_the_recipe(be, tmp_path, monkeypatch):
    _reference_path(monkeypatch)  # the faults below are put into the reference ops
    monkeypatch.setattr(ops, "sparse24_mm", _tile_off(ops.sparse24_mm))
    code, rows = _run(be, tmp_path, "--skip-minilm", "--recipes", "2:4")
    assert code == 1
    assert _failed(rows, "2:4")
    assert any("layers.0.attention.wqkv" in r["time_us"] for r in rows if r["format"] == "2:4")
    assert all(not r["time_us"].startswith(bm.ERROR_PREFIX) for r in rows if r["format"] == "dense")


def test_wrong_tile_in_a_w8a8_layer_fails_the_recipe(be, tmp_path, monkeypatch):
    _reference_path(monkeypatch)  # the faults below are put into the reference ops
    monkeypatch.setattr(ops, "int8_mm", _tile_off(ops.int8_mm))
    code, rows = _run(be, tmp_path, "--skip-minilm", "--recipes", "w8a8")
    assert code == 1 and _failed(rows, "w8a8")


def test_dropped_bias_fails_the_recipe(be, tmp_path, monkeypatch):
    _reference_path(monkeypatch)  # the faults below are put into the reference ops
    real = ops.int8_weight_only_mm
    monkeypatch.setattr(ops, "int8_weight_only_mm", lambda x, wq, s, bias=None: real(x, wq, s, None))
    code, rows = _run(be, tmp_path, "--skip-llama", "--recipes", "int8_weight_only")
    assert code == 1 and _failed(rows, "int8_weight_only")


@pytest.mark.parametrize("fault", ["tile", "bias", "w8a8 bias"])
def test_end_to_end_comparison_alone_catches_a_wrong_layer(be, tmp_path, monkeypatch, fault):
    """With the per-layer checks off, the comparison of the outputs still fails the recipe."""
    _reference_path(monkeypatch)  # the faults below are put into the reference ops
    monkeypatch.setattr(be, "LAYER_CHECKS", False)
    recipe = "w8a8" if fault == "w8a8 bias" else "2:4"
    if fault == "tile":
        monkeypatch.setattr(ops, "sparse24_mm", _tile_off(ops.sparse24_mm))
        code, rows = _run(be, tmp_path, "--skip-minilm", "--recipes", recipe)
    elif fault == "bias":
        real = ops.sparse24_mm
        monkeypatch.setattr(ops, "sparse24_mm", lambda x, v, m, bias=None: real(x, v, m, None))
        code, rows = _run(be, tmp_path, "--skip-llama", "--recipes", recipe)
    else:
        real8 = ops.int8_mm
        monkeypatch.setattr(ops, "int8_mm", lambda xq, wq, xs, ws, bias=None, dt=None: real8(xq, wq, xs, ws, None, dt))
        code, rows = _run(be, tmp_path, "--skip-llama", "--recipes", recipe)
    assert code == 1 and _failed(rows, recipe)
    assert all("dense reference" in r["time_us"] for r in rows if r["format"] == recipe)


def test_a_failing_recipe_is_a_failure_unless_listed_unsupported(be, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(be, "apply_recipe", boom)
    code, rows = _run(be, tmp_path, "--skip-minilm", "--recipes", "2:4")
    assert code == 1 and all("no kernel here" in r["time_us"] for r in rows if r["format"] == "2:4")
    monkeypatch.setitem(be.UNSUPPORTED, ("2:4", "cpu"), "no 2:4 kernel on this device")
    code, rows = _run(be, tmp_path, "--skip-minilm", "--recipes", "2:4")
    assert code == 0
    mine = [r for r in rows if r["format"] == "2:4"]
    assert mine and all(r["time_us"].startswith(bm.ERROR_PREFIX + "unsupported on cpu: no 2:4 kernel") for r in mine)


def test_end_to_end_bound_grows_with_depth_and_allows_w8a8_rounding(be):
    b = be.e2e_bound
    assert b(torch.float32, 8, "2:4") == pytest.approx(be.E2E_ULPS * torch.finfo(torch.float32).eps * 8)
    assert b(torch.bfloat16, 8, "2:4") > b(torch.float16, 8, "2:4") > b(torch.float32, 8, "2:4")
    assert b(torch.float32, 16, "2:4") == pytest.approx(2 * b(torch.float32, 8, "2:4"))
    assert b(torch.float32, 8, "w8a8") > b(torch.float32, 8, "int8_weight_only")
