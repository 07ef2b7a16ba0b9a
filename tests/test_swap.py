"""swap(): recipes, filter, report, unsupported shapes, torch.nn.utils.prune masks, MiniLM."""
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import sparseq
from sparseq import reference as ref
from sparseq.nn import Sparse24Linear


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 24, bias=False), nn.Linear(24, 10)).to(dtype)


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


def test_tied_and_attention_linears_stay_dense():
    emb = nn.Embedding(16, 32)
    head = nn.Linear(32, 16, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "attn": nn.MultiheadAttention(32, 2), "fc": nn.Linear(32, 32)})
    report = sparseq.swap(model, "w8a8")
    notes = {r.name: (r.format, r.note) for r in report.rows}
    assert notes["head"] == ("dense", "weight tied to 'emb' (swapping would untie it)")
    assert notes["attn.out_proj"][0] == "dense" and "MultiheadAttention" in notes["attn.out_proj"][1]
    assert notes["fc"][0] == "w8a8"
    x = torch.randn(3, 1, 32)
    assert model["attn"](x, x, x)[0].shape == (3, 1, 32)


def test_swap_is_idempotent_and_report_totals():
    model = tiny_model()
    first = sparseq.swap(model, "int8_weight_only")
    assert len(first.swapped) == 3 and first.bytes_after < first.bytes_before / 2
    second = sparseq.swap(model, "int8_weight_only")
    assert second.rows == []  # swapped layers are not nn.Linear any more


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from sparseq.compress.data import load_model

    model, tokenizer = load_model()
    batch = tokenizer(["To be, or not to be", "All the world's a stage, and all the men and women merely players"],
                      return_tensors="pt", padding=True)
    return model, batch


@pytest.mark.parametrize("recipe, exact", [("2:4+int8_weight_only", True), ({"*attention*": "w8a8", "*": "2:4+w8a8"}, False)])
def test_minilm_matches_dense_from_compressed(minilm, recipe, exact):
    import copy

    dense, batch = minilm
    model = copy.deepcopy(dense)
    report = sparseq.swap(model, recipe, prune="magnitude")
    assert len(report.swapped) == 36 and report.bytes_after < report.bytes_before / 3
    reference = copy.deepcopy(dense)  # the same weights, dense, run by F.linear
    for name, layer in model.named_modules():
        if isinstance(layer, sparseq.nn.CompressedLinear):
            reference.get_submodule(name).weight.data = layer.dense_weight()
    with torch.no_grad():
        got = model(**batch).last_hidden_state
        want = reference(**batch).last_hidden_state
    if exact:  # float activations: only summation order differs
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:  # int8 activations: per-token quantization error
        cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
        assert cos.min() > 0.99, cos


def test_failed_swap_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.mul_(ref.prune_24(model[0].weight))  # layer 0 is 2:4, layer 1 is not
    with pytest.raises(ValueError, match=r"layer '1' \(2:4\): weight is not 2:4 sparse"):
        sparseq.swap(model, "2:4")
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


def test_torch_prune_mask_not_24_is_repruned_on_request():
    lin = nn.Linear(16, 8)
    torch.nn.utils.prune.l1_unstructured(lin, "weight", amount=0.25)  # unstructured: not 2:4
    masked = (lin.weight_orig * lin.weight_mask).detach().clone()
    model = nn.Sequential(lin)
    with pytest.raises(ValueError, match="not 2:4"):
        sparseq.swap(model, "2:4")
    assert hasattr(model[0], "weight_mask")  # untouched on error
    sparseq.swap(model, "2:4", prune="magnitude")
    w = model[0].dense_weight()
    assert ref.is_24_sparse(w)
    assert torch.equal(w[w != 0], masked[w != 0])  # kept values come from the masked weight
    assert not hasattr(model[0], "weight_mask") and not model[0]._forward_pre_hooks


def test_meta_and_odd_shapes():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 8))
    assert "meta device" in sparseq.swap(meta, "w8a8").rows[0].note
    model = nn.Sequential(nn.Linear(12, 5), nn.Linear(5, 3))  # int8 formats take any shape
    x = torch.randn(3, 12)
    dense = model(x)
    report = sparseq.swap(model, "int8_weight_only")
    assert len(report.swapped) == 2
    torch.testing.assert_close(model(x), dense, atol=0.02, rtol=0.05)
