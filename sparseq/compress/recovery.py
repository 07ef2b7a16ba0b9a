"""Recovery: distill the dense model (teacher) into the compressed one with its masks fixed.

The student is a model whose compressed layers are ``SimulatedLinear``: their forward
multiplies the weight by the fixed keep-mask (pruned weights get no gradient) and the
weights are re-masked after every optimizer step, so the sparsity pattern never changes.
W8A8 layers train through their fake quantization (straight-through). With ``lora_rank``
only low-rank adapters (plus biases and LayerNorms) train and are merged back at the end.
The loss comes from the task (``sparseq.compress.tasks``). Embedding models: token-wise
(1 - cosine) of the hidden states + (1 - cosine) of the sentence embeddings; with
``layers="all"`` (default) the token-wise term is averaged over every encoder layer's output,
not only the last: each block gets a direct signal, which recovers faster. Causal LMs:
token-level KL(teacher || student) of the next-token distributions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .evaluate import mean_pool
from .progress import progress
from .simulated import SimulatedLinear
from .tasks import Task, task_for


@dataclass
class RecoveryReport:
    """What recovery did."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    train_cosine: float  # running batch agreement: cosine (embeddings) or top-1 agreement (causal LM)
    # held-back lines, student vs teacher: cosine (embeddings) or dense / student perplexity (causal LM)
    val_cosine_before: Optional[float] = None
    val_cosine_after: Optional[float] = None
    kept: bool = True  # False: recovery made the held-back lines worse and was undone


def simulated_layers(model: nn.Module) -> Dict[str, SimulatedLinear]:
    """The model's compressed layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SimulatedLinear)}


def _trainable(student: nn.Module, lora_rank: int) -> List[nn.Parameter]:
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for name, mod in student.named_modules():
        if isinstance(mod, SimulatedLinear):
            if lora_rank:
                mod.add_lora(lora_rank)
                params += [mod.lora_a, mod.lora_b]
            else:
                params.append(mod.weight)
            if mod.bias is not None:
                params.append(mod.bias)
        elif isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
            params += [p for p in mod.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
    """``(loss, batch cosine)``: mean token-wise (1 - cosine) + (1 - cosine of pooled embeddings).

    Cosines rather than squared errors: BERT-style hidden states have a few huge outlier
    dimensions that would dominate an MSE while the embedding metric is a cosine.
    """
    return layered_distill_loss([student_hidden], [teacher_hidden], attention_mask)


def _hidden(model: nn.Module, inputs: Dict[str, torch.Tensor], all_layers: bool) -> List[torch.Tensor]:
    """The encoder's output states: every layer's (without the embeddings) or only the last."""
    if not all_layers:
        return [model(**inputs).last_hidden_state]
    out = model(**inputs, output_hidden_states=True)
    states = getattr(out, "hidden_states", None)
    if not states:
        raise ValueError(f"{type(model).__name__} returns no hidden_states; use layers='last'")
    return list(states[1:])


def layered_distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> tuple:
    """``(loss, batch cosine)``: token-wise (1 - cosine) averaged over the layers given, plus
    (1 - cosine) of the pooled sentence embeddings of the last layer."""
    m = attention_mask.to(student[-1].dtype)
    tok = 0.0
    for s, t in zip(student, teacher):
        per_tok = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
        tok = tok + (per_tok * m).sum() / m.sum().clamp(min=1)
    tok = tok / len(student)
    cos = torch.nn.functional.cosine_similarity(mean_pool(student[-1], attention_mask), mean_pool(teacher[-1], attention_mask)).mean()
    return tok + (1.0 - cos), float(cos.detach())


def lr_factor(step: int, steps: int, warmup: Optional[int] = None) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps (default 5% of ``steps``),
    then cosine decay to 0 at ``steps``. Warm-up keeps the first large steps of Adam from
    throwing the freshly pruned model away from the one-shot solution."""
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    ramp = min(1.0, (step + 1) / warmup)
    return ramp * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def split_validation(lines: Sequence[str], n_max: int = 256) -> Tuple[List[str], List[str]]:
    """``(train, val)``: every k-th line (at most ``n_max``, about a tenth) held back to
    validate; no lines are held back from fewer than 20."""
    lines = list(lines)
    n_val = min(n_max, len(lines) // 10) if len(lines) >= 20 else 0
    if n_val == 0:
        return lines, []
    stride = len(lines) // n_val
    held = set(range(0, stride * n_val, stride))
    return [l for i, l in enumerate(lines) if i not in held], [lines[i] for i in sorted(held)]


@torch.no_grad()
def _val_cosine(student: nn.Module, teacher_ref, batches, task: Task) -> float:
    """The student's quality against the teacher on held-back lines (higher is better; the
    cosine for embedding models)."""
    return task.quality(task.score(student, batches, teacher_ref, desc="validate"))


def recover(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    lines: Sequence[str],
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    lora_rank: int = 0,
    max_length: int = 64,
    max_seconds: Optional[float] = None,
    seed: int = 0,
    layers: str = "all",
    warmup: Optional[int] = None,
    guard: bool = True,
    task: Optional[Task] = None,
) -> RecoveryReport:
    """Train ``student`` to match ``teacher`` on ``lines`` for ``steps`` (or ``max_seconds``).

    ``lr``: peak AdamW learning rate (the default, best of 1e-4 / 3e-4 / 1e-3 on the bundled
    MiniLM, suits small encoders; billion-parameter models want 1e-5 to 1e-4); with LoRA it
    is multiplied by 10. Masks of the student's ``SimulatedLinear`` layers stay fixed; LoRA adapters (if
    ``lora_rank``) are merged back before returning. ``layers``: ``"all"`` distills every
    encoder layer's output (needs a transformers model returning ``hidden_states``),
    ``"last"`` only the final one. ``guard``: hold back about a tenth of ``lines`` (at most
    256), score the student's sentence embeddings against the teacher's on them before and
    after, and undo the recovery if it made them worse (e.g. too few steps at a high
    learning rate); this keeps a copy of the student's weights meanwhile. ``task`` (default
    ``task_for(student)``) gives the loss and the validation score: a causal LM distills the
    dense logits (token-level KL; ``layers`` does not apply). Returns a short report.
    """
    if layers not in ("all", "last"):
        raise ValueError(f"layers must be 'all' or 'last', got {layers!r}")
    all_layers = layers == "all"
    task = task or task_for(student)
    if not lines:
        raise ValueError("recovery needs training text: got no lines")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    compressed = simulated_layers(student)
    if not compressed:
        raise ValueError("the student has no compressed (SimulatedLinear) layers to recover")
    masks_before = {n: m.mask.clone() for n, m in compressed.items() if m.mask is not None}
    device = next(student.parameters()).device
    teacher.eval()
    student.eval()  # no dropout: the student should match the teacher's deterministic outputs
    lines, val_lines = split_validation(lines) if guard else (list(lines), [])
    val_before, snapshot, val_batches, teacher_ref = None, None, None, None
    if val_lines:
        val_batches = task.batches(tokenizer, val_lines, 128, max_length)
        teacher_ref = task.reference(teacher, val_batches, desc="validate")
        val_before = _val_cosine(student, teacher_ref, val_batches, task)
        snapshot = {k: v.detach().clone() for k, v in student.state_dict().items()}
    params = _trainable(student, lora_rank)
    opt = torch.optim.AdamW(params, lr=lr * (10 if lora_rank else 1), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    batches = task.batches(tokenizer, list(lines), batch_size, max_length)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed))
    start, first, last, cos_ema = time.perf_counter(), None, 0.0, 0.0
    bar = progress(range(steps), desc="recover", unit="step")
    done = 0
    try:
        for step in bar:
            inputs = task.model_inputs(batches[int(order[step % len(batches)])], device)
            loss, cos = task.distill_loss(student, teacher, inputs, all_layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for mod in compressed.values():
                mod.apply_mask()
            last = float(loss.detach())
            first = last if first is None else first
            cos_ema = cos if step == 0 else 0.9 * cos_ema + 0.1 * cos
            bar.set_postfix(loss=f"{last:.4f}", cos=f"{cos_ema:.4f}")
            done = step + 1
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
    finally:
        bar.close()
        for mod in compressed.values():
            mod.merge_lora()
        for p in student.parameters():
            p.requires_grad_(False)
    for n, mask in masks_before.items():  # the contract: the sparsity pattern never changes
        assert torch.equal(compressed[n].mask, mask), f"mask of {n} changed during recovery"
    val_after, kept = None, True
    if snapshot is not None:
        val_after = _val_cosine(student, teacher_ref, val_batches, task)
        if val_after < val_before:
            student.load_state_dict(snapshot)
            kept = False
    return RecoveryReport(done, time.perf_counter() - start, first or 0.0, last, cos_ema, val_before, val_after, kept)
