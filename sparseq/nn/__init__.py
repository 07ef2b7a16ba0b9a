"""sparseq.nn: drop-in sparse / int8 replacements for ``nn.Linear`` and ``swap``."""
from .base import CompressedLinear, prepare
from .layers import Int8Linear, Int8WeightOnlyLinear, Sparse24Int8Linear, Sparse24Linear
from .lora import LoRACompressedLinear, add_lora, lora_config, merge_lora, recompress, register_peft
from .swap import FORMATS, SwapReport, format_for, make_layer, swap

__all__ = [
    "CompressedLinear",
    "Sparse24Linear",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "Sparse24Int8Linear",
    "FORMATS",
    "SwapReport",
    "format_for",
    "make_layer",
    "swap",
    "prepare",
    "recompress",
    "lora_config",
    "register_peft",
    "LoRACompressedLinear",
    "add_lora",
    "merge_lora",
]
