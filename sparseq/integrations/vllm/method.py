"""The vLLM classes of the sparseq plugin: ``SparseqConfig`` (quantization method ``sparseq``)
and ``SparseqLinearMethod``. Imports vLLM; ``sparseq.integrations.vllm.register`` loads it.

How a layer runs: ``create_weights`` declares the format's canonical buffers as vLLM
parameters (so vLLM's own loaders shard and merge them: tensor parallelism, ``qkv_proj``,
``gate_up_proj``), ``process_weights_after_loading`` builds the sparseq layer object
(``Sparse24Linear``, ``Int8Linear``, ...) around the loaded tensors on the layer's device (no
copy: its buffers are the vLLM parameters' storage) and resolves its kernels once, and
``apply`` calls it: sparseq's dispatch picks the GPU kernels on a GPU and the CPU path on CPU.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
    RowvLLMParameter,
)

from ..serving import (
    MANIFEST,
    LayerSpec,
    ParameterClasses,
    PartsInputMixin,
    attach_runner,
    declare_weights,
    describe_layers,
    embedding_refusal,
    parse_manifest,
    rename_layers,
    resolve,
)
from . import QUANT_METHOD

logger = init_logger(__name__)

_NONPERSISTENT = "__nonpersistent__."  # sparseq.save's prefix for non-persistent buffers


class PartsInputParameter(PartsInputMixin, BasevLLMParameter):
    """SmoothQuant factors of a merged layer, one ``[K]`` row per part (``serving.PartsInputMixin``)."""


PARAMETERS = ParameterClasses(packed=PackedvLLMParameter, weight=ModelWeightParameter,
                              channel=ChannelQuantScaleParameter, row=RowvLLMParameter,
                              per_tensor=PerTensorScaleParameter, parts_input=PartsInputParameter)


@register_weight_loader_v2_supported_method
class SparseqLinearMethod(LinearMethodBase):
    """One vLLM linear layer (possibly merged) in one sparseq format."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec

    # ------------------------------------------------------------------ weights
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        declare_weights(layer, self.spec, PARAMETERS, input_size_per_partition=input_size_per_partition,
                        output_partition_sizes=output_partition_sizes, input_size=input_size,
                        output_size=output_size, params_dtype=params_dtype,
                        weight_loader=extra_weight_attrs["weight_loader"], engine="vLLM")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        attach_runner(layer, self.spec, rank=getattr(layer, "tp_rank", 0),
                      row_parallel=isinstance(layer, RowParallelLinear), engine="vLLM")

    def apply(self, layer: nn.Module, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return layer.sparseq_runner(x, bias)

    def dequantize_weight(self, layer: nn.Module) -> Tensor:
        return layer.sparseq_runner.dense_weight()


class SparseqConfig(QuantizationConfig):
    """Quantization method ``sparseq``: per-layer formats from a sparseq manifest."""

    def __init__(self, layers: Optional[Dict[str, dict]] = None) -> None:
        super().__init__()
        self.layers = layers  # None until maybe_update_config reads sparseq.json
        self._counts: Dict[str, int] = {}

    def __repr__(self) -> str:
        return f"SparseqConfig({len(self.layers or {})} compressed layers)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> List[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the GPUs sparseq's kernels target (sm80-sm90); CPUs have no capability check

    @staticmethod
    def get_config_filenames() -> List[str]:
        return [MANIFEST]

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SparseqConfig":
        """From ``sparseq.json`` (what vLLM finds in the model folder), or from a
        ``quantization_config`` with ``quant_method: "sparseq"`` (its ``layers``, or, without
        them, ``sparseq.json`` of the model folder, read in ``maybe_update_config``)."""
        if isinstance(config, dict) and "layers" not in config and config.get("quant_method") == QUANT_METHOD:
            return cls(None)
        return cls(parse_manifest(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        if self.layers is not None:
            return
        path = os.path.join(model_name, MANIFEST)
        if not os.path.isfile(path):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model_name, MANIFEST, revision=revision)
        with open(path, encoding="utf-8") as f:
            self.layers = parse_manifest(json.load(f))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.layers is not None:
            self.layers = rename_layers(self.layers, hf_to_vllm_mapper.map_name)

    @staticmethod
    def get_checkpoint_weight_mapper():
        from vllm.model_executor.models.utils import WeightsMapper

        # sparseq.save also stores non-persistent buffers (rotary inv_freq): vLLM computes its own.
        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_prefix={_NONPERSISTENT: None})

    def get_quant_method(self, layer: nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if self.layers is None:
            raise RuntimeError("sparseq: the manifest (sparseq.json) was not read before the model was built")
        if isinstance(layer, LinearBase):
            spec = resolve(self.layers, prefix, self.packed_modules_mapping)
            if spec is None:
                self._counts["dense"] = self._counts.get("dense", 0) + 1
                return UnquantizedLinearMethod()
            self._counts[spec.format] = self._counts.get(spec.format, 0) + 1
            logger.debug("sparseq: %s -> %s (%s)", prefix, spec.format, ", ".join(spec.parts))
            return SparseqLinearMethod(spec)
        if isinstance(layer, VocabParallelEmbedding) and prefix in self.layers:
            raise embedding_refusal(prefix, "vLLM")
        return None


def describe_model(model: nn.Module) -> Dict[str, dict]:
    return describe_layers(model, LinearBase)


def register() -> None:
    """Register quantization method ``sparseq`` with vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    if QUANT_METHOD in QUANTIZATION_METHODS:
        try:
            if get_quantization_config(QUANT_METHOD) is SparseqConfig:
                return
        except Exception:  # noqa: BLE001 (re-register below)
            pass
    register_quantization_config(QUANT_METHOD)(SparseqConfig)
