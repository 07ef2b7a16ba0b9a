"""vLLM plugin: serve models written by ``sparseq.save`` with ``--quantization sparseq``.

Installing sparseq registers the entry point ``sparseq = sparseq.integrations.vllm:register``
in group ``vllm.general_plugins``; vLLM calls it in every process it starts, and it registers
quantization method ``sparseq``::

    vllm serve sparseq-out/my-llama --quantization sparseq
    LLM(model="sparseq-out/my-llama", quantization="sparseq")

vLLM reads the per-layer formats from the model folder's ``sparseq.json`` (or from a
``quantization_config`` with ``quant_method: "sparseq"`` in ``config.json``). Linear layers in
the manifest run as sparseq layers (formats ``2:4``, ``w8a8``, ``int8_weight_only``,
``2:4+w8a8``, ``2:4+int8_weight_only``; sparseq's GPU kernels on a GPU, its CPU path on CPU);
the others (``lm_head``, layers left dense) run vLLM's unquantized method. Merged layers
(``qkv_proj`` = q/k/v, ``gate_up_proj`` = gate/up) need one format for all their parts.
Tensor parallelism: column-parallel layers shard N, row-parallel layers shard K (2:4 at
multiples of 8). Details: ``sparseq.integrations.vllm.method``.

Importing this package imports neither vLLM nor torch kernels; ``register()`` imports vLLM.
"""
from __future__ import annotations

QUANT_METHOD = "sparseq"


def register() -> None:
    """Register quantization method ``sparseq`` with vLLM (the ``vllm.general_plugins`` entry
    point; safe to call more than once)."""
    from .method import register as _register

    _register()


def describe(model) -> dict:
    """``{vLLM linear layer: {"method", "sparseq", "backends", "split_parts"}}`` of a loaded vLLM
    model: its quant method and, for sparseq layers, the sparseq layer objects it runs and the
    backends they resolved (e.g. ``LLM(...).apply_model(describe)``)."""
    from .method import describe_model

    return describe_model(model)


__all__ = ["QUANT_METHOD", "describe", "register"]
