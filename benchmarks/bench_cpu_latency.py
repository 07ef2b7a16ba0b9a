"""CPU latency: the bundled MiniLM embedding one sentence per call, dense fp32 vs every sparseq
format vs ``quantize_dynamic``.

Why beside ``bench_cpu.py``: its layer cells call one layer again and again, so that layer's
weight stays in the core's L2 (hot), and its end-to-end row embeds 64 sentences at once (M =
1408). A query embedded on its own is the other case a user meets: M = its token count (~6-30
rows per linear, the dispatch buckets 2-16 and 17-64), each of the 36 linears called once per
sentence: 42 MB of fp32 weights (10.6 MB int8) read from L3 rather than from a core's L2.

Contenders: dense fp32 (1.0x), ``sparseq.swap(model, fmt)`` for each format (2:4 formats pruned
by magnitude: another model, timed only), ``quantize_dynamic``. A call is one sentence; a
sample is the whole list of ``--sentences`` Hamlet lines embedded one by one, timed as
``bench_cpu.median_us`` (interleaved rounds, median) with its contention check (retried, listed).
Checked before timing, at each thread count: every sparseq layer's output on its actual input
(every sentence) against the dense layer it replaces (``sparseq.testing.check_layer_close``, the
dense bound where the layer's dense bucket ran), and each model's embeddings against the same
model on the reference backend, relative L2 per sentence within ``bench_e2e.e2e_bound``; a miss
marks the row wrong, untimed (exit 1). Cosine to dense is reported (the format's own error).

Run: ``python benchmarks/bench_cpu_latency.py [--out DIR] [--threads 1,2]`` (~2 min on 2 cores)
writes ``cpu_latency.csv`` and ``cpu_latency.md`` to ``--out`` (default
``benchmarks/results/cpu-<cpu>-<cores>c/``).
"""
from __future__ import annotations

import argparse
import copy
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import checked_embed, quantize_dynamic, qd_backend, timed, write_results  # noqa: E402
from bench_e2e import e2e_bound, row_violation  # noqa: E402

import sparseq  # noqa: E402
import sparseq.nn as snn  # noqa: E402
from sparseq import benchmarks as bm  # noqa: E402
from sparseq import dispatch  # noqa: E402

COLUMNS = ["cpu", "threads", "torch", "git_sha", "model", "format", "backends", "sentences", "tokens_min",
           "tokens_max", "ms_per_sentence", "speedup", "cos_reference_min", "cos_dense_min", "checked"]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/cpu-<cpu>/)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--formats", default=",".join(snn.FORMATS))
    p.add_argument("--sentences", type=int, default=24, help="Hamlet lines, embedded one per call")
    p.add_argument("--budget", type=float, default=4.0, help="seconds per contender and thread count")
    p.add_argument("--retries", type=int, default=2, help="re-measure when other processes used the CPU")
    a = p.parse_args(argv)
    a.threads = [int(t) for t in a.threads.split(",")]
    a.formats = [f for f in a.formats.split(",") if f]
    unknown = sorted(set(a.formats) - set(snn.FORMATS))
    if unknown:
        p.error(f"unknown formats {unknown}; known: {', '.join(snn.FORMATS)}")
    return a


def swapped(model: nn.Module, fmt: str) -> nn.Module:
    """A copy of ``model`` with every Linear sparseq's ``fmt`` (2:4 pruned by magnitude)."""
    out = copy.deepcopy(model)
    sparseq.swap(out, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
    return out.eval()


def on_reference(model: nn.Module, fn):
    """``fn()`` with every sparseq layer of ``model`` dispatched to the reference backend."""
    layers = [m for m in model.modules() if isinstance(m, snn.CompressedLinear)]
    orig = dispatch.preferences
    dispatch.preferences = lambda *args, **kw: ["reference"]
    try:
        for layer in layers:
            layer.reset()
        return fn()
    finally:
        dispatch.preferences = orig
        for layer in layers:
            layer.reset()


def main(argv: Optional[List[str]] = None) -> int:
    from sparseq.compress import data

    a = parse_args(argv)
    model, tok = data.load_model()
    model.eval()
    lines = data.bundled_texts(n_calib=a.sentences, n_eval=8, n_train=0).calib[: a.sentences]
    inputs = [tok([s], truncation=True, max_length=128, return_tensors="pt") for s in lines]
    tokens = [int(b["input_ids"].shape[1]) for b in inputs]
    stages = 4 * int(model.config.num_hidden_layers)

    def embed_all(mod: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([F.normalize(mod(**b).last_hidden_state.mean(1), dim=-1) for b in inputs])

    models: Dict[str, nn.Module] = {"dense": model, "quantize_dynamic": quantize_dynamic(model)}
    for fmt in a.formats:
        models[fmt] = swapped(model, fmt)
    run = types.SimpleNamespace(args=a, contended=[])
    rows: List[dict] = []
    sha = bm.git_sha()
    before = torch.get_num_threads()
    try:
        measure(a, models, embed_all, stages, tokens, run, rows, sha)
    finally:
        torch.set_num_threads(before)
    write_results(a.out, "cpu_latency", COLUMNS, rows, markdown(rows, run.contended, tokens))
    return 1 if any(r["checked"].startswith("wrong") for r in rows) else 0


def measure(a: argparse.Namespace, models: Dict[str, nn.Module], embed_all, stages: int, tokens: List[int],
            run, rows: List[dict], sha: str) -> None:
    """Check, then time, every model at each thread count; appends a row per model."""
    model = models["dense"]
    for threads in a.threads:
        torch.set_num_threads(threads)
        outs = {"dense": embed_all(model), "quantize_dynamic": embed_all(models["quantize_dynamic"])}
        checked: Dict[str, str] = {"dense": "baseline", "quantize_dynamic": "approx"}
        cos_ref: Dict[str, str] = {}
        for fmt in a.formats:
            mod = models[fmt]
            snn.prepare(mod)
            out, bad = checked_embed(mod, embed_all)
            outs[fmt] = out
            ref = on_reference(mod, lambda: embed_all(mod))
            snn.prepare(mod)
            bad = bad or row_violation(out, ref, e2e_bound(torch.float32, stages, fmt))
            checked[fmt] = "yes" if bad is None else f"wrong: {bm.clean_error(bad)}"
            cos_ref[fmt] = f"{float((out * ref).sum(-1).min()):.6f}"
        fns = {name: (lambda m=m: embed_all(m)) for name, m in models.items() if checked[name] in ("yes", "baseline", "approx")}
        times = timed(run, f"threads={threads}", fns, a.budget)
        for name, mod in models.items():
            backends = (qd_backend() if name == "quantize_dynamic" else "torch" if name == "dense" else
                        ", ".join(sorted({b for layer in mod.modules() if isinstance(layer, snn.CompressedLinear)
                                         for b in layer.backends.values()})))
            us = times.get(name)
            cos_dense = "" if name == "dense" else f"{float((outs[name] * outs['dense']).sum(-1).min()):.5f}"
            rows.append({"cpu": bm.cpu_model(), "threads": threads, "torch": torch.__version__, "git_sha": sha,
                         "model": "all-MiniLM-L6-v2", "format": name, "backends": backends,
                         "sentences": len(tokens), "tokens_min": min(tokens), "tokens_max": max(tokens),
                         "ms_per_sentence": "" if us is None else f"{us / len(tokens) / 1e3:.3f}",
                         "speedup": "" if us is None else f"{times['dense'] / us:.2f}",
                         "cos_reference_min": cos_ref.get(name, ""), "cos_dense_min": cos_dense,
                         "checked": checked[name]})
            print(f"t={threads} {name:22s} {rows[-1]['ms_per_sentence']:>8s} ms/sentence {rows[-1]['speedup']:>5s}x "
                  f"{checked[name]}  ({backends})", flush=True)


def markdown(rows: List[dict], contended: List[str], tokens: List[int]) -> str:
    r0 = rows[0]
    lines = ["# CPU latency: MiniLM, one sentence per call", "",
             f"{r0['cpu']}, torch {r0['torch']}, git {r0['git_sha']}; {r0['sentences']} Hamlet lines embedded one "
             f"per call ({min(tokens)}-{max(tokens)} tokens: M = that many rows per linear), mean pooling + L2 "
             "norm; median of interleaved rounds (`benchmarks/bench_cpu_latency.py`). Speedup over dense fp32 "
             "at the same thread count; every sparseq model checked against itself on the reference backend "
             "(`cos_reference_min`); `cos_dense_min` is the format's own error (2:4 formats: another, pruned model).",
             "", "| threads | format | ms / sentence | speedup | cos to reference (min) | cos to dense (min) | "
             "checked | backends |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['format']} | {r['ms_per_sentence'] or 'WRONG'} | "
                     f"{r['speedup'] + 'x' if r['speedup'] else ''} | {r['cos_reference_min']} | {r['cos_dense_min']} | "
                     f"{r['checked']} | {r['backends']} |")
    lines.append("")
    lines.append("Contended: " + ("; ".join(contended) if contended else "none (other processes used <= 0.15 cores)"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
