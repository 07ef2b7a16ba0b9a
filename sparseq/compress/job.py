"""The main job: compress a model end to end, report, save; and re-score a saved model.

``compress_job``: load model + text (bundled MiniLM + Shakespeare by default) -> calibrate
and compress (default 2:4 + W8A8, SparseGPT, sequential) -> optional distillation recovery
-> accuracy against the dense model on held-out text -> ``sparseq.swap`` + ``sparseq.save``.
The task comes from the model (``sparseq.compress.tasks``): an encoder is scored by embedding
cosine, a causal LM (e.g. ``--model sparseq/models/llama_shakespeare``) by perplexity.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .data import load_model, load_texts
from .evaluate import Scores
from .export import linear_weight_bytes, to_kernel_layers
from .recipe import DEFAULT_RECIPE, Recipe, parse_format
from .schedule import compress_in_steps, recipe_name
from .tasks import Task, task_for

REPORT = "compress.json"


def default_threads() -> int:
    """Threads for CPU runs: all cores up to 4 (the machine may be shared)."""
    return max(1, min(4, os.cpu_count() or 1))


def _say(msg: str) -> None:
    print(msg, flush=True)


def _speed(dense: torch.nn.Module, compressed: torch.nn.Module, batch: Dict[str, torch.Tensor], task: Task) -> Optional[Dict[str, float]]:
    """Milliseconds per forward of dense vs compressed on the GPU (None without one)."""
    if not torch.cuda.is_available():
        return None
    out = {}
    for name, m in (("dense_ms", dense), ("compressed_ms", compressed)):
        m = m.to("cuda")  # same activation dtype (fp32) for both
        inputs = task.model_inputs(batch, torch.device("cuda"))
        with torch.no_grad():
            for _ in range(3):
                m(**inputs)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                m(**inputs)
            torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / 10 * 1e3
    out["speedup"] = out["dense_ms"] / out["compressed_ms"]
    return out


def check_recipe(recipe: Recipe) -> None:
    """Raise ValueError/TypeError for a recipe that names an unknown format (before any work)."""
    if isinstance(recipe, str):
        parse_format(recipe)
    elif isinstance(recipe, dict):
        for fmt in recipe.values():
            parse_format(fmt)
    else:
        raise TypeError(f"recipe must be a format string or a dict of layer patterns, got {type(recipe).__name__}")


def compress_job(
    model_dir: Optional[str] = None,
    text: Optional[str] = None,
    recipe: Recipe = DEFAULT_RECIPE,
    method: str = "sparsegpt",
    out: Optional[str] = "sparseq-out",
    recover_steps: int = 0,
    n_calib: int = 512,
    n_eval: int = 1200,
    alpha: Any = "search",
    lora_rank: int = 0,
    save: bool = True,
    activations: str = "dynamic",
    recover_lr: Optional[float] = None,
    schedule: Optional[Sequence[Recipe]] = None,
    floor: Optional[float] = None,
) -> Dict[str, Any]:
    """Run the main job; returns the report (also written to ``out/compress.json``).

    ``schedule``: recipes applied one after another instead of ``recipe`` alone (each step
    scored, and recovered when ``recover_steps``); ``floor``: undo and stop at the first
    step whose cosine ends below it, or for a causal LM whose perplexity ratio to dense ends
    above it (see ``sparseq.compress.schedule``). ``recover_lr``: default the task's
    (1e-3 for embedding models, 1e-4 for causal LMs).
    """
    t_start = time.perf_counter()
    steps = list(schedule) if schedule else [recipe]
    for r in steps:
        check_recipe(r)
    from .oneshot import check_activations

    check_activations(activations)
    texts = load_texts(text, n_calib=n_calib, n_eval=n_eval, n_train=max(4000, 32 * recover_steps) if recover_steps else 0)
    model, tokenizer = load_model(model_dir)
    task = task_for(model)
    task.check_floor(floor)
    _say(f"model  {model_dir or 'bundled all-MiniLM-L6-v2'} ({type(model).__name__}, task {task.name})")
    _say(f"text   {texts.source}: {len(texts.calib)} calibration lines, {len(texts.eval)} held-out lines")
    dense = copy.deepcopy(model)
    eval_batches = task.batches(tokenizer, texts.eval, 128)
    ref = task.reference(dense, eval_batches)
    done, result, rec = compress_in_steps(
        model, dense, tokenizer, texts.calib, eval_batches, ref, steps, method, train_lines=texts.train,
        recover_steps=recover_steps, recover_lr=recover_lr or task.recover_lr, lora_rank=lora_rank, floor=floor, say=_say,
        task=task, alpha=alpha, activations=activations)
    kept = [s for s in done if s.kept]
    scores: Dict[str, Scores] = {"oneshot": kept[-1].oneshot}
    if kept[-1].recovered is not None:
        scores["recovered"] = kept[-1].recovered
    size = linear_weight_bytes(model)
    final = kept[-1].final
    report: Dict[str, Any] = {
        "model_dir": str(model_dir) if model_dir else None,
        "task": task.name,
        "text": str(text) if text else None,
        "recipe": steps[len(kept) - 1],
        "schedule": [recipe_name(r) for r in schedule] if schedule else None,
        "steps": [asdict(x) for x in done],
        "method": method, "activations": activations, "n_calib": len(texts.calib), "n_eval": len(texts.eval),
        "scores": {k: v.as_dict() for k, v in scores.items()},
        **{k: v for k, v in final.as_dict().items() if k not in ("n", "n_tokens")},  # the headline scores
        "linear_bytes_bf16": size["before"], "linear_bytes_compressed": size["after"],
        "layers": [asdict(layer) for layer in result.layers],
        "recovery": asdict(rec) if rec else None,
    }
    if save and out:
        swap_report, kernel_recipe = to_kernel_layers(model)
        report["swap"] = str(swap_report)
        speed = _speed(dense, model, eval_batches[-1], task)
        if speed:
            report["speed"] = speed
        import sparseq

        path = Path(out)
        sparseq.save(model, path, recipe=kernel_recipe)
        tokenizer.save_pretrained(str(path))
        report["seconds"] = time.perf_counter() - t_start
        (path / REPORT).write_text(json.dumps(report, indent=2))
        report["out"] = str(path)
    report["seconds"] = time.perf_counter() - t_start
    return report


def eval_saved(path: str, model_dir: Optional[str] = None, text: Optional[str] = None, n_eval: Optional[int] = None) -> Dict[str, Any]:
    """Re-score a model saved by the main job against its dense original; returns the scores."""
    import sparseq

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected the --out folder of `sparseq compress`)")
    saved = json.loads((root / REPORT).read_text()) if (root / REPORT).is_file() else {}
    model_dir = model_dir or saved.get("model_dir")
    text = text or saved.get("text")
    n_eval = n_eval or saved.get("n_eval", 1200)
    compressed = sparseq.load(root)
    dense, tokenizer = load_model(model_dir)
    task = task_for(dense)
    texts = load_texts(text, n_calib=1, n_eval=n_eval, n_train=0)
    batches = task.batches(tokenizer, texts.eval, 128)
    s = task.score(compressed, batches, task.reference(dense, batches))
    key = s.columns[0][1]  # cosine, or the perplexity ratio of a causal LM
    return {"path": str(root), "recipe": saved.get("recipe"), "method": saved.get("method"), "task": task.name,
            **s.as_dict(), "summary": s.summary(), "metric": key, "reported": saved.get(key)}
