"""sparseq.compress algorithms on small synthetic layers with known answers."""
import pytest
import torch

from sparseq import reference
from sparseq.compress.pruning import Sparsity, parse_sparsity, prune, prune_magnitude, prune_sparsegpt, prune_wanda
from sparseq.compress.recipe import parse_format, resolve
from sparseq.compress.simulated import SimulatedLinear
from sparseq.compress.smoothquant import (
    fake_quant_per_channel,
    fake_quant_per_tensor,
    fake_quant_per_token,
    search_alpha,
    smooth_factors,
    static_amax,
    w8a8_output,
)


def correlated_inputs(m=2048, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    x = base @ mix + 0.1 * torch.randn(m, k, generator=g)
    return x * torch.linspace(0.2, 3.0, k)  # uneven feature scales (Wanda's case)


def rel_err(x, w, w2):
    return float(((x @ w2.T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4", "50%", "0.7"])
def test_sparsegpt_beats_wanda_beats_magnitude(spec):
    x = correlated_inputs()
    w = torch.randn(32, 64)
    sp = parse_sparsity(spec)
    h = x.T @ x / x.shape[0]
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned, keep = prune(w, sp, method, hessian=h, x_norm=x.norm(dim=0))
        assert torch.equal(pruned != 0, keep & (pruned != 0))
        assert float((pruned == 0).float().mean()) >= sp.zero_fraction - 1e-6
        errs[method] = rel_err(x, w, pruned)
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_2_4_masks_follow_the_reference():
    w = torch.randn(16, 32)
    pruned, keep = prune_magnitude(w, Sparsity(2, 4))
    assert torch.equal(keep, reference.prune_24(w))
    norms = torch.rand(32) + 0.1
    _, keep_w = prune_wanda(w, Sparsity(2, 4), norms)
    assert torch.equal(keep_w, reference.prune_24(w, w.abs() * norms))
    x = correlated_inputs(k=32)
    sg, keep_s = prune_sparsegpt(w, Sparsity(2, 4), x.T @ x, blocksize=16)
    assert reference.is_24_sparse(sg) and int(keep_s.sum()) == w.numel() // 2


def test_nm_and_unstructured_counts():
    w = torch.randn(8, 64)
    _, keep = prune_magnitude(w, parse_sparsity("4:8"))
    assert (keep.reshape(8, 8, 8).sum(-1) == 4).all()
    _, keep = prune_magnitude(w, parse_sparsity("25%"))
    assert (keep.sum(1) == 48).all()


def test_bad_sparsity_and_formats_raise():
    for bad in ("4:2", "0:4", "120%", "abc"):
        with pytest.raises(ValueError):
            parse_sparsity(bad)
    for bad in ("2:4+w8a8+int8_weight_only", "2:4+4:8", "fp4"):
        with pytest.raises(ValueError):
            parse_format(bad)
    with pytest.raises(ValueError, match="multiple of M"):
        prune_magnitude(torch.randn(4, 6), Sparsity(2, 4))
    with pytest.raises(ValueError, match="Hessian"):
        prune(torch.randn(4, 8), Sparsity(2, 4), "sparsegpt")


def test_recipe_patterns():
    fmts = resolve({"*.query": "2:4+w8a8", "*.dense": "w8a8"}, ["a.query", "b.dense", "c.key"])
    assert [f.name for f in fmts.values()] == ["2:4+w8a8", "w8a8", "dense"]
    assert parse_format("2:4+int8").name == "2:4+int8_weight_only"
    assert parse_format("2:4+w8a8").runs_on_kernels and not parse_format("4:8").runs_on_kernels


def test_smoothquant_is_exact_in_float():
    x = torch.randn(17, 64, dtype=torch.float64) * torch.logspace(-1, 2, 64, dtype=torch.float64)
    w = torch.randn(24, 64, dtype=torch.float64)
    s = smooth_factors(x.abs().amax(0).float(), w.float(), 0.5).double()
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-10)


def test_fake_quant_matches_the_reference_bit_for_bit():
    x = torch.randn(13, 64) * 3
    x[0] = 0  # all-zero token: scale 1.0
    w = torch.randn(24, 64)
    s = torch.rand(64) + 0.5
    q, sx = reference.quantize_per_token(x, s)
    assert torch.equal(fake_quant_per_token(x, s), q.float() * sx[:, None])
    qw, sw = reference.quantize_per_channel(w)
    assert torch.equal(fake_quant_per_channel(w), qw.float() * sw[:, None])


def test_simulated_w8a8_matches_reference_int8_mm():
    lin = torch.nn.Linear(64, 24)
    x = torch.randn(9, 64)
    s = torch.rand(64) + 0.5
    sim = SimulatedLinear(lin, "w8a8", smooth=s)
    xq, sx = reference.quantize_per_token(x, s)
    wq, sw = reference.quantize_per_channel(lin.weight.detach() * s)
    ref = reference.int8_mm(xq, wq, sx, sw, lin.bias.detach(), torch.float32)
    torch.testing.assert_close(sim(x), ref, rtol=1e-5, atol=1e-5)


def test_alpha_search_tames_activation_outliers():
    x = torch.randn(512, 64)
    x[:, 3] *= 60  # an outlier channel, as in transformer activations
    w = torch.randn(32, 64)
    alpha, s, err = search_alpha(x, w, x.abs().amax(0))
    base = float(((w8a8_output(x, w, None) - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert s is not None and 0 < alpha <= 1 and err < 0.5 * base


def test_static_fake_quant_matches_the_reference_and_saturates():
    x = torch.randn(13, 64) * 3
    s = torch.rand(64) + 0.5
    amax = static_amax(x[:8].abs().amax(0), s)  # calibrated on 8 rows: later rows may exceed it
    assert amax == pytest.approx(float((x[:8] / s).abs().max()))
    scale = reference.per_tensor_scale(amax)
    q = reference.quantize_per_tensor(x, scale, s)
    assert torch.equal(fake_quant_per_tensor(x, amax, s), q.float() * scale)
    assert float(fake_quant_per_tensor(x * 100, amax, s).abs().max()) == pytest.approx(127 * float(scale))


def test_simulated_static_w8a8_matches_reference_int8_mm():
    lin = torch.nn.Linear(64, 24)
    x = torch.randn(9, 64)
    s = torch.rand(64) + 0.5
    sim = SimulatedLinear(lin, "w8a8", smooth=s, act_amax=6.0)
    scale = reference.per_tensor_scale(6.0)
    xq = reference.quantize_per_tensor(x, scale, s)
    wq, sw = reference.quantize_per_channel(lin.weight.detach() * s)
    ref = reference.int8_mm(xq, wq, scale, sw, lin.bias.detach(), torch.float32)
    torch.testing.assert_close(sim(x), ref, rtol=1e-5, atol=1e-5)
    assert "activations=static" in repr(sim)
    with pytest.raises(ValueError, match="W8A8"):
        SimulatedLinear(lin, "2:4", act_amax=6.0)


def test_static_alpha_search_scores_with_static_scales():
    x = torch.randn(512, 64)
    x[:, 3] *= 60
    w = torch.randn(32, 64)
    alpha, s, err = search_alpha(x, w, x.abs().amax(0), static=True)
    ref = x @ w.T
    none = float(((w8a8_output(x, w, None, static_amax(x.abs().amax(0), None)) - ref) ** 2).sum() / (ref ** 2).sum())
    assert s is not None and err < 0.5 * none
    again = float(((w8a8_output(x, w, s, static_amax(x.abs().amax(0), s)) - ref) ** 2).sum() / (ref ** 2).sum())
    assert err == pytest.approx(again)
