"""The SGLang classes of the sparseq plugin: ``SparseqConfig`` (quantization method ``sparseq``)
and ``SparseqLinearMethod``. Imports SGLang; ``sparseq.integrations.sglang.register`` loads it.

SGLang's linear layers, parameter classes and quantization interfaces are adapted from vLLM's
(``sglang/srt/layers/linear.py``, ``parameter.py``, ``quantization/base_config.py`` in SGLang
0.5.23), so a layer runs as in the vLLM plugin, through ``sparseq.integrations.serving``:
``create_weights`` declares the format's canonical buffers as SGLang parameters (SGLang's
``weight_loader_v2`` shards and merges them), ``process_weights_after_loading`` builds the sparseq
layer around the loaded tensors and resolves its kernels once, ``apply`` calls it. SGLang has no
registration function for quantization methods: ``register`` adds the config class to its
registry dicts and the ``--quantization`` choices, and the method to the weight-loader-v2 list.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from sglang.srt.distributed.utils import get_group_rank_size
from sglang.srt.layers import linear as sglang_linear
from sglang.srt.layers.linear import LinearBase, RowParallelLinear
from sglang.srt.layers.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
    RowvLLMParameter,
)
from sglang.srt.layers.quantization.base_config import LinearMethodBase, QuantizationConfig, QuantizeMethodBase
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

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

ENGINE = "SGLang"


class PartsInputParameter(PartsInputMixin, BasevLLMParameter):
    """SmoothQuant factors of a merged layer, one ``[K]`` row per part (``serving.PartsInputMixin``)."""


PARAMETERS = ParameterClasses(packed=PackedvLLMParameter, weight=ModelWeightParameter,
                              channel=ChannelQuantScaleParameter, row=RowvLLMParameter,
                              per_tensor=PerTensorScaleParameter, parts_input=PartsInputParameter)


class SparseqLinearMethod(LinearMethodBase):
    """One SGLang linear layer (possibly merged) in one sparseq format."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        declare_weights(layer, self.spec, PARAMETERS, input_size_per_partition=input_size_per_partition,
                        output_partition_sizes=output_partition_sizes, input_size=input_size,
                        output_size=output_size, params_dtype=params_dtype,
                        weight_loader=extra_weight_attrs["weight_loader"], engine=ENGINE)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        rank, _ = get_group_rank_size(getattr(layer, "tp_group", None))
        attach_runner(layer, self.spec, rank=rank, row_parallel=isinstance(layer, RowParallelLinear), engine=ENGINE)

    def apply(self, layer: nn.Module, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return layer.sparseq_runner(x, bias)


class SparseqConfig(QuantizationConfig):
    """Quantization method ``sparseq``: per-layer formats from a sparseq manifest."""

    def __init__(self, layers: Dict[str, dict], packed_modules_mapping: Optional[Mapping] = None) -> None:
        super().__init__()
        self.layers = layers
        if packed_modules_mapping:
            self.packed_modules_mapping = dict(packed_modules_mapping)

    def __repr__(self) -> str:
        return f"SparseqConfig({len(self.layers)} compressed layers)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> List[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the GPUs sparseq's kernels target (sm80-sm90)

    @staticmethod
    def get_config_filenames() -> List[str]:
        return [MANIFEST]

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SparseqConfig":
        """From ``sparseq.json`` or ``config.json``'s ``quantization_config`` (SGLang adds
        ``packed_modules_mapping`` and, for the latter, ``hf_config``). A ``quantization_config``
        that only says ``quant_method: "sparseq"`` reads ``sparseq.json`` of the model folder."""
        config = dict(config)
        packed = config.pop("packed_modules_mapping", None)
        hf_config = config.pop("hf_config", None)
        if "layers" not in config and config.get("quant_method") == QUANT_METHOD:
            config = _read_manifest(getattr(hf_config, "_name_or_path", None))
        return cls(parse_manifest(config), packed)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if isinstance(layer, LinearBase):
            spec = resolve(self.layers, prefix, self.packed_modules_mapping, engine=ENGINE)
            return UnquantizedLinearMethod() if spec is None else SparseqLinearMethod(spec)
        if isinstance(layer, VocabParallelEmbedding) and prefix in self.layers:
            raise embedding_refusal(prefix, "SGLang")
        return None

    def get_scaled_act_names(self) -> List[str]:
        return []

    def apply_weight_name_mapper(self, hf_to_sglang_mapper) -> None:
        rename = getattr(hf_to_sglang_mapper, "map_name", None) or hf_to_sglang_mapper._map_name
        self.layers = rename_layers(self.layers, rename)


def _read_manifest(model_dir: Optional[str]) -> dict:
    path = os.path.join(model_dir or "", MANIFEST)
    if not model_dir or not os.path.isfile(path):
        raise ValueError(f"sparseq: config.json's quantization_config names quant_method 'sparseq' without "
                         f"'layers', and there is no {MANIFEST} in the model folder {model_dir!r}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def describe_model(model: nn.Module) -> Dict[str, dict]:
    return describe_layers(model, LinearBase)


def register() -> None:
    """Register quantization method ``sparseq`` with SGLang (idempotent): the config class in
    ``QUANTIZATION_METHODS`` (and the CPU subset, which SGLang consults on AMX CPUs), the name in
    the ``--quantization`` choices, the linear method in ``WEIGHT_LOADER_V2_SUPPORTED``."""
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES, add_quantization_method_choices
    from sglang.srt.layers import quantization

    quantization.QUANTIZATION_METHODS[QUANT_METHOD] = SparseqConfig
    quantization.CPU_QUANTIZATION_METHODS[QUANT_METHOD] = SparseqConfig
    if QUANT_METHOD not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([QUANT_METHOD])
    if SparseqLinearMethod.__name__ not in sglang_linear.WEIGHT_LOADER_V2_SUPPORTED:
        sglang_linear.WEIGHT_LOADER_V2_SUPPORTED.append(SparseqLinearMethod.__name__)
