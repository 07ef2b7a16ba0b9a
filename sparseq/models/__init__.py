"""Models shipped inside sparseq: a small Llama trained on the bundled Shakespeare plays.

``load_llama()`` returns ``(model, tokenizer)`` offline; ``sparseq.models.train_llama``
is the script that trained it. transformers is imported on first use only.
"""
from __future__ import annotations

from .bundled import BUNDLED_LLAMA_DIR, Perplexity, encode_lines, held_out_lines, held_out_perplexity, load_llama

__all__ = ["BUNDLED_LLAMA_DIR", "Perplexity", "encode_lines", "held_out_lines", "held_out_perplexity", "load_llama"]
