"""Incremental compression: apply recipes one after another, scoring (and recovering) each step.

The way to find how small a model can get for the accuracy you can afford: start small
(e.g. ``30%`` unstructured), go on (``50%``, ``2:4``, ``2:4+w8a8``), watch accuracy, size and
modelled speed after every step, and stop before the step that costs too much (``floor``).
Each step re-compresses the previous step's (pruned, maybe recovered) weights, so the
sparsity grows gradually; recovery, when asked for, runs after every step and always
distills from the original dense model.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .evaluate import Scores
from .export import linear_weight_bytes
from .oneshot import CompressionResult, compress_model
from .recipe import Recipe
from .recovery import RecoveryReport, recover
from .simulated import SimulatedLinear
from .tasks import Task, task_for


@dataclass
class Step:
    """What one step of a schedule did to the model."""

    recipe: str
    oneshot: Scores  # right after compression (LMScores for a causal LM)
    recovered: Optional[Scores]  # after recovery, when it ran
    linear_bytes: float
    modelled_speedup: float
    seconds: float
    kept: bool = True

    @property
    def final(self) -> Scores:
        return self.oneshot if self.recovered is None else self.recovered


def modelled_speedup(model: nn.Module) -> float:
    """Speed of the model's Linear layers vs dense under the planner's tabled per-format
    speedups (formats without kernels count as dense); a placeholder until measured."""
    from .planner import _speed

    formats, shapes = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, SimulatedLinear) or type(m) is nn.Linear:
            formats[name] = m.format.name if isinstance(m, SimulatedLinear) else "dense"
            shapes[name] = (m.out_features, m.in_features)
    return _speed(formats, shapes, {}) if shapes else 1.0


def _restore(model: nn.Module, snapshot: nn.Module) -> None:
    """Put ``snapshot``'s children back into ``model`` (the caller keeps the same object)."""
    for name, child in snapshot.named_children():
        setattr(model, name, child)


def recipe_name(recipe: Recipe) -> str:
    """A short printable name of a recipe (a format, or ``{pattern: format, ...}``)."""
    if isinstance(recipe, str):
        return recipe
    return "{" + ", ".join(f"{k}: {v}" for k, v in recipe.items()) + "}"


def compress_in_steps(
    model: nn.Module,
    dense: nn.Module,
    tokenizer,
    calib_lines: Sequence[str],
    eval_batches: List[Dict[str, torch.Tensor]],
    ref: torch.Tensor,
    steps: Sequence[Recipe],
    method: str = "sparsegpt",
    *,
    train_lines: Sequence[str] = (),
    recover_steps: int = 0,
    recover_lr: float = 1e-3,
    lora_rank: int = 0,
    floor: Optional[float] = None,
    say=print,
    task: Optional[Task] = None,
    **compress_options: Any,
) -> Tuple[List[Step], Optional[CompressionResult], Optional[RecoveryReport]]:
    """Compress ``model`` in place by each recipe of ``steps`` in turn; score each step on
    ``eval_batches`` against the dense reference ``ref`` (``task.reference``: embeddings, or
    the dense perplexity and tokens of a causal LM), and recover it from ``dense`` when
    ``recover_steps``. With ``floor`` (a cosine; for a causal LM the highest perplexity ratio),
    the first step that ends past it is undone and the schedule stops; ValueError if that is
    the first step. ``task`` defaults to ``task_for(model)``.

    Returns ``(steps, compression result of the last kept step, its recovery report)``.
    """
    if not steps:
        raise ValueError("the schedule has no steps")
    task = task or task_for(model)
    task.check_floor(floor)
    if recover_steps and not train_lines:
        raise ValueError("recovery needs training lines (train_lines)")
    done: List[Step] = []
    kept: Tuple[Optional[CompressionResult], Optional[RecoveryReport]] = (None, None)
    for i, recipe in enumerate(steps):
        t0 = time.perf_counter()
        snapshot = copy.deepcopy(model) if floor is not None else None
        tag = f"step {i + 1}/{len(steps)} {recipe_name(recipe)}" if len(steps) > 1 else recipe_name(recipe)
        result = compress_model(model, tokenizer, calib_lines, recipe, method, task=task, **compress_options)
        s = task.score(model, eval_batches, ref)
        say(f"{tag}: one-shot {method} {s.summary()} ({result.seconds:.0f} s)")
        rec, r = None, None
        if recover_steps:
            rec = recover(model, dense, tokenizer, train_lines, steps=recover_steps, lr=recover_lr, lora_rank=lora_rank,
                          task=task)
            r = task.score(model, eval_batches, ref)
            if not rec.kept:
                say(f"{tag}: recovery lowered the held-back training lines' {task.metric} score ({rec.val_cosine_before:.4f} -> "
                    f"{rec.val_cosine_after:.4f}; more steps or a lower --lr may help): undone")
            say(f"{tag}: recovered ({rec.steps} steps, {rec.seconds:.0f} s) {r.summary()}")
        step = Step(recipe_name(recipe), s, r, linear_weight_bytes(model)["after"], modelled_speedup(model),
                    time.perf_counter() - t0)
        done.append(step)
        if floor is not None and not task.meets_floor(step.final, floor):
            step.kept = False
            if i == 0:
                raise ValueError(f"the first step ({step.recipe}) already ends at {step.final.summary()}, "
                                 f"past the floor {floor} ({task.metric}); start with a smaller step")
            _restore(model, snapshot)
            say(f"{tag}: {step.final.summary()} is past the floor {floor} ({task.metric}): undone; keeping step {i}")
            break
        kept = (result, rec)
    return done, kept[0], kept[1]


def steps_table(steps: Sequence[Step], dense_bytes: float) -> str:
    """A printable table: one row per step (accuracy, size, modelled speed)."""
    mib = 2 ** 20
    (main, key), (agree, agree_key) = steps[0].oneshot.columns if steps else Scores.columns
    lines = [f"{'step':<5} {'recipe':<28} {main:>7} {'recovered':>9} {agree:>7} {'MiB':>7} {'size':>6} {'speed*':>6}  ",
             f"{'0':<5} {'dense':<28} {1.0:>7.4f} {'-':>9} {1.0:>7.3f} {dense_bytes / mib:>7.2f} {1.0:>5.2f}x {1.0:>5.2f}x"]
    for i, s in enumerate(steps, 1):
        rec = "-" if s.recovered is None else f"{getattr(s.recovered, key):.4f}"
        lines.append(f"{i:<5} {s.recipe[:28]:<28} {getattr(s.oneshot, key):>7.4f} {rec:>9} {getattr(s.final, agree_key):>7.3f} "
                     f"{s.linear_bytes / mib:>7.2f} "
                     f"{dense_bytes / max(s.linear_bytes, 1):>5.2f}x {s.modelled_speedup:>5.2f}x" + ("" if s.kept else "  undone"))
    lines.append("* modelled from tabled per-format speedups (sparseq plan's table), not measured; formats without "
                 "kernels (N:M other than 2:4, unstructured %) run dense, and their sizes count no index cost")
    return "\n".join(lines)
