"""Hugging Face transformers integration: quantization method ``sparseq`` for ``from_pretrained``.

``sparseq.save`` writes ``quantization_config = {"quant_method": "sparseq",
"sparseq_format_version": ..., "layers": {...}}`` into ``config.json`` (the per-layer specs of
``sparseq.json``; vLLM's plugin reads the same object). With sparseq imported,
``AutoModelForCausalLM.from_pretrained(dir)`` then builds the model on the meta device, swaps
the listed ``nn.Linear`` modules for empty sparseq layers (``SparseqHfQuantizer``, the
before-loading hook), and transformers loads the canonical compressed buffers straight into
them: no dense weight of a compressed layer is ever materialized. ``save_pretrained`` writes
the same tensors back.

Registration is lazy: ``import sparseq`` calls ``install()``, which registers at once when
transformers' quantizer registry is already imported, and otherwise adds an import hook that
registers right after ``transformers.quantizers.auto`` executes (importing sparseq never
imports transformers). Written against transformers 5.24 (``register_quantization_config`` /
``register_quantizer`` of ``transformers.quantizers``).
"""
from __future__ import annotations

import importlib.abc
import json
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Optional

QUANT_METHOD = "sparseq"
_AUTO = "transformers.quantizers.auto"
_lock = threading.Lock()
_classes: Dict[str, type] = {}


def quantization_config(manifest: dict) -> dict:
    """The ``quantization_config`` object of ``config.json`` for a sparseq manifest."""
    return {"quant_method": QUANT_METHOD, "sparseq_format_version": manifest["sparseq_format_version"],
            "layers": manifest["layers"]}


def is_checkpoint(path: Path) -> bool:
    """True when ``path/config.json`` has a ``quantization_config`` with ``quant_method: sparseq``."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


# ----------------------------------------------------------------------------- registration
def register() -> None:
    """Register the ``sparseq`` quantization config and quantizer with transformers (imports it;
    safe to call more than once)."""
    from transformers.quantizers import auto

    with _lock:
        if not _classes:
            _classes.update(_build_classes())
        config_cls, quantizer_cls = _classes["config"], _classes["quantizer"]
        if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not config_cls:
            auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
            auto.register_quantization_config(QUANT_METHOD)(config_cls)
        if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not quantizer_cls:
            auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
            auto.register_quantizer(QUANT_METHOD)(quantizer_cls)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``transformers.quantizers.auto`` so that
    ``register()`` runs right after that module executes, then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO:
            return None
        _remove_hook()
        spec = None
        for finder in sys.meta_path:  # the finder that would have found it without this hook
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):  # get_source, get_filename, ...: the real loader's
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        sys.modules[module.__name__] = module  # register() imports it by name
        try:
            register()
        except Exception as e:  # noqa: BLE001  an incompatible transformers must not break its own import
            import warnings

            warnings.warn(f"sparseq: could not register quantization method 'sparseq' with transformers "
                          f"({type(e).__name__}: {e}); from_pretrained of sparseq models will not work", RuntimeWarning)


_hook: Optional[_RegisterAfterImport] = None


def _remove_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Make ``from_pretrained`` understand ``quant_method: "sparseq"`` without importing
    transformers now: register at once if its quantizer registry is loaded, else on its import."""
    global _hook
    if _AUTO in sys.modules:
        register()
        return
    if _hook is None:
        _hook = _RegisterAfterImport()
        sys.meta_path.insert(0, _hook)


# ------------------------------------------------------------------------------ the classes
def _build_classes() -> Dict[str, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class SparseqHfConfig(QuantizationConfigMixin):
        """``quantization_config`` of a sparseq model: the per-layer specs of its manifest."""

        def __init__(self, layers: Optional[Dict[str, dict]] = None, sparseq_format_version: Any = None,
                     quant_method: str = QUANT_METHOD, **kwargs) -> None:
            from .serving import parse_manifest

            if quant_method != QUANT_METHOD:
                raise ValueError(f"sparseq: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
            if kwargs:
                raise ValueError(f"sparseq: unknown quantization_config fields {sorted(kwargs)}")
            self.quant_method = QUANT_METHOD
            self.sparseq_format_version = sparseq_format_version
            # every field checked as sparseq.load checks sparseq.json; errors name the layer
            self.layers = parse_manifest({"sparseq_format_version": sparseq_format_version, "layers": layers})

    class SparseqHfQuantizer(HfQuantizer):
        """Builds sparseq layers on the meta device before loading; checks their buffers after."""

        requires_calibration = True  # loads sparseq-saved models; it does not compress dense ones
        _dtype = None

        def update_dtype(self, dtype):
            self._dtype = dtype  # from_pretrained(dtype=...): the layers follow it after loading
            return dtype

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            _swap_empty_layers(model, self.quantization_config.layers)
            _check_keys(model, checkpoint_files)
            # sparseq.save also stores non-persistent buffers (rotary inv_freq); transformers
            # recomputes its own, so those entries are expected extras
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignore | {r"^__nonpersistent__\."}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            _check_loaded(model, self._dtype)
            return model

        def get_state_dict_and_metadata(self, model):
            from ..reference import FORMAT_VERSION

            return None, {"sparseq_format_version": str(FORMAT_VERSION)}

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    return {"config": SparseqHfConfig, "quantizer": SparseqHfQuantizer}


def _swap_empty_layers(model, layers: Dict[str, dict]) -> None:
    """Replace each manifest layer (an ``nn.Linear`` of the right shape) by an empty sparseq
    layer on the meta device."""
    from ..serialization import put_layers

    put_layers(model, {"layers": layers})


def _check_keys(model, checkpoint_files) -> None:
    """Every buffer of every sparseq layer must be in the checkpoint: transformers would leave a
    missing one as uninitialized memory (it only warns), so its absence is an error here."""
    from safetensors import safe_open

    from ..nn.base import CompressedLinear

    files = [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return
    keys = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.update(f.keys())
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            missing = [b for b, t in module._buffers.items() if t is not None and f"{name}.{b}" not in keys]
            if missing:
                raise ValueError(f"sparseq: layer {name!r} ({type(module).__name__}, format {module.FORMAT!r}): "
                                 f"tensors {missing} missing from the checkpoint")


def _check_loaded(model, dtype=None) -> None:
    """Validate every sparseq layer's buffers as ``load_state_dict`` would (transformers assigns
    them directly), cast layers saved in another float dtype to ``dtype`` (as ``.to(dtype)``
    casts them: scales stay fp32), then let kernels resolve afresh for the loaded values."""
    import torch

    from ..nn.base import CompressedLinear

    for name, module in model.named_modules():
        if not isinstance(module, CompressedLinear):
            continue
        missing = [n for n, b in module.named_buffers() if b.is_meta]
        if missing:
            raise ValueError(f"sparseq: layer {name!r} ({type(module).__name__}): {missing} missing from the checkpoint")
        try:
            module.check_state()
        except (TypeError, ValueError) as e:
            raise type(e)(f"sparseq: layer {name!r} ({type(module).__name__}): {e}") from None
        module.reset()
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != module.dtype:
            module.to(dtype)  # prepares on a GPU itself
        else:
            module._try_prepare()


def load_pretrained(path: Path, device: str = "cpu"):
    """``sparseq.load`` of a directory that ``save_pretrained`` wrote (no ``sparseq.json``): the
    saved architecture class's ``from_pretrained`` through this quantizer."""
    import transformers

    register()
    config = json.loads((Path(path) / "config.json").read_text())
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    return cls.from_pretrained(str(path), device_map=str(device))
