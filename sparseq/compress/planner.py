"""The sweet-spot planner: per-layer formats that maximize speed within an accuracy budget.

1. Sensitivity, measured: every Linear is compressed alone in every candidate format
   (calibrated on the dense model) and the whole model is scored with only that layer
   changed: its loss against the dense model on probe lines (calibration text) — the task's
   budget metric: 1 - mean cosine for an embedding model, perplexity ratio - 1 for a causal
   LM (``sparseq.compress.tasks``). The
   layer's relative output error is recorded too (for the table); it is not used to decide,
   because equal output errors in different layers cost the model very different amounts.
2. Speed: per-layer speedups, measured (``ops.csv`` of ``sparseq bench``) or tabled; the
   model time is the sum of layer times, each proportional to ``N * K`` when dense.
3. Greedy: repeatedly take the layer upgrade with the most time saved per unit of added
   (estimated, additive) loss while the estimate stays within the budget; the path is the
   estimated frontier.
4. Verification: the chosen plan is applied and scored on held-out lines. Losses do not add
   exactly, so when the measured loss exceeds the budget the planner backs off along the
   greedy path (binary search, each step measured) to the fastest plan whose *measured*
   loss meets the budget.
"""
from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .calibration import capture_block_inputs, collect_stats, linear_names, run_block
from .oneshot import _token_masks, compress_linear, compress_model, set_module
from .progress import progress
from .recipe import parse_format
from .tasks import Task, task_for

TABLED_SPEEDUP = {"dense": 1.0, "2:4": 1.6, "int8_weight_only": 1.8, "w8a8": 1.9, "2:4+int8_weight_only": 2.6, "2:4+w8a8": 3.0}
"""Per-layer speedups at decode-size M when nothing was measured (from the byte limits of
README: 2:4 up to 1.78x, int8 weight-only 2.0x, 2:4 + int8 3.2x; discounted for overheads)."""


@dataclass
class Plan:
    """Per-layer formats with their estimated and measured accuracy and speed."""

    formats: Dict[str, str]
    budget: float
    est_loss: float
    speedup: float
    measured: Optional[float] = None  # the task's headline metric: cosine, or a causal LM's perplexity ratio
    measured_agreement: Optional[float] = None  # nearest-neighbour (embeddings) or next-token top-1 agreement
    frontier: List[Tuple[float, float]] = field(default_factory=list)  # (speedup, estimated metric), no budget
    uniform: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # format -> (speedup, metric)
    sensitivity: Dict[str, Dict[str, float]] = field(default_factory=dict)  # relative output error
    layer_loss: Dict[str, Dict[str, float]] = field(default_factory=dict)  # measured loss, layer alone
    checked: List[Tuple[float, float]] = field(default_factory=list)  # (speedup, measured metric) of plans tried
    greedy_speedup: float = 0.0  # of the greedy plan before any back-off
    metric: str = "cosine"  # what ``measured``, ``frontier``, ``uniform`` and ``checked`` hold

    @property
    def measured_cosine(self) -> Optional[float]:
        """``measured`` (named for embedding models, where it is the mean cosine)."""
        return self.measured

    @property
    def measured_nn(self) -> Optional[float]:
        return self.measured_agreement

    def table(self) -> str:
        """Markdown: one row per layer (measured loss of the layer alone, and its output error)."""
        fmts = sorted({f for s in self.sensitivity.values() for f in s})
        lines = ["| layer | chosen | " + " | ".join(f"loss / err {f}" for f in fmts) + " |", "|---|---|" + "---|" * len(fmts)]
        for name, chosen in self.formats.items():
            cells = []
            for f in fmts:
                loss = self.layer_loss.get(name, {}).get(f, float("nan"))
                err = self.sensitivity.get(name, {}).get(f, float("nan"))
                cells.append(f"{loss:.1e} / {err:.1e}")
            lines.append(f"| {name} | {chosen} | {' | '.join(cells)} |")
        return "\n".join(lines)


def load_speedups(csv_path: Optional[str], m_max: int = 16) -> Dict[Tuple[str, int, int], float]:
    """``{(format, N, K): best speedup at M <= m_max}`` from a ``sparseq bench`` ops.csv."""
    if not csv_path:
        return {}
    out: Dict[Tuple[str, int, int], float] = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            try:
                if int(row["M"]) > m_max:
                    continue
                key = (row["format"], int(row["N"]), int(row["K"]))
                out[key] = max(out.get(key, 0.0), float(row["speedup"]))
            except (KeyError, ValueError):
                continue
    if not out:
        raise ValueError(f"{csv_path} has no usable rows (need columns format, N, K, M, speedup)")
    return out


def layer_speedup(fmt: str, shape: Tuple[int, int], measured: Dict[Tuple[str, int, int], float]) -> float:
    """Measured speedup of ``fmt`` at this ``(N, K)`` if known, else the tabled one (1.0 if slower)."""
    s = measured.get((fmt, shape[0], shape[1]), TABLED_SPEEDUP.get(fmt, 1.0))
    return max(1.0, s)  # sparseq layers fall back to dense where a kernel loses


@torch.no_grad()
def sensitivity(model: nn.Module, tokenizer, calib_lines: Sequence[str], formats: Sequence[str], method: str = "sparsegpt",
                batch_size: int = 32, max_rows: int = 512, probe_lines: Optional[Sequence[str]] = None,
                task: Optional[Task] = None,
                ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Tuple[int, int]], Dict[str, Dict[str, float]]]:
    """Each layer alone (dense inputs) in each format: ``(relative output errors, layer shapes,
    measured model losses)``, the last on ``probe_lines`` (default: the calibration lines) as
    ``{layer: {format: task loss vs dense}}`` (1 - mean cosine, or perplexity ratio - 1) with
    every other layer dense."""
    task = task or task_for(model)
    prefix, blocks = task.blocks(model)
    batches = task.batches(tokenizer, list(calib_lines), batch_size)
    masks = _token_masks(batches)
    probe = task.batches(tokenizer, list(probe_lines or calib_lines), 128)
    probe_ref = task.reference(model, probe, desc="dense probe")
    inputs = capture_block_inputs(model, batches, blocks[0], task.model_inputs)
    errors: Dict[str, Dict[str, float]] = {}
    losses: Dict[str, Dict[str, float]] = {}
    shapes: Dict[str, Tuple[int, int]] = {}
    parsed = [parse_format(f) for f in formats]
    bar = progress(total=sum(len(linear_names(b)) for b in blocks), desc="sensitivity", unit="layer")
    for i, block in enumerate(blocks):
        names = linear_names(block)
        mods = {n: block.get_submodule(n) for n in names}
        stats = collect_stats(block, inputs, masks, mods, max_rows)
        for n in names:
            lin, st = mods[n], stats[n]
            ref = st.rows @ lin.weight.T.float() + (0.0 if lin.bias is None else lin.bias.float())
            errs, loss = {}, {}
            for f in parsed:
                sim, _ = compress_linear(lin, f, method, st, alpha="search")
                errs[f.name] = float((sim(st.rows) - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-20))
                set_module(block, n, sim)
                try:
                    loss[f.name] = task.probe_loss(model, probe, probe_ref)
                finally:
                    set_module(block, n, lin)
            full = f"{prefix}.{i}.{n}"
            errors[full], losses[full], shapes[full] = errs, loss, (lin.out_features, lin.in_features)
            bar.update(1)
            bar.set_postfix(layer=full, loss=f"{min(loss.values()):.1e}")
        inputs = run_block(block, inputs)
    bar.close()
    return errors, shapes, losses


def _speed(formats: Dict[str, str], shapes: Dict[str, Tuple[int, int]], measured) -> float:
    dense = sum(n * k for n, k in shapes.values())
    return dense / sum(n * k / layer_speedup(formats[l], (n, k), measured) for l, (n, k) in shapes.items())


def greedy(losses: Dict[str, Dict[str, float]], shapes: Dict[str, Tuple[int, int]], budget: float,
           measured=None) -> Tuple[Dict[str, str], float, List[Tuple[float, float]], List[Dict[str, str]]]:
    """The greedy plan under ``budget`` for per-layer losses ``losses[layer][format]`` (taken as
    additive); returns ``(formats, estimated loss, frontier, path)``: ``path[i]`` is the plan
    after ``i`` upgrades (``path[0]`` all dense), ``frontier[i]`` its (speedup, 1 - loss)."""
    measured = measured or {}
    current = {l: "dense" for l in losses}
    cost = lambda l, f: 0.0 if f == "dense" else losses[l][f]  # noqa: E731
    time_of = lambda l, f: shapes[l][0] * shapes[l][1] / layer_speedup(f, shapes[l], measured)  # noqa: E731
    loss, frontier, path = 0.0, [(1.0, 1.0)], [dict(current)]
    while True:
        best = None
        for l, fmts in losses.items():
            for f in fmts:
                saved = time_of(l, current[l]) - time_of(l, f)
                if saved <= 0:
                    continue
                extra = cost(l, f) - cost(l, current[l])
                if loss + extra > budget:
                    continue
                ratio = saved / max(extra, 1e-12)
                if best is None or ratio > best[0]:
                    best = (ratio, l, f, extra)
        if best is None:
            break
        _, l, f, extra = best
        current[l], loss = f, loss + extra
        frontier.append((_speed(current, shapes, measured), 1.0 - loss))
        path.append(dict(current))
    return current, loss, frontier, path


def back_off(n_plans: int, budget: float, measure: Callable[[int], float]) -> Tuple[int, Dict[int, float]]:
    """Index of the furthest of ``n_plans`` plans along a greedy path whose measured loss
    ``measure(index)`` is within ``budget`` (binary search: the loss is taken to grow along the
    path; plan 0 is all dense, loss 0). Returns ``(index, {index: measured loss})``."""
    checked: Dict[int, float] = {}
    last = n_plans - 1
    if last > 0:
        checked[last] = measure(last)
    if last <= 0 or checked[last] <= budget:
        return max(last, 0), checked
    lo, hi = 0, last  # lo within budget, hi over it
    checked[0] = 0.0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        checked[mid] = measure(mid)
        lo, hi = (mid, hi) if checked[mid] <= budget else (lo, mid)
    return lo, checked


def plan(model: nn.Module, tokenizer, calib_lines: Sequence[str], eval_lines: Sequence[str],
         formats: Sequence[str] = ("2:4", "w8a8", "2:4+w8a8", "int8_weight_only", "2:4+int8_weight_only"),
         budget: float = 0.01, method: str = "sparsegpt", speedups_csv: Optional[str] = None,
         task: Optional[Task] = None) -> Plan:
    """Choose a format per Linear of ``model`` (not modified) so that the task's loss vs dense
    on ``eval_lines`` (1 - mean cosine; for a causal LM perplexity ratio - 1) stays within
    ``budget`` (measured, see the module doc), maximizing the modelled speed."""
    if not 0 < budget < 1:
        raise ValueError(f"budget must be a loss in (0, 1) (1 - cosine, or perplexity ratio - 1), got {budget}")
    if not formats:
        raise ValueError("the planner needs at least one candidate format")
    for f in formats:
        if not parse_format(f).runs_on_kernels:
            raise ValueError(f"format {f!r} has no sparseq kernel; plan among {TABLED_SPEEDUP}")
    if not eval_lines:
        raise ValueError("the planner needs held-out lines to verify the plan: got none")
    task = task or task_for(model)
    measured = load_speedups(speedups_csv)
    sens, shapes, losses = sensitivity(model, tokenizer, calib_lines, formats, method, task=task)
    eval_batches = task.batches(tokenizer, list(eval_lines), 128)
    ref = task.reference(model, eval_batches)

    def score(recipe) -> Tuple[float, float, float]:
        """``(loss, headline metric, agreement)`` of the model compressed by ``recipe``."""
        recipe = {l: f for l, f in recipe.items() if f != "dense"} if isinstance(recipe, dict) else recipe
        if not recipe:
            return 0.0, 1.0, 1.0
        m = copy.deepcopy(model)
        compress_model(m, tokenizer, calib_lines, recipe, method, sequential=False, task=task)
        s = task.score(m, eval_batches, ref)
        (_, key), (_, agree) = s.columns
        return task.loss(s), getattr(s, key), getattr(s, agree)

    uniform = {}
    for f in formats:
        uniform[f] = (_speed({l: f for l in shapes}, shapes, measured), score(f)[1])
    _, loss, frontier, path = greedy(losses, shapes, budget, measured)
    full_frontier = greedy(losses, shapes, float("inf"), measured)[2]  # the whole estimated curve, for the plot
    if task.metric != "cosine":  # greedy reports (speedup, 1 - loss): show the task's metric instead
        full_frontier = [(sp, task.from_loss(1.0 - q)) for sp, q in full_frontier]
    scores: Dict[int, Tuple[float, float, float]] = {}

    def measure(i: int) -> float:
        scores[i] = score(path[i])
        return scores[i][0]

    idx, checked = back_off(len(path), budget, measure)
    chosen = path[idx]
    _, value, agree = scores.get(idx, (0.0, 1.0, 1.0))
    est = 1.0 - frontier[idx][1]
    tried = [(_speed(path[i], shapes, measured), task.from_loss(checked[i])) for i in sorted(checked)]
    return Plan(chosen, budget, est, _speed(chosen, shapes, measured), value, agree, full_frontier, uniform, sens,
                losses, tried, _speed(path[-1], shapes, measured), task.metric)


def frontier_png(p: Plan, path: Path) -> None:
    """Accuracy (cosine) vs modelled speedup: the greedy frontier, uniform recipes, the plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = zip(*p.frontier)
    ax.plot(xs, ys, "-", color="tab:blue", label="greedy frontier (estimated: layer losses added)")
    for f, (s, c) in p.uniform.items():
        ax.scatter([s], [c], marker="s")
        ax.annotate(f, (s, c), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if p.checked:
        cx, cy = zip(*p.checked)
        ax.scatter(cx, cy, color="tab:orange", marker="o", s=18, zorder=4, label="greedy-path plans (measured)")
    if p.measured_cosine is not None:
        ax.scatter([p.speedup], [p.measured_cosine], color="tab:red", marker="*", s=120, zorder=5, label="plan (measured)")
    lm = p.metric != "cosine"
    ax.axhline(1.0 + p.budget if lm else 1.0 - p.budget, color="gray", ls="--", lw=0.8, label=f"budget {p.budget}")
    ax.set_xlabel("modelled speedup vs dense (Linear layers)")
    ax.set_ylabel("perplexity ratio to dense" if lm else "mean cosine vs dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan_job(model_dir: Optional[str], text: Optional[str], formats: Sequence[str], budget: float, out: str,
             speedups_csv: Optional[str] = None, n_calib: int = 256, n_eval: int = 600, method: str = "sparsegpt") -> str:
    """``sparseq plan``: plan, write ``plan.json`` / ``plan.md`` / ``frontier.png`` to ``out``; returns the text."""
    from .data import load_model, load_texts

    model, tokenizer = load_model(model_dir)
    texts = load_texts(text, n_calib=n_calib, n_eval=n_eval, n_train=0)
    task = task_for(model)
    p = plan(model, tokenizer, texts.calib, texts.eval, formats, budget, method, speedups_csv, task=task)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    src = f"measured ({speedups_csv})" if speedups_csv else "tabled (no measurement given)"
    metric, agreement = ("cosine", "neighbour") if p.metric == "cosine" else ("perplexity ratio", "next-token top-1")
    loss_name = "1 - cosine" if p.metric == "cosine" else "perplexity ratio - 1"
    head = (f"plan under a {metric} budget of {budget} ({loss_name}): modelled speedup {p.speedup:.2f}x (speedups {src}); "
            f"estimated {metric} {task.from_loss(p.est_loss):.4f}, measured {p.measured:.4f}, "
            f"{agreement} agreement {p.measured_agreement:.3f} on {len(texts.eval)} held-out lines\n"
            + f"plans measured on the greedy path (speedup -> {metric}): "
            + ", ".join(f"{s:.2f}x -> {c:.4f}" for s, c in p.checked) + "\n"
            + "uniform recipes: " + ", ".join(f"{f} {c:.4f} @ {s:.2f}x" for f, (s, c) in p.uniform.items())
            + f"\ncells: measured loss ({loss_name}) of the model with only that layer compressed / the layer's relative output error")
    text_out = head + "\n\n" + p.table()
    key = "cosine" if p.metric == "cosine" else "ppl_ratio"
    (root / "plan.json").write_text(json.dumps({"recipe": p.formats, "budget": budget, "speedup": p.speedup, "task": task.name,
                                                f"estimated_{key}": task.from_loss(p.est_loss), f"measured_{key}": p.measured,
                                                "nn_agreement" if key == "cosine" else "top1_agreement": p.measured_agreement,
                                                "uniform": p.uniform, "checked": p.checked, "layer_loss": p.layer_loss}, indent=2))
    (root / "plan.md").write_text(text_out + "\n")
    frontier_png(p, root / "frontier.png")
    return text_out + f"\n\nwrote {root / 'plan.json'} (use: sparseq compress --recipe {root / 'plan.json'}), plan.md, frontier.png"
