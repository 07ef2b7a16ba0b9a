"""SGLang plugin: serve models written by ``sparseq.save`` with ``--quantization sparseq``.

Installing sparseq registers the entry point ``sparseq = sparseq.integrations.sglang:register`` in
group ``sglang.srt.plugins``; SGLang calls it in every process it starts (``load_plugins()``, before
it parses the server arguments), and it registers quantization method ``sparseq``::

    sglang serve --model-path sparseq-out/my-llama --quantization sparseq
    sglang.Engine(model_path="sparseq-out/my-llama", quantization="sparseq")

The method works as the vLLM plugin's (``sparseq.integrations.vllm``; both share
``sparseq.integrations.serving``): per-layer formats from ``sparseq.json`` (or from
``quantization_config`` with ``quant_method: "sparseq"`` in ``config.json``, which sparseq.save
writes, so the flag is optional), compressed Linear layers run as sparseq layers whose buffers are
SGLang parameters (SGLang's loaders shard N / K for tensor parallelism and merge ``qkv_proj`` and
``gate_up_proj``; merged parts need one format), the rest run SGLang's unquantized method.

Importing this package imports no SGLang; ``register()`` does. Written against SGLang 0.5.23.
"""
from __future__ import annotations

QUANT_METHOD = "sparseq"


def register() -> None:
    """Register quantization method ``sparseq`` with SGLang (the ``sglang.srt.plugins`` entry
    point; safe to call more than once)."""
    from .method import register as _register

    _register()


def describe(model) -> dict:
    """``{SGLang linear layer: {"method", "sparseq", "backends", "split_parts"}}`` of a loaded
    SGLang model: its quant method and, for sparseq layers, the sparseq layer objects and backends."""
    from .method import describe_model

    return describe_model(model)


__all__ = ["QUANT_METHOD", "describe", "register"]
