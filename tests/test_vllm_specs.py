"""The vLLM plugin's manifest handling (sparseq.integrations.vllm.specs), without vLLM: which
format each vLLM layer gets, merged layers (qkv_proj, gate_up_proj) resolved to their parts,
and the errors that name the layers. The plugin running inside vLLM: test_vllm_plugin.py."""
import pytest
import torch
from torch import nn

import sparseq
from sparseq.integrations import vllm as plugin
from sparseq.integrations.vllm.specs import parse_manifest, part_names, rename_layers, resolve
from sparseq.nn.layers import Int8Linear, Sparse24Int8Linear, Sparse24Linear
from sparseq.serialization import _manifest

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)
        self.o_proj = nn.Linear(64, 64)


def manifest(recipe, **swap_kwargs) -> dict:
    model = nn.Sequential()
    model.add_module("attn", Block())
    sparseq.swap(model, recipe, prune="magnitude", **swap_kwargs)
    return _manifest(model, recipe=None)


def test_importing_the_plugin_imports_no_vllm():
    import sys

    assert plugin.QUANT_METHOD == "sparseq"
    assert "vllm.model_executor" not in sys.modules  # register() imports vLLM, importing the package does not


def test_part_names():
    assert part_names("model.layers.0.self_attn.qkv_proj", PACKED) == tuple(
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert part_names("model.layers.0.mlp.down_proj", PACKED) == ("model.layers.0.mlp.down_proj",)
    assert part_names("gate_up_proj", PACKED) == ("gate_proj", "up_proj")


@pytest.mark.parametrize("fmt, cls, buffers", [
    ("2:4", Sparse24Linear, ("values", "meta")),
    ("w8a8", Int8Linear, ("weight_q", "w_scale")),
    ("2:4+w8a8", Sparse24Int8Linear, ("values", "meta", "w_scale")),
    ("2:4+int8_weight_only", Sparse24Int8Linear, ("values", "meta", "w_scale")),
])
def test_merged_layer_resolves_to_one_spec(fmt, cls, buffers):
    layers = parse_manifest(manifest({"*": fmt}))
    spec = resolve(layers, "attn.qkv_proj", PACKED)
    assert spec.cls is cls and spec.format == fmt
    assert spec.parts == ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    assert spec.out_features == (64, 32, 32) and spec.in_features == 64
    assert spec.buffers() == buffers
    if fmt.startswith("2:4+"):
        assert spec.kwargs["mode"] == ("w8a8" if fmt.endswith("w8a8") else "weight_only")
    assert resolve(layers, "attn.o_proj", PACKED).parts == ("attn.o_proj",)


def test_activation_buffers_follow_the_options():
    smooth = {f"attn.{p}_proj": torch.rand(64) + 0.5 for p in "qkvo"}
    amax = {f"attn.{p}_proj": 4.0 for p in "qkvo"}
    layers = parse_manifest(manifest({"*": "w8a8"}, smooth=smooth, act_amax=amax))
    assert resolve(layers, "attn.qkv_proj", PACKED).buffers() == ("weight_q", "w_scale", "smooth", "x_scale")


def test_layer_not_in_the_manifest_stays_dense():
    layers = parse_manifest(manifest({"*o_proj": "w8a8", "*": "dense"}))
    assert resolve(layers, "attn.qkv_proj", PACKED) is None
    assert resolve(layers, "lm_head", PACKED) is None


@pytest.mark.parametrize("recipe, named", [
    ({"*q_proj": "2:4", "*": "w8a8"}, "attn.q_proj: 2:4"),
    ({"*v_proj": "dense", "*": "w8a8"}, "attn.v_proj: dense"),
])
def test_merged_parts_with_different_formats_are_refused_by_name(recipe, named):
    layers = parse_manifest(manifest(recipe))
    with pytest.raises(ValueError, match="needs one format") as e:
        resolve(layers, "attn.qkv_proj", PACKED)
    assert named in str(e.value) and "attn.qkv_proj" in str(e.value)


def test_merged_parts_with_different_options_are_refused():
    layers = parse_manifest(manifest({"*": "w8a8"}, act_amax={"attn.q_proj": 4.0}))  # only q static
    with pytest.raises(ValueError, match="the same options"):
        resolve(layers, "attn.qkv_proj", PACKED)


def test_bad_manifests_name_the_problem():
    good = manifest({"*": "2:4"})
    with pytest.raises(ValueError, match="format version"):
        parse_manifest({**good, "sparseq_format_version": 99})
    with pytest.raises(ValueError, match="no 'layers'"):
        parse_manifest({k: v for k, v in good.items() if k != "layers"})
    bad = {**good, "layers": {**good["layers"], "attn.o_proj": {**good["layers"]["attn.o_proj"], "format": "4:8"}}}
    with pytest.raises(ValueError, match="unknown format"):
        parse_manifest(bad)
    bad = {**good, "layers": {"attn.o_proj": {"format": "2:4"}}}
    with pytest.raises(ValueError, match="lacks"):
        parse_manifest(bad)


def test_rename_layers_applies_vllm_name_mapping():
    layers = {"model.decoder.q_proj": {"format": "2:4"}}
    renamed = rename_layers(layers, lambda n: n.replace("model.decoder.", "model.layers."))
    assert list(renamed) == ["model.layers.q_proj"]
    assert list(rename_layers(layers, lambda n: None)) == ["model.decoder.q_proj"]
