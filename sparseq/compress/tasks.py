"""The task seam: what "accuracy" means for a model, so the algorithms stay model-agnostic.

A task gives the workflow everything that depends on what the model is for:

- calibration inputs (tokenized batches) and the forward keyword arguments,
- the repeated blocks calibrated one at a time,
- the evaluation against the dense model (``reference`` once, then ``score``),
- the distillation loss of recovery,
- the budget metric of the planner and schedule (``loss``: 0 = as good as dense).

``EmbeddingTask`` (sentence encoders such as MiniLM): mean-pooled embeddings, cosine and
nearest-neighbour agreement, cosine distillation of hidden states; budget = cosine loss.
``CausalLMTask`` (Llama-style decoders): perplexity on held-out lines and next-token top-1
agreement, token-level KL to the dense logits; budget = perplexity ratio - 1.
``task_for(model)`` picks one from the model.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import evaluate, lm
from ..dispatch import cpu_numerics


class EmbeddingTask:
    """Sentence embeddings (mean pooling + L2 norm) scored by cosine and neighbour agreement."""

    name = "embedding"
    metric = "cosine"  # what --floor and the planner's budget are in
    recover_lr = 1e-3  # recovery's peak learning rate (best of 1e-4 / 3e-4 / 1e-3 on the bundled MiniLM)

    def batches(self, tokenizer, lines: Sequence[str], batch_size: int, max_length: int = 128) -> List[Dict[str, torch.Tensor]]:
        return evaluate.batches_by_length(tokenizer, lines, batch_size, max_length)

    def model_inputs(self, batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, Any]:
        return evaluate.model_inputs(batch, device)

    def blocks(self, model: nn.Module) -> Tuple[str, nn.ModuleList]:
        from .calibration import find_blocks

        return find_blocks(model)

    def reference(self, model: nn.Module, batches, desc: str = "dense embeddings") -> torch.Tensor:
        return evaluate.embed(model, batches, desc=desc)

    def score(self, model: nn.Module, batches, ref: torch.Tensor, desc: str = "score") -> evaluate.Scores:
        with cpu_numerics("exact"):  # the format as defined (what the GPU kernels compute)
            return evaluate.compare(ref, evaluate.embed(model, batches, desc=desc))

    def loss(self, scores: evaluate.Scores) -> float:
        """Budget metric: 1 - mean cosine (0 = as good as dense)."""
        return max(0.0, 1.0 - scores.cosine)

    def from_loss(self, loss: float) -> float:
        """The headline metric a budget ``loss`` corresponds to (a cosine)."""
        return 1.0 - loss

    @torch.no_grad()
    def probe_loss(self, model: nn.Module, batches, ref: torch.Tensor) -> float:
        """``loss`` of ``model`` on ``batches`` without progress bars (the planner's many probes)."""
        out = torch.empty_like(ref)
        for b in batches:
            out[b["index"]] = evaluate.encode(model, b).cpu()
        return self.loss(evaluate.compare(ref, out))

    def quality(self, scores: evaluate.Scores) -> float:
        """Higher is better (recovery's guard): the mean cosine."""
        return scores.cosine

    def check_floor(self, floor: Optional[float]) -> None:
        if floor is not None and not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be a cosine in (0, 1], got {floor}")

    def meets_floor(self, scores: evaluate.Scores, floor: float) -> bool:
        return scores.cosine >= floor

    def distill_loss(self, student: nn.Module, teacher: nn.Module, inputs: Dict[str, Any], all_layers: bool) -> tuple:
        """``(loss, batch cosine)``: token-wise cosine of hidden states (every layer's or the
        last) plus the pooled embeddings' cosine (see ``recovery.layered_distill_loss``)."""
        from .recovery import _hidden, layered_distill_loss

        with torch.no_grad():
            target = _hidden(teacher, inputs, all_layers)
        return layered_distill_loss(_hidden(student, inputs, all_layers), target, inputs["attention_mask"])


class CausalLMTask:
    """Next-token prediction scored by held-out perplexity and top-1 agreement with the dense model."""

    name = "causal-lm"
    metric = "perplexity ratio"
    recover_lr = 1e-4  # at 1e-3 the bundled Llama's KL to dense rose from 0.025 to 0.42 after one step

    def __init__(self, max_length: int = 256) -> None:
        self.max_length = max_length

    def batches(self, tokenizer, lines: Sequence[str], batch_size: int, max_length: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
        return lm.lm_batches(tokenizer, lines, batch_size, min(max_length or self.max_length, self.max_length))

    def model_inputs(self, batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, Any]:
        return lm.lm_inputs(batch, device)

    def blocks(self, model: nn.Module) -> Tuple[str, nn.ModuleList]:
        """The decoder blocks (``model.model.layers`` for Llama, Qwen, Mistral)."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            for name, mod in model.named_modules():
                if mod is layers:
                    return name, layers
        from .calibration import find_blocks

        return find_blocks(model)

    def reference(self, model: nn.Module, batches, desc: str = "dense perplexity") -> lm.LMReference:
        return lm.lm_reference(model, batches, desc)

    def score(self, model: nn.Module, batches, ref: lm.LMReference, desc: str = "score") -> lm.LMScores:
        with cpu_numerics("exact"):  # the format as defined (what the GPU kernels compute)
            return lm.lm_compare(model, batches, ref, desc)

    def loss(self, scores: lm.LMScores) -> float:
        """Budget metric: perplexity ratio - 1 (0 = as good as dense)."""
        return lm.lm_loss_scores(scores)

    def from_loss(self, loss: float) -> float:
        """The headline metric a budget ``loss`` corresponds to (a perplexity ratio)."""
        return 1.0 + loss

    def probe_loss(self, model: nn.Module, batches, ref: lm.LMReference) -> float:
        """``loss`` of ``model`` on ``batches`` without progress bars (the planner's many probes)."""
        return self.loss(lm.lm_compare(model, batches, ref, desc=None))

    def quality(self, scores: lm.LMScores) -> float:
        """Higher is better (recovery's guard): dense perplexity / perplexity."""
        return 1.0 / scores.ppl_ratio

    def check_floor(self, floor: Optional[float]) -> None:
        lm.check_lm_floor(floor)

    def meets_floor(self, scores: lm.LMScores, floor: float) -> bool:
        return scores.ppl_ratio <= floor

    def distill_loss(self, student: nn.Module, teacher: nn.Module, inputs: Dict[str, Any], all_layers: bool) -> tuple:
        """``(loss, batch top-1 agreement)``: token-level KL(teacher || student) of the logits."""
        with torch.no_grad():
            target = teacher(**inputs).logits
        return lm.kl_distill_loss(student(**inputs).logits, target, inputs["attention_mask"])


Task = Any  # EmbeddingTask | CausalLMTask (same methods)

EMBEDDING = EmbeddingTask()


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder with a language-model head: a transformers ``*ForCausalLM`` (by class or
    ``config.architectures``) or a config marked ``is_decoder`` on a model with logits."""
    if type(model).__name__.endswith("ForCausalLM"):
        return True
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or []
    has_head = hasattr(model, "lm_head") or hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    if has_head and any(str(a).endswith("ForCausalLM") for a in archs):
        return True
    return bool(getattr(config, "is_decoder", False)) and has_head


def task_for(model: nn.Module) -> Task:
    """``CausalLMTask`` for a causal LM (context length from its config), else ``EmbeddingTask``."""
    if is_causal_lm(model):
        config = getattr(model, "config", None)
        return CausalLMTask(int(getattr(config, "max_position_embeddings", 0) or 256))
    return EMBEDDING


def scores_from_dict(d: Dict[str, Any]):
    """Rebuild ``Scores`` / ``LMScores`` from their ``as_dict()`` (a saved report)."""
    return lm.LMScores(**d) if "ppl_ratio" in d else evaluate.Scores(**d)
