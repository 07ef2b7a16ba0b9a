"""The SGLang plugin inside SGLang's own linear layers, on CPU: SGLang's QKVParallelLinear,
MergedColumnParallelLinear and RowParallelLinear built with quantization method ``sparseq``, loaded
by SGLang's weight loaders from a checkpoint written by ``sparseq.save``, give the outputs of the
saved sparseq layers; with tensor_parallel_size 2 (SGLang's logical tp group, one rank at a time in
this process) the ranks' shards concatenate (column parallel) or sum (row parallel) to them.

Needs SGLang's Python sources (not its GPU kernels): SGLang pins a CUDA stack, so the main venv
does not install it. ``bash tests/sglang_sources.sh`` installs sglang 0.5.23 and the pure-Python
modules its layers import into ``.cache/sglang-src``; ``SPARSEQ_SGLANG_PATH`` names that folder
(appended to sys.path: the venv's own packages keep precedence). Skipped where ``sglang`` does not
import::

    bash tests/sglang_sources.sh
    SPARSEQ_SGLANG_PATH=.cache/sglang-src python -m pytest tests/test_sglang_layers.py

The end-to-end run (``sglang.Engine`` generating the tokens of transformers) needs a GPU:
tests/test_sglang_engine.py.
"""
import json
import os
import sys
import warnings

import pytest
import torch
from torch import nn

if os.environ.get("SPARSEQ_SGLANG_PATH"):
    sys.path.append(os.path.abspath(os.environ["SPARSEQ_SGLANG_PATH"]))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # SGLang warns at import that AWQ / GGUF need a GPU
    if not os.environ.get("SPARSEQ_SGLANG_PATH"):  # where CI names the sources, they must import
        pytest.importorskip("sglang.srt.layers.linear",
                            reason="needs SGLang's sources: bash tests/sglang_sources.sh, SPARSEQ_SGLANG_PATH")
    from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from sglang.srt.runtime_context import get_parallel

import sparseq
from sparseq.integrations import sglang as plugin

HIDDEN, HEAD, HEADS, KV_HEADS, FFN = 128, 32, 4, 2, 256
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
CASES = {  # name: (recipe, swap options)
    "2:4": ("2:4", {}),
    "w8a8": ("w8a8", {}),
    "int8_weight_only": ("int8_weight_only", {}),
    "2:4+w8a8": ("2:4+w8a8", {}),
    "2:4+int8_weight_only": ("2:4+int8_weight_only", {}),
    "w8a8 smooth+static": ("w8a8", {"smooth": True, "static": True}),  # per-part activation quant
}


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD, HIDDEN, bias=False)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attn(), Mlp()


def saved_model(tmp_path, case):
    """(model swapped and saved, its checkpoint tensors, its sparseq.json)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([Layer()])
    recipe, opts = CASES[case]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kwargs = {}
    if opts.get("smooth"):
        kwargs["smooth"] = {n: torch.rand(dict(model.named_modules())[n].in_features) + 0.5 for n in names}
    if opts.get("static"):
        kwargs["act_amax"] = {n: 3.0 + i for i, n in enumerate(names)}
    sparseq.swap(model, {"*": recipe}, prune="magnitude", **kwargs)
    sparseq.save(model, tmp_path)
    return model.eval(), load_file(str(tmp_path / "model.safetensors")), json.loads((tmp_path / "sparseq.json").read_text())


def sglang_layers(manifest, tensors, tp, rank):
    """SGLang's layers for layer 0 on rank ``rank`` of ``tp``, loaded by SGLang's loaders."""
    plugin.register()
    from sparseq.integrations.sglang.method import SparseqConfig

    config = SparseqConfig.from_config({**manifest, "packed_modules_mapping": PACKED})
    with get_parallel().override(tp_size=tp, tp_rank=rank, tp_group=None):
        layers = {
            "qkv_proj": QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=config,
                                          params_dtype=torch.float32, prefix="layers.0.self_attn.qkv_proj"),
            "o_proj": RowParallelLinear(HEADS * HEAD, HIDDEN, bias=False, quant_config=config,
                                        params_dtype=torch.float32, prefix="layers.0.self_attn.o_proj"),
            "gate_up_proj": MergedColumnParallelLinear(HIDDEN, [FFN, FFN], bias=False, quant_config=config,
                                                       params_dtype=torch.float32, prefix="layers.0.mlp.gate_up_proj"),
            "down_proj": RowParallelLinear(FFN, HIDDEN, bias=False, quant_config=config, params_dtype=torch.float32,
                                           prefix="layers.0.mlp.down_proj"),
        }
        where = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
        for name, layer in layers.items():
            assert type(layer.quant_method).__name__ == "SparseqLinearMethod", name
            parts = PACKED.get(name, [name])
            shard_ids = ["q", "k", "v"] if name == "qkv_proj" else list(range(len(parts))) if len(parts) > 1 else [None]
            for part, shard in zip(parts, shard_ids):
                prefix = f"layers.0.{where[name]}.{part}."
                for pname, param in layer.named_parameters():
                    loaded = tensors[prefix + pname]
                    if shard is None:
                        param.weight_loader(param, loaded)
                    else:
                        param.weight_loader(param, loaded, shard)
            layer.quant_method.process_weights_after_loading(layer)
    return layers


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_sglang_layers_loaded_by_sglang_give_the_saved_layers_outputs(tmp_path, case, tp):
    model, tensors, manifest = saved_model(tmp_path, case)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    torch.manual_seed(1)
    x = torch.randn(5, HIDDEN)
    h = torch.randn(5, HEADS * HEAD)
    f = torch.randn(5, FFN)
    with torch.no_grad():
        want = {"qkv_proj": [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], "gate_up_proj": [mlp.gate_proj(x), mlp.up_proj(x)],
                "o_proj": attn.o_proj(h), "down_proj": mlp.down_proj(f)}
        ranks = [sglang_layers(manifest, tensors, tp, r) for r in range(tp)]
        for name, inp in (("qkv_proj", x), ("gate_up_proj", x)):
            outs = [layers[name].quant_method.apply(layers[name], inp) for layers in ranks]
            sizes = ranks[0][name].output_partition_sizes
            per_rank = [o.split(sizes, dim=-1) for o in outs]  # each rank: its shard of every part
            for i, exp in enumerate(want[name]):
                got = torch.cat([parts[i] for parts in per_rank], dim=-1)
                torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5, msg=f"{case} tp={tp} {name} part {i}")
        for name, inp in (("o_proj", h), ("down_proj", f)):
            shards = inp.chunk(tp, dim=-1)  # row parallel: each rank gets its K slice
            got = sum(layers[name].quant_method.apply(layers[name], s.contiguous()) for layers, s in zip(ranks, shards))
            if tp == 1 or "w8a8" not in case:
                torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-5, msg=f"{case} tp={tp} {name}")
            else:  # each rank quantizes its own K slice per token: the same format, other activation scales
                err = (got - want[name]).abs().max() / want[name].abs().max()
                assert err < 0.05, f"{case} tp={tp} {name}: relative error {err:.4f}"


def test_sglang_registers_the_method_and_reads_the_manifest_from_config_json(tmp_path):
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES
    from sglang.srt.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from sglang.srt.layers.quantization import get_quantization_config

    plugin.register()
    plugin.register()
    from sparseq.integrations.sglang.method import SparseqConfig

    assert get_quantization_config("sparseq") is SparseqConfig
    assert QUANTIZATION_CHOICES.count("sparseq") == 1
    assert WEIGHT_LOADER_V2_SUPPORTED.count("SparseqLinearMethod") == 1
    _, _, manifest = saved_model(tmp_path, "w8a8")

    class HfConfig:  # what SGLang passes: the transformers config of the model folder
        _name_or_path = str(tmp_path)

    config = SparseqConfig.from_config({"quant_method": "sparseq", "hf_config": HfConfig(), "packed_modules_mapping": PACKED})
    assert config.layers == SparseqConfig.from_config(manifest).layers and config.packed_modules_mapping == PACKED
    with pytest.raises(ValueError, match="no sparseq.json"):
        SparseqConfig.from_config({"quant_method": "sparseq", "hf_config": type("C", (), {"_name_or_path": str(tmp_path / "x")})()})


def test_sglang_mixed_formats_in_a_merged_layer_are_refused_naming_the_parts(tmp_path):
    from sparseq.integrations.sglang.method import SparseqConfig

    _, _, manifest = saved_model(tmp_path, "w8a8")
    manifest["layers"]["layers.0.self_attn.k_proj"]["format"] = "int8_weight_only"
    manifest["layers"]["layers.0.self_attn.k_proj"].pop("options", None)
    config = SparseqConfig.from_config({**manifest, "packed_modules_mapping": PACKED})
    with get_parallel().override(tp_size=1, tp_rank=0, tp_group=None):
        with pytest.raises(ValueError, match=r"SGLang merges .*q_proj.*k_proj.*v_proj.*needs one format"):
            QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=config,
                              params_dtype=torch.float32, prefix="layers.0.self_attn.qkv_proj")
