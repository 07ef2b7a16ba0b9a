"""Which sparseq format each vLLM linear layer gets: the manifest (``sparseq.json``) read and
checked, and vLLM's merged layers (``qkv_proj`` = ``q_proj`` + ``k_proj`` + ``v_proj``,
``gate_up_proj`` = ``gate_proj`` + ``up_proj``) resolved to their parts.

Pure Python (no vLLM import): the plugin's vLLM classes live in ``.method``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Type

import torch

from ...nn.base import CompressedLinear
from ...reference import FORMAT_VERSION

# Buffers of each format, as vLLM parameters: name -> (kind, dtype or None for the layer dtype).
# kinds: "packed2"/"packed8" (2:4 values / meta: [N, K/2] / [N, K/8], K packed along the
# input dim), "weight" ([N, K]), "channel" ([N]), "input" ([K], SmoothQuant factors; one row per
# merged part), "tensor" (the static activation scale [1]; one per merged part).
_W8A8_ACT = ("smooth", "x_scale")


@dataclass(frozen=True)
class LayerSpec:
    """The sparseq format of one vLLM linear layer (the same for all its merged parts)."""

    prefix: str
    """The vLLM module name (e.g. ``model.layers.0.self_attn.qkv_proj``)."""
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
        """The canonical buffers of this format and options, bias excluded (vLLM owns it)."""
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
    from ...serialization import check_layer_spec

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
    """The checkpoint layers behind vLLM module ``prefix``: itself, or the parts vLLM merged."""
    parent, _, last = prefix.rpartition(".")
    parts = packed_modules_mapping.get(last)
    if not parts:
        return (prefix,)
    return tuple(f"{parent}.{p}" if parent else p for p in parts)


def resolve(layers: Mapping[str, dict], prefix: str,
            packed_modules_mapping: Mapping[str, Sequence[str]]) -> Optional[LayerSpec]:
    """The spec of vLLM linear layer ``prefix`` (None: not in the manifest, stays dense).

    A merged layer needs every part in the manifest with one format and the same options (one
    kernel runs them all); anything else raises a ValueError naming the parts."""
    from ...serialization import check_layer_spec

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
            raise ValueError(f"sparseq: vLLM merges {', '.join(parts)} into {prefix}, which needs one format, "
                             f"the same options and the same in_features for all parts; sparseq.json has {describe()}. "
                             "Re-compress these layers with one format (a sparseq recipe pattern such as "
                             "'*.self_attn.[qkv]_proj').")
    cls, _, options = check_layer_spec(parts[0], dict(specs[0]))
    return LayerSpec(prefix=prefix, parts=parts, format=specs[0]["format"], cls=cls,
                     options=tuple(sorted(options.items())),
                     out_features=tuple(int(s["out_features"]) for s in specs),
                     in_features=int(specs[0]["in_features"]))


def rename_layers(layers: Mapping[str, dict], rename) -> Dict[str, dict]:
    """``layers`` with each name passed through ``rename`` (vLLM's hf_to_vllm name mapper;
    a name it maps to None is kept as it was)."""
    out = {}
    for name, spec in layers.items():
        new = rename(name)
        out[new if new else name] = spec
    return out


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"sparseq layers run in float32, float16 or bfloat16, not {dtype}")
