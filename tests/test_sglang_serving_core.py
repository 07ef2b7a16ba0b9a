"""The engine-neutral core of the SGLang (and vLLM) plugin without either engine
(``sparseq.integrations.serving``): the parameters ``create_weights`` declares per format and
tensor-parallel shard, the checks that name the layer, merged SmoothQuant rows, and the runner
that builds sparseq layers around loaded tensors (bias fused only where the engine passes it).
The engine's parameter classes are stood in by one plain Parameter subclass that records its
constructor arguments; this test plays the engine's loader. SGLang's own layers and loaders:
test_sglang_layers.py; a real SGLang engine: test_sglang_engine.py (GPU)."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseq
from sparseq.integrations import serving
from sparseq.serialization import _manifest

ROOT = Path(__file__).resolve().parent.parent
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class Param(nn.Parameter):
    """Stand-in for the engine's parameter classes: the data plus the constructor's keywords."""

    def __new__(cls, data, **kwargs):
        return super().__new__(cls, data, requires_grad=False)

    def __init__(self, data, **kwargs):
        self.kwargs = kwargs


class PartsParam(serving.PartsInputMixin, Param):
    pass


CLASSES = serving.ParameterClasses(packed=Param, weight=Param, channel=Param, row=Param, per_tensor=Param,
                                   parts_input=PartsParam)


class Attn(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64, bias), nn.Linear(64, 32, bias), nn.Linear(64, 32, bias)
        self.o_proj = nn.Linear(64, 64, bias)


def swapped(recipe, bias=False, **kwargs):
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = Attn(bias)
    sparseq.swap(model, {"*": recipe}, prune="magnitude", **kwargs)
    return model.eval(), serving.parse_manifest(_manifest(model, recipe=None))


class EngineLayer(nn.Module):
    """What an engine's linear layer gives ``create_weights``: sizes, dtype, bias, merged sizes."""

    def __init__(self, k, output_sizes, bias=None, skip_bias_add=False):
        super().__init__()
        self.input_size, self.output_sizes, self.params_dtype = k, list(output_sizes), torch.float32
        self.skip_bias_add = skip_bias_add
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


def declare(layer, spec, k_rank=None, sizes=None, input_size=None):
    sizes = sizes or layer.output_sizes
    serving.declare_weights(layer, spec, CLASSES, input_size_per_partition=k_rank or layer.input_size,
                            output_partition_sizes=sizes, input_size=input_size or layer.input_size,
                            output_size=sum(layer.output_sizes), params_dtype=torch.float32,
                            weight_loader="LOADER", engine="SGLang")


def load_merged(layer, model, parts):
    """The engine's loader for a merged column-parallel layer at tp 1: parts stacked along N."""
    state = {name: torch.cat([getattr(model.attn, p).state_dict()[name] for p in parts])
             for name in ("values", "meta", "weight_q", "w_scale") if hasattr(layer, name)}
    for name, t in state.items():
        getattr(layer, name).data.copy_(t)
    for i, p in enumerate(parts):
        src = getattr(model.attn, p)
        if hasattr(layer, "smooth"):
            layer.smooth.load_qkv_weight(src.smooth, shard_id="qkv"[i])
        if hasattr(layer, "x_scale"):
            layer.x_scale.data[i] = src.x_scale[0]


@pytest.mark.parametrize("fmt, shapes", [
    ("2:4", {"values": ((128, 32), torch.float32), "meta": ((128, 8), torch.uint8)}),
    ("w8a8", {"weight_q": ((128, 64), torch.int8), "w_scale": ((128,), torch.float32)}),
    ("int8_weight_only", {"weight_q": ((128, 64), torch.int8), "w_scale": ((128,), torch.float32)}),
    ("2:4+w8a8", {"values": ((128, 32), torch.int8), "meta": ((128, 8), torch.uint8),
                  "w_scale": ((128,), torch.float32)}),
])
def test_declared_parameters_per_format_and_their_sharding_attributes(fmt, shapes):
    _, layers = swapped(fmt)
    spec = serving.resolve(layers, "attn.qkv_proj", PACKED, engine="SGLang")
    layer = EngineLayer(64, [64, 32, 32])
    declare(layer, spec)
    got = {n: (tuple(p.shape), p.dtype) for n, p in layer.named_parameters()}
    assert got == shapes
    for name, p in layer.named_parameters():
        assert p.kwargs["weight_loader"] == "LOADER"
        if name in ("values", "meta"):  # packed along K: row-parallel loaders cut K/2, K/8 columns
            assert p.kwargs == {"input_dim": 1, "output_dim": 0, "packed_dim": 1, "weight_loader": "LOADER",
                                "packed_factor": 2 if name == "values" else 8}
        if name == "w_scale":
            assert p.kwargs["output_dim"] == 0 and torch.isnan(p).all()  # unloaded scales stay invalid
        if name == "meta":
            assert bool((p == 0xFF).all())  # code 15 is no valid 2:4 pair: an unloaded part fails its check
    assert layer.sparseq_part_sizes == [64, 32, 32]


def test_row_parallel_rank_declares_its_k_slice_and_2_4_refuses_a_k_not_multiple_of_8():
    _, layers = swapped("2:4")
    spec = serving.resolve(layers, "attn.o_proj", PACKED)
    layer = EngineLayer(64, [64])
    declare(layer, spec, k_rank=32)  # tp = 2
    assert layer.values.shape == (64, 16) and layer.meta.shape == (64, 4)
    with pytest.raises(ValueError, match=r"'attn.o_proj'.*shard K at multiples of 8; this rank gets K = 12"):
        declare(EngineLayer(64, [64]), spec, k_rank=12)


def test_shape_mismatches_name_the_layer_and_the_field():
    _, layers = swapped("w8a8")
    spec = serving.resolve(layers, "attn.qkv_proj", PACKED)
    with pytest.raises(ValueError, match=r"SGLang layer 'attn.qkv_proj'.*splits it into 2 parts, the manifest names 3"):
        declare(EngineLayer(64, [64, 64]), spec)
    with pytest.raises(ValueError, match=r"in_features 64 in sparseq.json, SGLang builds 128"):
        declare(EngineLayer(128, [64, 32, 32]), spec, input_size=128)
    with pytest.raises(ValueError, match=r"out_features \[64, 32, 32\] in sparseq.json, SGLang builds \[64, 16, 16\]"):
        declare(EngineLayer(64, [64, 16, 16]), spec)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        serving.declare_weights(EngineLayer(64, [64, 32, 32]), spec, CLASSES, input_size_per_partition=64,
                                output_partition_sizes=[64, 32, 32], input_size=64, output_size=128,
                                params_dtype=torch.int8, weight_loader=None)


def test_merged_smoothquant_rows_load_by_shard_id_and_refuse_a_wrong_shape():
    _, layers = swapped("w8a8", smooth={f"attn.{p}_proj": torch.rand(64) + 0.5 for p in "qkvo"})
    layer = EngineLayer(64, [64, 32, 32])
    declare(layer, serving.resolve(layers, "attn.qkv_proj", PACKED))
    assert isinstance(layer.smooth, PartsParam) and layer.smooth.shape == (3, 64)
    layer.smooth.load_qkv_weight(torch.full((64,), 2.0), shard_id="k")
    layer.smooth.load_merged_column_weight(torch.full((64,), 3.0), shard_id=2)
    assert layer.smooth[1].eq(2.0).all() and layer.smooth[2].eq(3.0).all() and layer.smooth[0].isnan().all()
    with pytest.raises(ValueError, match=r"merged part 'q'.*shape \(32,\)"):
        layer.smooth.load_qkv_weight(torch.ones(32), shard_id="q")


@pytest.mark.parametrize("recipe, kwargs, split", [
    ("2:4", {}, False),
    ("2:4+int8_weight_only", {}, False),
    ("w8a8", {"smooth": {f"attn.{p}_proj": torch.rand(64) + 0.5 for p in "qkvo"}, "act_amax": {
        "attn.q_proj": 3.0, "attn.k_proj": 4.0, "attn.v_proj": 5.0, "attn.o_proj": 6.0}}, True),
])
def test_runner_over_loaded_parameters_gives_the_saved_layers_outputs(recipe, kwargs, split):
    model, layers = swapped(recipe, bias=True, **kwargs)
    parts = ["q_proj", "k_proj", "v_proj"]
    bias = torch.cat([getattr(model.attn, p).bias for p in parts])
    layer = EngineLayer(64, [64, 32, 32], bias=bias.clone())
    declare(layer, serving.resolve(layers, "attn.qkv_proj", PACKED))
    load_merged(layer, model, parts)
    runner = serving.attach_runner(layer, layer.sparseq_spec, rank=0, row_parallel=False, engine="SGLang")
    assert layer.sparseq_runner is runner and runner.split is split
    assert list(runner.variants) == [True]  # bias fused: what the engine passes
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = torch.cat([getattr(model.attn, p)(x) for p in parts], dim=-1)
        torch.testing.assert_close(runner(x, layer.bias), want, rtol=1e-5, atol=1e-5)
        # Without the bias (skip_bias_add, row-parallel ranks > 0): another variant, built on demand.
        no_bias = runner(x, None)
        torch.testing.assert_close(no_bias, want - bias, rtol=1e-5, atol=1e-4)
    assert sorted(runner.variants) == [False, True]
    torch.testing.assert_close(runner.dense_weight(), torch.cat([getattr(model.attn, p).dense_weight(torch.float32)
                                                                 for p in parts]))


def test_bias_is_fused_only_where_the_engine_passes_it():
    model, layers = swapped("w8a8", bias=True)
    spec = serving.resolve(layers, "attn.o_proj", PACKED)
    for rank, row_parallel, skip, fused in [(0, True, False, True), (1, True, False, False),
                                            (1, False, False, True), (0, False, True, False)]:
        layer = EngineLayer(64, [64], bias=model.attn.o_proj.bias.clone(), skip_bias_add=skip)
        declare(layer, spec)
        for name, t in model.attn.o_proj.state_dict().items():
            if hasattr(layer, name) and name != "bias":
                getattr(layer, name).data.copy_(t)
        runner = serving.attach_runner(layer, spec, rank=rank, row_parallel=row_parallel)
        assert list(runner.variants) == [fused], (rank, row_parallel, skip)


def test_an_unloaded_part_fails_its_check_naming_the_engine_layer():
    model, layers = swapped("w8a8")
    layer = EngineLayer(64, [64, 32, 32])
    declare(layer, serving.resolve(layers, "attn.qkv_proj", PACKED))
    layer.weight_q.data[:64].copy_(model.attn.q_proj.weight_q)
    layer.w_scale.data[:64].copy_(model.attn.q_proj.w_scale)  # k and v never loaded: NaN scales
    with pytest.raises(ValueError, match=r"SGLang layer 'attn.qkv_proj' \(w8a8\).*missing or corrupt tensor"):
        serving.attach_runner(layer, layer.sparseq_spec, rank=0, row_parallel=False, engine="SGLang")


def test_importing_the_sglang_plugin_imports_no_sglang():
    code = ("import sys, sparseq.integrations.sglang as p; assert p.QUANT_METHOD == 'sparseq'; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sglang'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"  # only register() imports SGLang


def test_setup_declares_the_sglang_and_vllm_plugin_entry_points():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    entry_points = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
    for group, module in (("sglang.srt.plugins", "sparseq.integrations.sglang"),
                          ("vllm.general_plugins", "sparseq.integrations.vllm")):
        (line,) = entry_points[group]
        name, target = (s.strip() for s in line.split("="))
        mod, func = target.split(":")
        assert name == "sparseq" and mod == module
        assert callable(getattr(importlib.import_module(mod), func))


def test_embedding_refusal_names_the_layer_the_engine_and_the_fix():
    from sparseq.integrations.serving import embedding_refusal

    e = embedding_refusal("lm_head", "SGLang")
    assert isinstance(e, ValueError)
    assert "'lm_head'" in str(e) and "SGLang runs it as an embedding" in str(e) and "'lm_head': 'dense'" in str(e)
