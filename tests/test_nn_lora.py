"""LoRA interop: recompress(), PEFT adapters beside sparseq layers, merge re-compresses."""
import pytest
import torch
from torch import nn

import sparseq
from sparseq.nn.lora import kept_mask, recompress


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)  # PEFT needs the model to hold at least one parameter
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_recompress_keeps_format_options_and_pattern():
    lin = nn.Linear(32, 16)
    smooth = torch.rand(32) + 0.5
    layer = sparseq.Sparse24Int8Linear.from_linear(lin, prune="magnitude", smooth=smooth, act_amax=3.0)
    same = recompress(layer, layer.dense_weight())
    assert same.FORMAT == "2:4+w8a8" and same.options() == layer.options()
    assert torch.equal(same.meta, layer.meta) and torch.equal(same.x_scale, layer.x_scale)
    assert torch.equal(same.smooth, layer.smooth)
    torch.testing.assert_close(same.dense_weight(), layer.dense_weight())

    moved = recompress(layer, torch.randn(16, 32))  # dense delta: masked by the kept pattern
    assert torch.equal(kept_mask(moved), kept_mask(layer))
    repruned = recompress(layer, torch.randn(16, 32), prune="magnitude")
    assert not torch.equal(kept_mask(repruned), kept_mask(layer))
    with pytest.raises(ValueError, match=r"weight must have shape \(16, 32\)"):
        recompress(layer, torch.randn(32, 16))


def test_peft_lora_trains_and_merge_recompresses():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = Tiny()
    sparseq.swap(model, {"fc1": "2:4+w8a8", "fc2": "int8_weight_only"}, prune="magnitude")
    config = sparseq.nn.lora_config(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    pm = peft.get_peft_model(model, config)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    x = torch.randn(6, 64)
    wrapper = pm.base_model.model.fc2
    base = wrapper.base_layer
    expected = base(x[:, :32]) + wrapper.lora_B["default"](wrapper.lora_A["default"](x[:, :32])) * wrapper.scaling["default"]
    torch.testing.assert_close(wrapper(x[:, :32]), expected)  # base + dense LoRA

    pm(x).pow(2).mean().backward()  # gradients reach fc1's adapters through fc2's int8 base
    assert pm.base_model.model.fc1.lora_A["default"].weight.grad.abs().sum() > 0

    delta = wrapper.get_delta_weight("default").detach()
    want = recompress(base, base.dense_weight() + delta)
    merged = pm.merge_and_unload()
    assert isinstance(merged.fc1, sparseq.Sparse24Int8Linear) and isinstance(merged.fc2, sparseq.Int8WeightOnlyLinear)
    assert torch.equal(merged.fc2.weight_q, want.weight_q) and torch.equal(merged.fc2.w_scale, want.w_scale)
    h = torch.randn(3, 32)
    torch.testing.assert_close(merged.fc2(h), base(h) + h @ delta.T, atol=0.05, rtol=0.05)


def test_unmerge_is_refused():
    peft = pytest.importorskip("peft")
    model = Tiny()
    sparseq.swap(model, "int8_weight_only")
    pm = peft.get_peft_model(model, sparseq.nn.lora_config(r=2, target_modules=["fc1"]))
    pm.merge_adapter()
    with pytest.raises(RuntimeError, match="cannot be unmerged"):
        pm.unmerge_adapter()


def test_add_lora_without_peft_trains_and_merges():
    torch.manual_seed(0)
    model = Tiny()
    sparseq.swap(model, {"fc1": "2:4", "fc2": "w8a8"}, prune="magnitude")
    names = sparseq.nn.add_lora(model, rank=4)
    assert names == ["fc1", "fc2"]
    x = torch.randn(6, 64)
    before = model(x)
    with torch.no_grad():
        model.fc2.lora_B.normal_()  # B = 0 at start: the wrapper starts as the base layer
    model(x).pow(2).mean().backward()
    assert model.fc1.lora_A.grad is not None and model.fc1.lora_B.grad.abs().sum() > 0
    fc2 = model.fc2
    h = torch.randn(3, 32)
    want = recompress(fc2.base, fc2.base.dense_weight() + fc2.delta_weight().detach())
    assert sparseq.nn.merge_lora(model) == ["fc1", "fc2"]
    assert isinstance(model.fc1, sparseq.Sparse24Linear) and isinstance(model.fc2, sparseq.Int8Linear)
    assert torch.equal(model.fc2(h), want(h))
    assert not torch.equal(model(x), before)
