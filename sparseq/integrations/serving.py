"""Engine-neutral core of the serving plugins (vLLM: ``.vllm``, SGLang: ``.sglang``): which sparseq
format each engine linear layer gets (the manifest ``sparseq.json`` read and checked, merged layers
such as ``qkv_proj`` = ``q_proj`` + ``k_proj`` + ``v_proj`` resolved to their parts), the canonical
buffers declared as the engine's weight parameters, and the runner that builds sparseq layers
around the loaded tensors.

Imports no engine: vLLM and SGLang (whose linear layers and parameter classes SGLang adapted from
vLLM's) pass their own parameter classes in. Tested without either engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch

from ..nn.base import CompressedLinear
from ..reference import FORMAT_VERSION

MANIFEST = "sparseq.json"
_QKV = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class LayerSpec:
    """The sparseq format of one engine linear layer (the same for all its merged parts)."""

    prefix: str
    """The engine's module name (e.g. ``model.layers.0.self_attn.qkv_proj``)."""
    parts: Tuple[str, ...]
    """The checkpoint layers it is made of (one, or the parts of a merged layer)."""
    format: str
    cls: Type[CompressedLinear]
    options: Tuple[Tuple[str, object], ...]
    """Constructor options (the format's fixed ones included), sorted."""
    out_features: Tuple[int, ...]
    """Unsharded N of each part, from the manifest."""
    in_features: int

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    def buffers(self) -> Tuple[str, ...]:
        """The canonical buffers of this format and options, bias excluded (the engine owns it)."""
        names = ["values", "meta"] if self.format.startswith("2:4") else ["weight_q"]
        if self.format != "2:4":
            names.append("w_scale")
        opts = self.kwargs
        if opts.get("smooth"):
            names.append("smooth")
        if opts.get("static"):
            names.append("x_scale")
        return tuple(names)


def parse_manifest(config: Mapping) -> Dict[str, dict]:
    """The ``layers`` of a sparseq manifest (the dict of ``sparseq.json``), every entry checked
    as ``sparseq.load`` checks it; raises ValueError naming the field."""
    from ..serialization import check_layer_spec

    if not isinstance(config, Mapping):
        raise ValueError(f"sparseq: the quantization config must be a JSON object, got {type(config).__name__}")
    version = config.get("sparseq_format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"sparseq: format version {version!r} is not supported (this sparseq reads {FORMAT_VERSION})")
    layers = config.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError("sparseq: the manifest has no 'layers' object")
    out = {}
    for name, spec in layers.items():
        missing = [f for f in ("format", "in_features", "out_features", "bias", "dtype")
                   if not isinstance(spec, Mapping) or f not in spec]
        if missing:
            raise ValueError(f"sparseq: manifest layer {name!r} lacks {missing}")
        check_layer_spec(name, dict(spec))
        out[name] = dict(spec)
    return out


def part_names(prefix: str, packed_modules_mapping: Mapping[str, Sequence[str]]) -> Tuple[str, ...]:
    """The checkpoint layers behind engine module ``prefix``: itself, or the parts the engine merged."""
    parent, _, last = prefix.rpartition(".")
    parts = packed_modules_mapping.get(last)
    if not parts:
        return (prefix,)
    return tuple(f"{parent}.{p}" if parent else p for p in parts)


def resolve(layers: Mapping[str, dict], prefix: str,
            packed_modules_mapping: Mapping[str, Sequence[str]], engine: str = "vLLM") -> Optional[LayerSpec]:
    """The spec of ``engine``'s linear layer ``prefix`` (None: not in the manifest, stays dense).

    A merged layer needs every part in the manifest with one format and the same options (one
    kernel runs them all); anything else raises a ValueError naming the parts."""
    from ..serialization import check_layer_spec

    parts = part_names(prefix, packed_modules_mapping)
    specs = [layers.get(p) for p in parts]
    if all(s is None for s in specs):
        return None

    def describe() -> str:
        return ", ".join(f"{p}: {s['format'] if s else 'dense (not in sparseq.json)'}"
                         + (f" {s.get('options') or {}}" if s else "") for p, s in zip(parts, specs))

    if len(parts) > 1:
        first = specs[0]
        same = all(s is not None and s["format"] == first["format"]
                   and (s.get("options") or {}) == (first.get("options") or {})
                   and s["in_features"] == first["in_features"] for s in specs)
        if not same:
            raise ValueError(f"sparseq: {engine} merges {', '.join(parts)} into {prefix}, which needs one format, "
                             f"the same options and the same in_features for all parts; sparseq.json has {describe()}. "
                             "Re-compress these layers with one format (a sparseq recipe pattern such as "
                             "'*.self_attn.[qkv]_proj').")
    cls, _, options = check_layer_spec(parts[0], dict(specs[0]))
    return LayerSpec(prefix=prefix, parts=parts, format=specs[0]["format"], cls=cls,
                     options=tuple(sorted(options.items())),
                     out_features=tuple(int(s["out_features"]) for s in specs),
                     in_features=int(specs[0]["in_features"]))


def rename_layers(layers: Mapping[str, dict], rename) -> Dict[str, dict]:
    """``layers`` with each name passed through ``rename`` (the engine's checkpoint-to-module name mapper;
    a name it maps to None is kept as it was)."""
    out = {}
    for name, spec in layers.items():
        new = rename(name)
        out[new if new else name] = spec
    return out


def embedding_refusal(prefix: str, engine: str) -> ValueError:
    """The error for a manifest that compresses a layer the engine runs as an embedding or LM
    head (``VocabParallelEmbedding``): the plugins compress Linear layers only."""
    return ValueError(f"sparseq: {prefix!r} is compressed in sparseq.json, but {engine} runs it as an embedding / "
                      "LM head, which the sparseq plugin does not compress; keep it dense "
                      "(recipe {'lm_head': 'dense', ...})")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"sparseq layers run in float32, float16 or bfloat16, not {dtype}")


# ------------------------------------------------------------------ weights, as engine parameters
@dataclass(frozen=True)
class ParameterClasses:
    """The engine's weight-parameter classes. vLLM's ``vllm.model_executor.parameter`` and SGLang's
    ``sglang.srt.layers.parameter`` (adapted from vLLM's) have the same names and constructors;
    their loaders shard N (column parallel) or K (row parallel) and place merged parts."""

    packed: type
    """``PackedvLLMParameter``: 2:4 values [N, K/2] and meta [N, K/8], packed along K."""
    weight: type
    """``ModelWeightParameter``: int8 weights [N, K]."""
    channel: type
    """``ChannelQuantScaleParameter``: per-channel scales [N]."""
    row: type
    """``RowvLLMParameter``: SmoothQuant factors [K] of an unmerged layer."""
    per_tensor: type
    """``PerTensorScaleParameter``: the static activation scale, one per merged part."""
    parts_input: type
    """The engine's ``PartsInputParameter`` (``PartsInputMixin`` + its ``BasevLLMParameter``)."""


class PartsInputMixin:
    """One ``[K]`` row per part of a merged column-parallel layer (SmoothQuant factors: each of
    q/k/v or gate/up has its own). The parts' loaders write their row; K is never sharded in a
    column-parallel layer. Mixed into the engine's ``BasevLLMParameter``."""

    @property
    def input_dim(self) -> int:
        return 1

    def _load_part(self, loaded_weight: torch.Tensor, shard_id) -> None:
        index = _QKV[shard_id] if isinstance(shard_id, str) else int(shard_id)
        row = self.data[index]
        if row.shape != loaded_weight.shape:
            raise ValueError(f"sparseq: merged part {shard_id!r}: SmoothQuant factors of shape "
                             f"{tuple(loaded_weight.shape)}, the layer takes {tuple(row.shape)}")
        row.copy_(loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_part(loaded_weight, kwargs["shard_id"])

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_part(loaded_weight, kwargs["shard_id"])

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self.data.copy_(loaded_weight.expand_as(self.data))  # one tensor for the fused layer


def declare_weights(layer: torch.nn.Module, spec: LayerSpec, classes: ParameterClasses, *,
                    input_size_per_partition: int, output_partition_sizes: Sequence[int], input_size: int,
                    output_size: int, params_dtype: torch.dtype, weight_loader, engine: str = "vLLM") -> None:
    """Register ``spec``'s canonical buffers on ``layer`` as the engine's parameters (the body of
    ``LinearMethodBase.create_weights``), after checking the engine's shapes against the manifest.
    Unloaded parts stay invalid (NaN scales, meta code 15) so the load-time check names them."""
    check_dtype(params_dtype)
    n_parts = len(output_partition_sizes)
    where = f"sparseq: {engine} layer {spec.prefix!r} ({spec.format}, from {', '.join(spec.parts)})"
    if n_parts != len(spec.parts):
        raise ValueError(f"{where}: {engine} splits it into {n_parts} parts, the manifest names {len(spec.parts)}")
    if input_size != spec.in_features:
        raise ValueError(f"{where}: in_features {spec.in_features} in {MANIFEST}, {engine} builds {input_size}")
    full_sizes = [int(s) for s in (getattr(layer, "output_sizes", None) or [output_size])]
    replicated = getattr(layer, "num_kv_head_replicas", 1) > 1  # tp > KV heads: k/v sizes count replicas
    if not replicated and full_sizes != list(spec.out_features):
        raise ValueError(f"{where}: out_features {list(spec.out_features)} in {MANIFEST}, {engine} builds {full_sizes}")
    k = input_size_per_partition
    if spec.format.startswith("2:4") and k % 8:
        raise ValueError(f"{where}: 2:4 layers shard K at multiples of 8; this rank gets K = {k} "
                         "(use a tensor-parallel size that splits K into multiples of 8)")
    n = sum(output_partition_sizes)
    buffers = spec.buffers()
    value_dtype = torch.int8 if spec.format.startswith("2:4+") else params_dtype
    add = layer.register_parameter
    if "values" in buffers:
        data = torch.full((n, k // 2), float("nan"), dtype=value_dtype) if value_dtype.is_floating_point \
            else torch.zeros(n, k // 2, dtype=value_dtype)
        add("values", classes.packed(data=data, input_dim=1, output_dim=0, packed_dim=1, packed_factor=2,
                                     weight_loader=weight_loader))
        add("meta", classes.packed(data=torch.full((n, k // 8), 0xFF, dtype=torch.uint8), input_dim=1,
                                   output_dim=0, packed_dim=1, packed_factor=8, weight_loader=weight_loader))
    if "weight_q" in buffers:
        add("weight_q", classes.weight(data=torch.zeros(n, k, dtype=torch.int8), input_dim=1, output_dim=0,
                                       weight_loader=weight_loader))
    if "w_scale" in buffers:
        add("w_scale", classes.channel(data=torch.full((n,), float("nan")), output_dim=0,
                                       weight_loader=weight_loader))
    if "smooth" in buffers:
        if n_parts == 1:
            add("smooth", classes.row(data=torch.full((k,), float("nan")), input_dim=0, weight_loader=weight_loader))
        else:
            add("smooth", classes.parts_input(data=torch.full((n_parts, k), float("nan")),
                                              weight_loader=weight_loader))
    if "x_scale" in buffers:
        add("x_scale", classes.per_tensor(data=torch.full((n_parts,), float("nan")), weight_loader=weight_loader))
    layer.sparseq_spec = spec
    layer.sparseq_part_sizes = list(output_partition_sizes)


# ------------------------------------------------------------------ running a loaded layer
class LayerRunner:
    """The sparseq layer(s) of one engine layer: one over all of N, or one per merged part where
    the parts quantize their activations differently (their own SmoothQuant factors or static
    scales); built with the bias fused (what the engine passes) and, only if asked for, without.
    Its buffers are the engine parameters' storage (no copy)."""

    def __init__(self, layer: torch.nn.Module, spec: LayerSpec, dtype: torch.dtype) -> None:
        self.spec = spec
        self.dtype = dtype
        self.tensors = {name: getattr(layer, name).data for name in spec.buffers()}
        self.bias = getattr(layer, "bias", None)
        self.k = int(getattr(layer, "input_size_per_partition", None) or layer.input_size)
        sizes = layer.sparseq_part_sizes
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.slices = [(s, n) for s, n in zip(starts, sizes)]
        self.split = len(sizes) > 1 and not self._same_activation_quant()
        self.variants: Dict[bool, List[CompressedLinear]] = {}

    def _same_activation_quant(self) -> bool:
        for name in ("smooth", "x_scale"):
            t = self.tensors.get(name)
            if t is not None and not bool((t == t[0:1]).all()):
                return False
        return True

    def _state(self, part: Optional[int], fused: bool) -> Dict[str, torch.Tensor]:
        if part is None:  # the whole N
            start, n = 0, sum(size for _, size in self.slices)
            row = 0
        else:
            (start, n), row = self.slices[part], part
        state = {}
        for name, t in self.tensors.items():
            if name == "smooth":
                state[name] = t if t.dim() == 1 else t[row]
            elif name == "x_scale":
                state[name] = t[row:row + 1]
            else:
                state[name] = t[start:start + n]
        if fused:
            state["bias"] = self.bias.data[start:start + n]
        return state

    def build(self, fused: bool, engine: str = "vLLM") -> List[CompressedLinear]:
        """The sparseq layers (bias fused or not), built once: buffers checked, kernels resolved."""
        layers = self.variants.get(fused)
        if layers is not None:
            return layers
        parts = range(len(self.slices)) if self.split else [None]
        layers = []
        for part in parts:
            state = self._state(part, fused)
            n = state[self.spec.buffers()[0]].shape[0]  # values or weight_q: [N, ...]
            sl = self.spec.cls(self.k, n, bias=fused, dtype=self.dtype, device="meta", **self.spec.kwargs)
            try:
                sl.load_state_dict(state, strict=True, assign=True)  # checks codes, scales, finiteness
            except (TypeError, ValueError, RuntimeError) as e:
                what = self.spec.prefix if part is None else self.spec.parts[part]
                raise type(e)(f"sparseq: {engine} layer {self.spec.prefix!r} ({self.spec.format}), {what}: {e} "
                              "(a missing or corrupt tensor in the checkpoint)") from None
            sl.eval()
            sl.prepare()  # kernel layouts / dense copies / oneDNN packing now, not in the first forward
            layers.append(sl)
        self.variants[fused] = layers
        return layers

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if bias is not None and bias is self.bias and True in self.variants:
            return self._run(self.variants[True], x)
        y = self._run(self.variants.get(False) or self.build(False), x)
        return y if bias is None else y + bias

    @staticmethod
    def _run(layers: List[CompressedLinear], x: torch.Tensor) -> torch.Tensor:
        if len(layers) == 1:
            return layers[0](x)
        return torch.cat([sl(x) for sl in layers], dim=-1)

    def dense_weight(self) -> torch.Tensor:
        layers = next(iter(self.variants.values()))
        return torch.cat([sl.dense_weight(self.dtype) for sl in layers], dim=0)


def attach_runner(layer: torch.nn.Module, spec: LayerSpec, *, rank: int, row_parallel: bool,
                  engine: str = "vLLM") -> LayerRunner:
    """Build ``layer``'s sparseq layers after the engine loaded its parameters (the body of
    ``process_weights_after_loading``). The bias is fused where the engine passes it to ``apply``:
    not with ``skip_bias_add``, and in a row-parallel layer only on rank 0."""
    bias = getattr(layer, "bias", None)
    fused = bias is not None and not getattr(layer, "skip_bias_add", False) and not (row_parallel and rank > 0)
    runner = LayerRunner(layer, spec, layer.params_dtype)
    runner.build(fused=fused, engine=engine)
    layer.sparseq_runner = runner  # a plain object, not a submodule: the engine sees only its parameters
    return runner


def describe_layers(model: torch.nn.Module, linear_cls: type) -> Dict[str, dict]:
    """``{linear layer: {"method", "sparseq", "backends", "split_parts"}}`` of a loaded engine model
    whose linear layers are ``linear_cls``: the quant method and, for sparseq layers, the sparseq
    layer objects it runs and the backends they resolved."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, linear_cls):
            continue
        row: Dict[str, object] = {"method": type(module.quant_method).__name__}
        runner = getattr(module, "sparseq_runner", None)
        if runner is not None:
            layers = [sl for variant in runner.variants.values() for sl in variant]
            row["sparseq"] = [f"{type(sl).__name__}({sl.FORMAT})" for sl in layers]
            row["backends"] = sorted({b for sl in layers for b in sl.backends.values()})
            row["split_parts"] = bool(runner.split)
        out[name] = row
    return out
