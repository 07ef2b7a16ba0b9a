"""Load the bundled Shakespeare Llama offline and score its held-out perplexity.

A line is scored as ``<s> line </s>``: every token after ``<s>`` (the ``</s>`` included) is
predicted from the tokens before it, with no context from other lines.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

BUNDLED_LLAMA_DIR = Path(__file__).resolve().parent / "llama_shakespeare"
"""config.json, model.safetensors and tokenizer files of the bundled decoder."""


class Perplexity(NamedTuple):
    """exp(mean negative log-likelihood per predicted token) over ``n_lines`` lines."""

    perplexity: float
    nll: float
    n_lines: int
    n_tokens: int


def load_llama(model_dir: Optional[os.PathLike] = None, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, object]:
    """``(LlamaForCausalLM, tokenizer)`` from ``model_dir`` (default: the bundled one), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = Path(model_dir) if model_dir is not None else BUNDLED_LLAMA_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def held_out_lines(n_lines: int = 1200) -> List[str]:
    """The evaluation lines of ``sparseq compress``: spread over the six evaluation plays."""
    from sparseq.compress.data import bundled_texts

    return bundled_texts(n_calib=1, n_eval=n_lines, n_train=0).eval


def encode_lines(tokenizer, lines: Sequence[str], max_len: int) -> List[List[int]]:
    """``[<s>] + tokens + [</s>]`` for each line, cut to ``max_len`` tokens."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenizer(list(lines), add_special_tokens=False)["input_ids"]
    return [([bos] + row + [eos])[:max_len] for row in ids]


@torch.no_grad()
def held_out_perplexity(model: nn.Module, tokenizer, lines: Optional[Sequence[str]] = None,
                        n_lines: int = 1200, batch_size: int = 64) -> Perplexity:
    """Per-token perplexity of ``model`` on ``lines`` (default: ``held_out_lines(n_lines)``)."""
    lines = held_out_lines(n_lines) if lines is None else list(lines)
    if not lines:
        raise ValueError("held_out_perplexity needs at least one line")
    rows = encode_lines(tokenizer, lines, model.config.max_position_embeddings)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_nll += nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                 reduction="sum").item()
        total_tokens += int((target != -100).sum())
    model.train(was_training)
    nll = total_nll / total_tokens
    return Perplexity(math.exp(nll), nll, len(lines), total_tokens)
