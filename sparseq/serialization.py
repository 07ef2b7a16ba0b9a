"""Save and load compressed models: safetensors + a JSON manifest, no pickle.

``save(model, dir)`` writes ``model.safetensors`` (every parameter and buffer, compressed
layers as their canonical buffers, non-persistent buffers too) and ``sparseq.json`` (format
version, recipe, per-layer format/shape/options). For a transformers model it also writes
``config.json`` so ``load(dir)`` rebuilds it. ``load`` constructs on the meta device and
assigns the saved tensors: dense weights of compressed layers are never materialized.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .nn.base import CompressedLinear, prepare
from .nn.swap import FORMATS
from .reference import FORMAT_VERSION
from .version import __version__

MANIFEST = "sparseq.json"
WEIGHTS = "model.safetensors"
_NONPERSISTENT = "__nonpersistent__."
_SPEC_FIELDS = ("format", "in_features", "out_features", "bias", "dtype")


def _manifest(model: nn.Module, recipe) -> dict:
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            layers[name] = {
                "format": m.FORMAT,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": m.bias is not None,
                "dtype": str(m.dtype).replace("torch.", ""),
                "options": m.options(),
            }
    kind = "transformers" if hasattr(model, "config") and hasattr(model.config, "to_json_string") else "module"
    return {"sparseq_format_version": FORMAT_VERSION, "sparseq_version": __version__,
            "model": {"kind": kind, "class": type(model).__name__, "modules": [n for n, _ in model.named_modules() if n]}, "recipe": recipe, "layers": layers}


def _tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(tensors to write, aliases)``: tied tensors are written once, ``alias -> stored name``."""
    state = dict(model.state_dict())
    persistent = set(state)
    for name, buf in model.named_buffers():
        if name not in persistent and buf is not None:
            state[_NONPERSISTENT + name] = buf
    return unique_tensors(state)


def unique_tensors(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(tensors, aliases)`` of a state dict with tied tensors (same storage, shape, stride and
    dtype) kept once under their first name; ``aliases`` maps each dropped name to that name.
    Tensors come back detached, contiguous and on the CPU, ready for safetensors."""
    out, seen, aliases = {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), t.shape, t.stride(), t.dtype)
        if t.numel() and key in seen:  # tied weights: stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out, aliases


def save(model: nn.Module, path: Union[str, Path], recipe=None, format: str = "sparseq") -> Path:  # noqa: A002
    """Write ``model`` (swapped or not) to directory ``path``; returns the path.

    ``format="compressed-tensors"`` writes a checkpoint stock vLLM loads without sparseq (W8A8
    or int8 weight-only models; see ``sparseq.integrations.compressed_tensors.save``)."""
    from safetensors.torch import save_file

    if format == "compressed-tensors":
        from .integrations import compressed_tensors

        return compressed_tensors.save(model, path)
    if format != "sparseq":
        raise ValueError(f"format must be 'sparseq' or 'compressed-tensors', got {format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(model, recipe)
    tensors, manifest["aliases"] = _tensors(model)
    tmp = path / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"sparseq_format_version": str(FORMAT_VERSION)})
    tmp.replace(path / WEIGHTS)
    if manifest["model"]["kind"] == "transformers":
        _save_config(model, path, manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def _save_config(model: nn.Module, path: Path, manifest: dict) -> None:
    """``config.json`` with ``quantization_config`` (quant method ``sparseq``: the layer specs)
    when layers are compressed, so transformers' ``from_pretrained`` and vLLM read the model."""
    from .integrations import transformers as hf

    model.config.save_pretrained(str(path))
    file = path / "config.json"
    config = json.loads(file.read_text())
    if manifest["layers"]:
        config["quantization_config"] = hf.quantization_config(manifest)
    elif (config.get("quantization_config") or {}).get("quant_method") == hf.QUANT_METHOD:
        del config["quantization_config"]  # nothing compressed any more
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_manifest(path: Union[str, Path]) -> dict:
    """The manifest of a saved model, checked for a supported format version."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: not a directory written by sparseq.save")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{file} is corrupt: {e}") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{file} is corrupt: expected a JSON object")
    version = manifest.get("sparseq_format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {version!r} is not supported (this sparseq reads {FORMAT_VERSION})")
    for key, kind in (("model", dict), ("layers", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{file} is corrupt: {key!r} missing or not a {kind.__name__}")
    aliases = manifest.setdefault("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"{file} is corrupt: 'aliases' must map tensor names to tensor names")
    model = manifest["model"]
    if not isinstance(model.get("kind", "module"), str) or not isinstance(model.get("class", ""), str) or \
            not isinstance(model.get("modules", []), list) or not all(isinstance(n, str) for n in model.get("modules", [])):
        raise ValueError(f"{file} is corrupt: 'model' must hold a kind and class (text) and a list of module names")
    for name, spec in manifest["layers"].items():
        missing = [f for f in _SPEC_FIELDS if not isinstance(spec, dict) or f not in spec]
        if missing:
            raise ValueError(f"{file} is corrupt: layer {name!r} lacks {missing}")
        check_layer_spec(name, spec)
    return manifest


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RESERVED = ("in_features", "out_features", "bias", "dtype", "device")
"""Constructor arguments the manifest gives as spec fields (or the loader decides), never as options."""


def _layer_options(name: str, fmt: str, cls: type, fixed: dict, options: object) -> dict:
    """The saved options checked against ``cls``'s constructor: known keys, the types of the
    defaults, the format's fixed options not contradicted."""
    if not isinstance(options, dict):
        raise ValueError(f"layer {name!r}: options must be a JSON object, got {type(options).__name__}")
    params = inspect.signature(cls.__init__).parameters
    for key, value in options.items():
        if key in _RESERVED:
            raise ValueError(f"layer {name!r}: option {key!r} is reserved (set by the manifest or by load), "
                             "remove it from the layer's options")
        if key not in params or key == "self":
            known = sorted(p for p in params if p not in _RESERVED and p != "self")
            raise ValueError(f"layer {name!r}: unknown option {key!r} for {cls.__name__} (known: {known})")
        default = params[key].default
        if default is not inspect.Parameter.empty and type(value) is not type(default):
            raise ValueError(f"layer {name!r}: option {key!r} must be a {type(default).__name__}, "
                             f"got {value!r}")
        if key in fixed and value != fixed[key]:
            raise ValueError(f"layer {name!r}: option {key}={value!r} contradicts format {fmt!r} "
                             f"(which has {key}={fixed[key]!r})")
    return {**options, **fixed}


def check_layer_spec(name: str, spec: dict) -> Tuple[type, torch.dtype, dict]:
    """``(layer class, dtype, constructor options)`` of a manifest entry, every field checked."""
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"layer {name!r}: unknown format {fmt!r}")
    cls, fixed = FORMATS[fmt]
    for dim in ("in_features", "out_features"):
        value = spec[dim]
        if type(value) is not int or value <= 0:
            raise ValueError(f"layer {name!r}: {dim} must be a positive integer, got {value!r}")
    if type(spec["bias"]) is not bool:
        raise ValueError(f"layer {name!r}: bias must be true or false, got {spec['bias']!r}")
    dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"layer {name!r}: dtype must be one of {sorted(_DTYPES)}, got {spec['dtype']!r}")
    return cls, dtype, _layer_options(name, fmt, cls, fixed, spec.get("options", {}))


def _empty_layer(name: str, spec: dict) -> CompressedLinear:
    cls, dtype, options = check_layer_spec(name, spec)
    try:
        return cls(spec["in_features"], spec["out_features"], spec["bias"], dtype, device="meta", **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"layer {name!r}: {e}") from None


def _skeleton(path: Path, manifest: dict) -> nn.Module:
    if manifest["model"].get("kind") != "transformers":
        raise ValueError(f"{path} holds a plain nn.Module: pass the model to load into, sparseq.load(model, path)")
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path))
    cls = getattr(transformers, manifest["model"].get("class", ""), None)
    with torch.device("meta"):
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model = cls(config)  # the saved class (a task head, not just the base model)
        else:
            model = AutoModel.from_config(config)
    saved = set(manifest["model"].get("modules", []))
    for name, _ in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if name and name not in saved and (not parent_name or parent_name in saved):
            # a submodule the saved model did not have (e.g. a pooler built with add_pooling_layer=False)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, None)
    return model


def put_layers(model: nn.Module, manifest: dict) -> None:
    """Replace each module named in ``manifest["layers"]`` with an empty sparseq layer of its
    spec (buffers filled by a later state-dict load); used by ``load`` and transformers'
    ``from_pretrained`` (sparseq.integrations.transformers)."""
    for name, spec in manifest["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"layer {name!r} of the manifest is not in the model") from e
        if not isinstance(old, (nn.Linear, CompressedLinear)):
            raise ValueError(f"layer {name!r} is a {type(old).__name__}, expected nn.Linear")
        if (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"layer {name!r}: saved shape {spec['out_features']}x{spec['in_features']} "
                             f"does not match the model's {old.out_features}x{old.in_features}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, _empty_layer(name, spec))


def _where(key: str) -> str:
    owner, _, attr = key.rpartition(".")
    return f"layer {owner!r}, tensor {attr!r}" if owner else f"tensor {attr!r}"


def _assign(model: nn.Module, tensors: Dict[str, torch.Tensor], manifest: dict) -> None:
    for alias, stored in manifest.get("aliases", {}).items():
        if stored not in tensors:
            raise ValueError(f"{_where(alias)}: tied to {stored!r}, which is missing from the saved file")
        tensors[alias] = tensors[stored]
    nonpersistent = {k[len(_NONPERSISTENT):]: v for k, v in tensors.items() if k.startswith(_NONPERSISTENT)}
    state = {k: v for k, v in tensors.items() if not k.startswith(_NONPERSISTENT)}
    expected = model.state_dict()
    compressed = {n for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    for key, t in state.items():
        want = expected.get(key)
        if want is None:
            continue
        if tuple(want.shape) != tuple(t.shape):
            raise ValueError(f"{_where(key)}: saved shape {tuple(t.shape)} != expected {tuple(want.shape)}")
        if key.rpartition(".")[0] in compressed and want.dtype != t.dtype:
            raise ValueError(f"{_where(key)}: saved dtype {t.dtype} != expected {want.dtype}")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"saved tensors not in the model: {result.unexpected_keys[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, buf in nonpersistent.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.register_buffer(attr, buf, persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"missing from the saved file: {_where(left[0])}" +
                         (f" and {len(left) - 1} more: {left[1:5]}" if len(left) > 1 else ""))


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors are on the meta device (its own weights are not
    copied): filled on success, dropped on error, so the caller's model survives errors."""
    import copy

    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def load(path_or_model: Union[str, Path, nn.Module], path: Optional[Union[str, Path]] = None,
         device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a model written by ``save``.

    ``load(dir)`` rebuilds a transformers model from its saved config (a compressed-tensors
    checkpoint too: 2:4 ``sparse-24-bitmask`` and int8 ``int-quantized`` layers become sparseq
    layers, see ``sparseq.integrations.compressed_tensors``); ``load(model, dir)``
    swaps and fills a model you constructed (the same architecture; build it under
    ``torch.device("meta")`` to skip allocating its dense weights at all). ``device`` is where
    the tensors land (kernels are prepared there). Errors name the layer or tensor; nothing
    half-loaded is returned (a given model is left untouched on error).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if isinstance(path_or_model, nn.Module):
        if path is None:
            raise TypeError("load(model, path): path is required when a model is given")
        target, root = path_or_model, Path(path)
    else:
        target, root = None, Path(path_or_model)
    if not (root / MANIFEST).exists():
        from .integrations import compressed_tensors, transformers as hf

        if hf.is_checkpoint(root):  # written by save_pretrained of a from_pretrained model
            if target is not None:
                raise ValueError(f"{root} was written by save_pretrained (no {MANIFEST}): load it with "
                                 "sparseq.load(path), which builds the model from its config")
            return hf.load_pretrained(root, device)

        if compressed_tensors.is_checkpoint(root):
            if target is not None:
                raise ValueError(f"{root} is a compressed-tensors checkpoint: load it with sparseq.load(path), "
                                 "which builds the model from its config")
            return compressed_tensors.load(root, device)
    manifest = read_manifest(root)
    try:
        tensors = load_file(str(root / WEIGHTS), device=str(device))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise ValueError(f"{root / WEIGHTS} is missing or corrupt: {e}") from e
    model = _skeleton(root, manifest) if target is None else _meta_copy(target)
    put_layers(model, manifest)
    _assign(model, tensors, manifest)
    model.eval()
    if torch.device(device).type == "cuda":
        prepare(model)  # kernel layouts on the GPU now, not in the first forward
    if target is not None:
        target.__dict__.update(model.__dict__)
        return target
    return model
