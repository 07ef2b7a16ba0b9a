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

from ...nn.base import CompressedLinear
from . import QUANT_METHOD
from .specs import LayerSpec, check_dtype, parse_manifest, rename_layers, resolve

logger = init_logger(__name__)

MANIFEST = "sparseq.json"
_NONPERSISTENT = "__nonpersistent__."  # sparseq.save's prefix for non-persistent buffers


class PartsInputParameter(BasevLLMParameter):
    """One ``[K]`` row per part of a merged column-parallel layer (SmoothQuant factors: each of
    q/k/v or gate/up has its own). The parts' loaders write their row; K is never sharded in a
    column-parallel layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @property
    def input_dim(self) -> int:
        return 1

    def _load_part(self, loaded_weight: Tensor, shard_id) -> None:
        row = self.data[self._shard_id_as_int(shard_id)]
        assert row.shape == loaded_weight.shape, (row.shape, loaded_weight.shape)
        row.copy_(loaded_weight)

    def load_merged_column_weight(self, loaded_weight: Tensor, **kwargs) -> None:
        self._load_part(loaded_weight, kwargs["shard_id"])

    def load_qkv_weight(self, loaded_weight: Tensor, **kwargs) -> None:
        self._load_part(loaded_weight, kwargs["shard_id"])

    def load_column_parallel_weight(self, loaded_weight: Tensor) -> None:
        self.data.copy_(loaded_weight.expand_as(self.data))  # one tensor for the fused layer


@register_weight_loader_v2_supported_method
class SparseqLinearMethod(LinearMethodBase):
    """One vLLM linear layer (possibly merged) in one sparseq format."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec

    # ------------------------------------------------------------------ weights
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        spec = self.spec
        check_dtype(params_dtype)
        weight_loader = extra_weight_attrs.pop("weight_loader")
        n_parts = len(output_partition_sizes)
        where = f"sparseq: vLLM layer {spec.prefix!r} ({spec.format}, from {', '.join(spec.parts)})"
        if n_parts != len(spec.parts):
            raise ValueError(f"{where}: vLLM splits it into {n_parts} parts, the manifest names {len(spec.parts)}")
        if input_size != spec.in_features:
            raise ValueError(f"{where}: in_features {spec.in_features} in sparseq.json, vLLM builds {input_size}")
        full_sizes = list(getattr(layer, "output_sizes", None) or [output_size])
        replicated = getattr(layer, "num_kv_head_replicas", 1) > 1  # tp > KV heads: k/v sizes count replicas
        if not replicated and [int(s) for s in full_sizes] != list(spec.out_features):
            raise ValueError(f"{where}: out_features {list(spec.out_features)} in sparseq.json, "
                             f"vLLM builds {full_sizes}")
        k = input_size_per_partition
        if spec.format.startswith("2:4") and k % 8:
            raise ValueError(f"{where}: 2:4 layers shard K at multiples of 8; this rank gets K = {k} "
                             "(use a tensor-parallel size that splits K into multiples of 8)")
        n = sum(output_partition_sizes)
        buffers = spec.buffers()
        value_dtype = torch.int8 if spec.format.startswith("2:4+") else params_dtype

        def add(name: str, param: BasevLLMParameter) -> None:
            layer.register_parameter(name, param)

        # Unloaded parts stay invalid (NaN scales, code 15 meta) so the load-time check names them.
        if "values" in buffers:
            data = torch.full((n, k // 2), float("nan"), dtype=value_dtype) if value_dtype.is_floating_point \
                else torch.zeros(n, k // 2, dtype=value_dtype)
            add("values", PackedvLLMParameter(data=data, input_dim=1, output_dim=0, packed_dim=1, packed_factor=2,
                                              weight_loader=weight_loader))
            add("meta", PackedvLLMParameter(data=torch.full((n, k // 8), 0xFF, dtype=torch.uint8), input_dim=1,
                                            output_dim=0, packed_dim=1, packed_factor=8, weight_loader=weight_loader))
        if "weight_q" in buffers:
            add("weight_q", ModelWeightParameter(data=torch.zeros(n, k, dtype=torch.int8), input_dim=1, output_dim=0,
                                                 weight_loader=weight_loader))
        if "w_scale" in buffers:
            add("w_scale", ChannelQuantScaleParameter(data=torch.full((n,), float("nan")), output_dim=0,
                                                      weight_loader=weight_loader))
        if "smooth" in buffers:
            if n_parts == 1:
                add("smooth", RowvLLMParameter(data=torch.full((k,), float("nan")), input_dim=0,
                                               weight_loader=weight_loader))
            else:
                add("smooth", PartsInputParameter(data=torch.full((n_parts, k), float("nan")),
                                                  weight_loader=weight_loader))
        if "x_scale" in buffers:
            add("x_scale", PerTensorScaleParameter(data=torch.full((n_parts,), float("nan")),
                                                   weight_loader=weight_loader))
        layer.sparseq_spec = spec
        layer.sparseq_part_sizes = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        spec = self.spec
        bias = getattr(layer, "bias", None)
        row_parallel = isinstance(layer, RowParallelLinear)
        fused_bias = bias is not None and not getattr(layer, "skip_bias_add", False) \
            and not (row_parallel and getattr(layer, "tp_rank", 0) > 0)
        runner = _Runner(layer, spec, layer.params_dtype)
        runner.build(fused=fused_bias)
        layer.sparseq_runner = runner  # a plain object, not a submodule: vLLM sees only its parameters

    def apply(self, layer: nn.Module, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return layer.sparseq_runner(x, bias)

    def dequantize_weight(self, layer: nn.Module) -> Tensor:
        return layer.sparseq_runner.dense_weight()


class _Runner:
    """The sparseq layer(s) of one vLLM layer: one over all of N, or one per merged part where
    the parts quantize their activations differently (their own SmoothQuant factors or static
    scales); built with the bias fused (what vLLM passes) and, only if asked for, without."""

    def __init__(self, layer: nn.Module, spec: LayerSpec, dtype: torch.dtype) -> None:
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

    def _state(self, part: Optional[int], fused: bool) -> Dict[str, Tensor]:
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

    def build(self, fused: bool) -> List[CompressedLinear]:
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
                raise type(e)(f"sparseq: vLLM layer {self.spec.prefix!r} ({self.spec.format}), {what}: {e} "
                              "(a missing or corrupt tensor in the checkpoint)") from None
            sl.eval()
            sl.prepare()  # kernel layouts / dense copies / oneDNN packing now, not in the first forward
            layers.append(sl)
        self.variants[fused] = layers
        return layers

    def __call__(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        if bias is not None and bias is self.bias and True in self.variants:
            return self._run(self.variants[True], x)
        y = self._run(self.variants.get(False) or self.build(False), x)
        return y if bias is None else y + bias

    @staticmethod
    def _run(layers: List[CompressedLinear], x: Tensor) -> Tensor:
        if len(layers) == 1:
            return layers[0](x)
        return torch.cat([sl(x) for sl in layers], dim=-1)

    def dense_weight(self) -> Tensor:
        layers = next(iter(self.variants.values()))
        return torch.cat([sl.dense_weight(self.dtype) for sl in layers], dim=0)


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
            raise ValueError(f"sparseq: {prefix!r} is compressed in sparseq.json, but vLLM runs it as an "
                             "embedding / LM head, which the sparseq plugin does not compress; keep it dense "
                             "(recipe {'lm_head': 'dense', ...})")
        return None


def describe_model(model: nn.Module) -> Dict[str, dict]:
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        row: Dict[str, Any] = {"method": type(module.quant_method).__name__}
        runner = getattr(module, "sparseq_runner", None)
        if runner is not None:
            layers = [sl for variant in runner.variants.values() for sl in variant]
            row["sparseq"] = [f"{type(sl).__name__}({sl.FORMAT})" for sl in layers]
            row["backends"] = sorted({b for sl in layers for b in sl.backends.values()})
            row["split_parts"] = bool(runner.split)
        out[name] = row
    return out


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
