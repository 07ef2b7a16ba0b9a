"""Accuracy of a compressed sentence encoder against its dense original.

Sentence embedding = mean pooling over tokens + L2 norm. Metrics: mean cosine similarity
of compressed vs dense embeddings, and nearest-neighbour agreement (for each sentence, is
its most similar other sentence the same one under both models?).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from .progress import progress


@dataclass
class Scores:
    """Accuracy of a compressed model against the dense one on the same sentences."""

    cosine: float
    cosine_min: float
    nn_agreement: float
    n: int
    columns = (("cosine", "cosine"), ("NN agr.", "nn_agreement"))  # (table header, field): main metric, agreement

    def as_dict(self) -> Dict[str, float]:
        return {"cosine": self.cosine, "cosine_min": self.cosine_min, "nn_agreement": self.nn_agreement, "n": self.n}

    def summary(self) -> str:
        return f"cosine {self.cosine:.4f} (min {self.cosine_min:.3f}), nearest-neighbour agreement {self.nn_agreement:.3f}"


def batches_by_length(tokenizer, lines: Sequence[str], batch_size: int, max_length: int = 128) -> List[Dict[str, torch.Tensor]]:
    """Tokenized batches of similar-length lines (less padding), in the order of ``lines``."""
    lengths = [len(tokenizer.tokenize(s)) for s in lines]
    order = sorted(range(len(lines)), key=lambda i: lengths[i])
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([lines[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        enc = dict(enc)
        enc["index"] = torch.tensor(idx)
        out.append(enc)
    return out


def model_inputs(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """The tensors a transformers encoder takes, on ``device`` (drops our bookkeeping keys)."""
    return {k: v.to(device) for k, v in batch.items() if k != "index"}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalized mean of the token states where ``attention_mask`` is 1."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def encode(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings of one tokenized batch (gradients flow if enabled)."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    hidden = model(**inputs).last_hidden_state
    return mean_pool(hidden, inputs["attention_mask"])


@torch.no_grad()
def embed(model: nn.Module, batches: List[Dict[str, torch.Tensor]], desc: str = "embed") -> torch.Tensor:
    """Embeddings ``[n, d]`` of all batches, rows in the original line order."""
    n = sum(len(b["index"]) for b in batches)
    out = None
    for b in progress(batches, desc=desc, unit="batch"):
        e = encode(model, b).cpu()
        if out is None:
            out = torch.empty(n, e.shape[1])
        out[b["index"]] = e
    return out


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row (cosine; embeddings are normalized)."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=1)


def compare(dense: torch.Tensor, compressed: torch.Tensor) -> Scores:
    """Cosine and neighbour agreement of ``compressed`` embeddings against ``dense`` ones."""
    if dense.shape != compressed.shape:
        raise ValueError(f"embedding shapes differ: {tuple(dense.shape)} vs {tuple(compressed.shape)}")
    cos = torch.nn.functional.cosine_similarity(dense, compressed, dim=-1)
    agree = (nearest_neighbours(dense) == nearest_neighbours(compressed)).float().mean()
    return Scores(float(cos.mean()), float(cos.min()), float(agree), int(dense.shape[0]))
