"""Causal-LM scoring: held-out perplexity, next-token top-1 agreement, token-level KL.

A line is scored as ``<s> line </s>`` (``sparseq.models.encode_lines``, the same encoding as
``sparseq.models.held_out_perplexity``): every token after ``<s>`` is predicted from the
tokens before it, with no context from other lines. Padding never counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .progress import progress


@dataclass
class LMScores:
    """Perplexity of a compressed causal LM and its next-token agreement with the dense one."""

    perplexity: float
    dense_perplexity: float
    ppl_ratio: float  # perplexity / dense perplexity (1.0 = no loss)
    top1_agreement: float  # fraction of predicted positions where both argmax tokens agree
    n: int  # lines
    n_tokens: int  # predicted tokens
    columns = (("ppl x", "ppl_ratio"), ("top-1", "top1_agreement"))  # (table header, field): main metric, agreement

    def as_dict(self) -> Dict[str, float]:
        return {"perplexity": self.perplexity, "dense_perplexity": self.dense_perplexity, "ppl_ratio": self.ppl_ratio,
                "top1_agreement": self.top1_agreement, "n": self.n, "n_tokens": self.n_tokens}

    def summary(self) -> str:
        return (f"perplexity {self.perplexity:.2f} (dense {self.dense_perplexity:.2f}, ratio {self.ppl_ratio:.4f}), "
                f"next-token top-1 agreement {self.top1_agreement:.3f}")


@dataclass
class LMReference:
    """The dense model's result on a list of batches: summed NLL and argmax tokens per batch."""

    nll_sum: float
    n_tokens: int
    top1: List[torch.Tensor]  # per batch: argmax of the real predicted positions, flattened
    n_lines: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.n_tokens, 1))


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id (its EOS, then 0, when it has none)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def lm_batches(tokenizer, lines: Sequence[str], batch_size: int, max_length: int = 256) -> List[Dict[str, torch.Tensor]]:
    """Right-padded batches of ``<s> line </s>`` rows of similar length, with ``index`` (line order)."""
    from sparseq.models.bundled import encode_lines

    rows = encode_lines(tokenizer, list(lines), max_length)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "index": torch.tensor(idx)})
    return out


def lm_inputs(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, object]:
    """The keyword arguments of a causal-LM forward (no KV cache: calibration re-runs blocks)."""
    inputs: Dict[str, object] = {k: v.to(device) for k, v in batch.items() if k != "index"}
    inputs["use_cache"] = False
    return inputs


def _targets(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets ``[B, T-1]`` with -100 where the target is padding."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)


def logits_of(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits ``[B, T, V]`` of one batch (gradients flow if enabled)."""
    device = next(model.parameters()).device
    return model(**lm_inputs(batch, device)).logits.float()


@torch.no_grad()
def _batch_result(model: nn.Module, batch: Dict[str, torch.Tensor]) -> tuple:
    logits = logits_of(model, batch)[:, :-1].cpu()
    target = _targets(batch)
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum").item()
    real = target != -100
    return nll, int(real.sum()), logits.argmax(-1)[real]


@torch.no_grad()
def lm_reference(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]], desc: Optional[str] = "dense") -> LMReference:
    """Summed NLL, token count and argmax tokens of ``model`` on ``batches`` (``desc=None``: no progress bar)."""
    was = model.training
    model.eval()
    nll, n, top1 = 0.0, 0, []
    for b in batches if desc is None else progress(batches, desc=desc, unit="batch"):
        s, k, a = _batch_result(model, b)
        nll, n = nll + s, n + k
        top1.append(a)
    model.train(was)
    if n == 0:
        raise ValueError("no predicted tokens: every line is empty after tokenization")
    return LMReference(nll, n, top1, sum(len(b["index"]) for b in batches))


@torch.no_grad()
def lm_compare(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]], ref: LMReference,
               desc: Optional[str] = "score") -> LMScores:
    """Perplexity of ``model`` on ``batches`` and its top-1 agreement with the dense ``ref``."""
    if len(batches) != len(ref.top1):
        raise ValueError(f"the reference has {len(ref.top1)} batches, got {len(batches)}")
    out = lm_reference(model, batches, desc)
    agree = sum(int((a == b).sum()) for a, b in zip(out.top1, ref.top1))
    ppl = out.perplexity
    return LMScores(ppl, ref.perplexity, ppl / ref.perplexity, agree / max(out.n_tokens, 1), out.n_lines, out.n_tokens)


def kl_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
    """``(loss, top-1 agreement)``: mean over real tokens of KL(teacher || student) of the
    next-token distributions (temperature 1), and how often both argmaxes agree."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # [B, T]
    m = attention_mask.to(kl.dtype)
    loss = (kl * m).sum() / m.sum().clamp(min=1)
    agree = ((s.argmax(-1) == t.argmax(-1)).to(kl.dtype) * m).sum() / m.sum().clamp(min=1)
    return loss, float(agree.detach())


def lm_loss_scores(scores: LMScores) -> float:
    """The causal LM's budget metric: perplexity ratio - 1 (0 = as good as dense, never below)."""
    return max(0.0, scores.ppl_ratio - 1.0)


def check_lm_floor(floor: Optional[float]) -> None:
    """A causal LM's floor is a perplexity-ratio ceiling: ValueError unless it is above 1."""
    if floor is not None and not floor > 1.0:
        raise ValueError(f"for a causal LM the floor is the highest perplexity ratio to dense (> 1), got {floor}")
