"""Import llm-compressor / compressed-tensors checkpoints into sparseq layers.

compressed-tensors >= 0.15 dropped its ``sparse-24-bitmask`` compressor and vLLM rejects any
``sparsity_config``, so 2:4 checkpoints written by llm-compressor have no fast home left; this
module reads them (and int8 ``int-quantized`` ones) without compressed-tensors installed:

- ``sparsity_config.format = "sparse-24-bitmask"``: per layer ``<name>.compressed`` [N, K/2]
  (the kept values, row-major), ``<name>.bitmask`` uint8 [N, K/8] (bit j of byte b flags
  column 8b + j), ``<name>.shape`` ([N, K]).
- ``quantization_config.format = "int-quantized"``: int8 weights (``<name>.weight``, or the
  ``compressed`` values of a 2:4 layer), ``<name>.weight_scale`` [N, 1] symmetric per
  channel; activations dynamic per token, static per tensor (``<name>.input_scale``), or none
  (weight-only).

Each layer becomes the sparseq layer of the same arithmetic: 2:4 -> ``Sparse24Linear``,
W8A8 -> ``Int8Linear``, weight-only -> ``Int8WeightOnlyLinear``, 2:4 + int8 ->
``Sparse24Int8Linear``. Values are copied bit for bit (2:4 layers re-expressed in the canonical
2:4 form: the same dense weight; a ``-0.0`` comes back as ``+0.0``). Unsupported settings
(group quantization, asymmetric, other bit widths, other sparsity formats) raise a ValueError
naming the config field.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .. import reference as ref
from ..serialization import unique_tensors

CONFIG = "config.json"


def is_checkpoint(path: Union[str, Path]) -> bool:
    """True when ``path`` holds a transformers config whose quantization_config says
    ``quant_method: compressed-tensors``."""
    file = Path(path) / CONFIG
    if not file.is_file():
        return False
    try:
        config = json.loads(file.read_text())
    except (ValueError, OSError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _field(where: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"compressed-tensors checkpoint: {where} = {value!r} is not supported "
                         f"(sparseq reads {sorted(map(str, allowed))})")


def parse_scheme(qc: dict) -> Tuple[bool, Optional[str]]:
    """``(sparse, activations)`` from a quantization_config: ``sparse`` for a 2:4 bitmask
    sparsity config; ``activations`` None (no quantization), ``"none"`` (weight-only),
    ``"token"`` (dynamic per token) or ``"tensor"`` (static per tensor)."""
    sparse = False
    sc = qc.get("sparsity_config")
    if sc:
        fmt = sc.get("format")
        if fmt != "dense":
            _field("sparsity_config.format", fmt, {"sparse-24-bitmask", "dense"})
            _field("sparsity_config.sparsity_structure", sc.get("sparsity_structure", "2:4"), {"2:4"})
            sparse = True
    groups = qc.get("config_groups") or {}
    if not groups:
        return sparse, None
    fmt = qc.get("format")
    _field("quantization_config.format", fmt, {"int-quantized", "naive-quantized", "pack-quantized"})
    schemes = set()
    for name, group in groups.items():
        weights = group.get("weights") or {}
        where = f"config_groups.{name}.weights"
        _field(f"{where}.num_bits", weights.get("num_bits"), {8})
        _field(f"{where}.type", weights.get("type"), {"int"})
        _field(f"{where}.symmetric", weights.get("symmetric"), {True})
        _field(f"{where}.strategy", weights.get("strategy"), {"channel"})
        acts = group.get("input_activations")
        if acts is None:
            schemes.add("none")
            continue
        where = f"config_groups.{name}.input_activations"
        _field(f"{where}.num_bits", acts.get("num_bits"), {8})
        _field(f"{where}.type", acts.get("type"), {"int"})
        _field(f"{where}.symmetric", acts.get("symmetric"), {True})
        strategy = acts.get("strategy")
        _field(f"{where}.strategy", strategy, {"token", "tensor"})
        _field(f"{where}.dynamic", acts.get("dynamic"), {True} if strategy == "token" else {False})
        schemes.add(strategy)
    if fmt == "pack-quantized" and schemes != {"none"}:
        raise ValueError("compressed-tensors checkpoint: quantization_config.format = 'pack-quantized' with "
                         "input_activations is not supported (sparseq reads it for int8 weight-only)")
    if len(schemes) > 1:
        raise ValueError(f"compressed-tensors checkpoint: config_groups mix activation schemes {sorted(schemes)}; "
                         "sparseq reads one scheme per checkpoint")
    return sparse, schemes.pop()


@contextlib.contextmanager
def _parameters_on_meta():
    """Construct modules with their parameters on the meta device (filled from the checkpoint)
    and their buffers real (rotary tables and other non-persistent buffers are computed, not
    saved): each parameter exists on the CPU only while its module's constructor runs."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    tensors: Dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / name} is missing or corrupt: {e}") from e
    return tensors


def bitmask_to_dense(name: str, compressed: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    """The dense ``[N, K]`` weight of a ``sparse-24-bitmask`` layer (every row must keep K/2)."""
    shape = [int(s) for s in torch.as_tensor(shape).flatten().tolist()]
    if len(shape) != 2 or shape[1] % 8:
        raise ValueError(f"layer {name!r}: shape {shape} is not [N, K] with K a multiple of 8")
    n, k = shape
    if tuple(bitmask.shape) != (n, k // 8) or bitmask.dtype != torch.uint8:
        raise ValueError(f"layer {name!r}: bitmask must be uint8 [{n}, {k // 8}], got {bitmask.dtype} "
                         f"{list(bitmask.shape)}")
    if tuple(compressed.shape) != (n, k // 2):
        raise ValueError(f"layer {name!r}: compressed must be [{n}, {k // 2}], got {list(compressed.shape)}")
    bits = (bitmask[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1  # little bit order
    mask = bits.reshape(n, k).bool()
    kept = mask.sum(dim=1)
    if bool((kept != k // 2).any()):
        row = int((kept != k // 2).nonzero()[0])
        raise ValueError(f"layer {name!r}: bitmask row {row} keeps {int(kept[row])} of {k} columns, not {k // 2}")
    dense = torch.zeros(n, k, dtype=compressed.dtype)
    dense[mask] = compressed.reshape(-1)
    return dense


def unpack_int8(name: str, packed: torch.Tensor, shape) -> torch.Tensor:
    """int8 ``[N, K]`` from ``pack-quantized`` 8-bit ``weight_packed`` int32 ``[N, ceil(K/4)]``:
    four values per int32, lowest byte first, each stored as ``q + 128``."""
    if shape is None:
        raise ValueError(f"layer {name!r}: weight_packed without weight_shape")
    shape = [int(s) for s in torch.as_tensor(shape).flatten().tolist()]
    if len(shape) != 2 or packed.dtype != torch.int32 or tuple(packed.shape) != (shape[0], -(-shape[1] // 4)):
        raise ValueError(f"layer {name!r}: weight_packed {packed.dtype} {list(packed.shape)} does not hold "
                         f"8-bit values of shape {shape}")
    n, k = shape
    unsigned = packed.contiguous().view(torch.uint8).reshape(n, -1)[:, :k]
    return (unsigned.to(torch.int16) - 128).to(torch.int8)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpack_int8` (K padded to a multiple of 4 with ``0`` bytes)."""
    n, k = q.shape
    unsigned = (q.to(torch.int16) + 128).to(torch.uint8)
    padded = torch.zeros(n, -(-k // 4) * 4, dtype=torch.uint8)
    padded[:, :k] = unsigned
    return padded.view(torch.int32)


def _layer(name: str, tensors: Dict[str, torch.Tensor], sparse: bool, acts: Optional[str],
           dtype: torch.dtype, bias: Optional[torch.Tensor]) -> Optional[nn.Module]:
    """The sparseq layer for checkpoint layer ``name``, or None where it is stored dense."""
    from ..nn.layers import Int8Linear, Int8WeightOnlyLinear, Sparse24Int8Linear, Sparse24Linear

    is_sparse = sparse and f"{name}.bitmask" in tensors
    scale = tensors.get(f"{name}.weight_scale")
    if not is_sparse and scale is None:
        return None
    if is_sparse:
        w = bitmask_to_dense(name, tensors[f"{name}.compressed"], tensors[f"{name}.bitmask"], tensors[f"{name}.shape"])
    elif f"{name}.weight_packed" in tensors:
        w = unpack_int8(name, tensors[f"{name}.weight_packed"], tensors.get(f"{name}.weight_shape"))
    else:
        w = tensors[f"{name}.weight"]
    n, k = w.shape
    if scale is None:
        if not w.is_floating_point():
            raise ValueError(f"layer {name!r}: int8 values without a weight_scale")
        layer = Sparse24Linear(k, n, bias is not None, w.dtype, device="meta")
    else:
        if w.dtype != torch.int8:
            raise ValueError(f"layer {name!r}: quantized weight must be int8, got {w.dtype}")
        if scale.numel() != n:
            raise ValueError(f"layer {name!r}: weight_scale has {scale.numel()} values for {n} channels "
                             "(sparseq reads per-channel scales)")
        if f"{name}.weight_zero_point" in tensors and bool(tensors[f"{name}.weight_zero_point"].any()):
            raise ValueError(f"layer {name!r}: weight_zero_point is not zero (asymmetric quantization)")
        static = acts == "tensor"
        if static and f"{name}.input_scale" not in tensors:
            raise ValueError(f"layer {name!r}: static activation quantization without an input_scale")
        if is_sparse:
            mode = "weight_only" if acts in (None, "none") else "w8a8"
            layer = Sparse24Int8Linear(k, n, bias is not None, dtype, device="meta", mode=mode, static=static)
        elif acts in (None, "none"):
            layer = Int8WeightOnlyLinear(k, n, bias is not None, dtype, device="meta")
        else:
            layer = Int8Linear(k, n, bias is not None, dtype, device="meta", static=static)
    state = {}
    if is_sparse:
        try:
            values, meta = ref.compress_24(w)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: the bitmask is not 2:4: {e}") from None
        state.update(values=values, meta=meta)
    else:
        state["weight_q"] = w
    if scale is not None:
        state["w_scale"] = scale.reshape(n).float()
        if acts == "tensor":
            state["x_scale"] = tensors[f"{name}.input_scale"].reshape(1).float()
    if bias is not None:
        state["bias"] = bias
    try:
        layer.load_state_dict(state, assign=True)  # checked (codes, scales) before assignment
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"layer {name!r}: {e}") from e
    return layer


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """A transformers model from compressed-tensors checkpoint ``path`` with sparseq layers
    where the checkpoint stores 2:4 and/or int8 layers (see the module docstring); other
    modules load as saved. Built on the meta device: no dense weight of a compressed layer is
    materialized beyond one layer at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..nn.base import prepare

    path = Path(path)
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not a compressed-tensors checkpoint (config.json without "
                         "quantization_config.quant_method = 'compressed-tensors')")
    qc = json.loads((path / CONFIG).read_text())["quantization_config"]
    sparse, acts = parse_scheme(qc)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # sparseq computes the layers itself; a save writes sparseq's format
    tensors = _read_tensors(path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    used = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        bias = tensors.get(f"{name}.bias")
        layer = _layer(name, tensors, sparse, acts, dtype, bias)
        if layer is None:
            continue
        used.update(k for k in tensors if k.rpartition(".")[0] == name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    rest = {k: v for k, v in tensors.items() if k not in used}
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors the model does not have: {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path}: missing from the checkpoint: {left[:5]}")
    model.to(device).eval()
    if torch.device(device).type == "cuda":
        prepare(model)
    return model


# ------------------------------------------------------------------------------ export

_WEIGHT_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                "block_structure": None, "dynamic": False, "actorder": None, "observer": None,
                "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None}


def _activation_args(static: bool) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor" if static else "token",
            "dynamic": not static, "group_size": None, "block_structure": None, "actorder": None,
            "observer": None, "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None}


def _scale_tensor(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in the model dtype where that is exact (what compressed-tensors writes), else fp32."""
    cast = scale.to(dtype)
    return cast if torch.equal(cast.float(), scale.float()) else scale.float()


def save(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write a transformers model whose sparseq layers are all W8A8 (``Int8Linear``) or all int8
    weight-only (``Int8WeightOnlyLinear``) as a compressed-tensors checkpoint that stock vLLM
    and compressed-tensors load without sparseq: W8A8 as ``int-quantized`` (per-channel
    weights, dynamic per-token or static per-tensor activations), weight-only as
    ``pack-quantized``. 2:4 layers have no such export (vLLM rejects every ``sparsity_config``):
    save them in sparseq's format. SmoothQuant factors must be folded into the preceding
    layer first (the format has no place for them)."""
    from safetensors.torch import save_file

    from ..nn.base import CompressedLinear

    if not (hasattr(model, "config") and hasattr(model.config, "to_dict")):
        raise ValueError("compressed-tensors export needs a transformers model (it writes config.json)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    if not layers:
        raise ValueError("the model has no sparseq layers to export")
    kinds = set()
    for name, layer in layers.items():
        if layer.FORMAT not in ("w8a8", "int8_weight_only"):
            raise ValueError(f"layer {name!r}: format {layer.FORMAT!r} has no compressed-tensors export that vLLM "
                             "reads; save 2:4 models in sparseq's format (sparseq.save(model, dir))")
        if getattr(layer, "smooth", None) is not None:
            raise ValueError(f"layer {name!r} has SmoothQuant factors: compressed-tensors has no place for them "
                             "(fold 1/smooth into the preceding norm, or save in sparseq's format)")
        kinds.add("none" if layer.FORMAT == "int8_weight_only" else
                  ("tensor" if layer.x_scale is not None else "token"))
    if len(kinds) > 1:
        raise ValueError(f"layers mix schemes {sorted(kinds)}: a compressed-tensors export holds one")
    acts = kinds.pop()
    skip = {f"{n}.{b}" for n, m in layers.items() for b in m._buffers}
    # tied tensors (lm_head = embeddings) are stored once and re-tied on load
    tensors, _ = unique_tensors({k: t for k, t in model.state_dict().items() if k not in skip})
    for name, layer in layers.items():
        q = layer.weight_q.detach().cpu()
        scale = _scale_tensor(layer.w_scale.detach().cpu().reshape(-1, 1), layer.dtype)
        if acts == "none":
            tensors[f"{name}.weight_packed"] = pack_int8(q).contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        else:
            tensors[f"{name}.weight"] = q.contiguous()
            if acts == "tensor":
                tensors[f"{name}.input_scale"] = _scale_tensor(layer.x_scale.detach().cpu().reshape(1), layer.dtype)
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    group = {"targets": ["Linear"], "weights": dict(_WEIGHT_ARGS),
             "input_activations": None if acts == "none" else _activation_args(acts == "tensor"),
             "output_activations": None, "format": None}
    quantization_config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized" if acts == "none" else "int-quantized",
        "quantization_status": "compressed", "config_groups": {"group_0": group}, "ignore": ignore,
        "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
        "version": "0.14.0.1",
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path
