"""Accuracy of sparseq's compression on the bundled decoder (Shakespeare Llama): perplexity.

Calibrates on Hamlet, scores held-out lines of the six evaluation plays (none of them in the
model's training text), each line alone as ``<s> line </s>``: perplexity, its ratio to the
dense model's, and next-token top-1 agreement with the dense model. Recovery distills the
dense logits (token-level KL, masks fixed) on lines of the training plays. Writes
benchmarks/results/accuracy/{causal_lm.csv, causal_lm.md}.

    python benchmarks/accuracy_causal.py            # full table (CPU, 2 shared cores: about 40 min)
    python benchmarks/accuracy_causal.py --quick    # small smoke run, written to /tmp
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparseq.benchmarks.harness import cpu_cores, cpu_model, git_sha  # noqa: E402
from sparseq.compress.data import load_texts  # noqa: E402
from sparseq.compress.export import linear_weight_bytes  # noqa: E402
from sparseq.compress.oneshot import compress_model  # noqa: E402
from sparseq.compress.recovery import recover  # noqa: E402
from sparseq.compress.tasks import task_for  # noqa: E402
from sparseq.models import load_llama  # noqa: E402

TARGETS = ("W8A8 <= 1.01; 2:4 one-shot magnitude > Wanda > SparseGPT (perplexity); 2:4+W8A8 SparseGPT <= 1.02x "
           "2:4 SparseGPT; 2:4 SparseGPT after recovery <= 1.25")

# (row name, recipe, method, options)
ROWS = [
    ("w8a8, SmoothQuant alpha searched", "w8a8", "magnitude", {"alpha": "search"}),
    ("2:4 magnitude", "2:4", "magnitude", {}),
    ("2:4 Wanda", "2:4", "wanda", {}),
    ("2:4 SparseGPT sequential", "2:4", "sparsegpt", {}),
    ("2:4+w8a8 SparseGPT sequential", "2:4+w8a8", "sparsegpt", {}),
]
RECOVER = [("2:4 SparseGPT + KL recovery", "2:4 SparseGPT sequential")]


def run(args: argparse.Namespace) -> list:
    args.git_sha = git_sha(ROOT)  # the code that ran, even if HEAD moves while the table is computed
    torch.manual_seed(0)
    model, tok = load_llama()
    task = task_for(model)
    texts = load_texts(n_calib=args.calib, n_eval=args.eval_lines, n_train=args.train_lines)
    batches = task.batches(tok, texts.eval, 64)
    t0 = time.perf_counter()
    ref = task.reference(model, batches)
    dense_mib = linear_weight_bytes(model)["before"] / 2**20
    rows = [{"method": "dense (fp32 weights)", "recipe": "dense", "perplexity": round(ref.perplexity, 2), "ppl_ratio": 1.0,
             "top1_agreement": 1.0, "linear_mib": round(dense_mib, 2), "seconds": round(time.perf_counter() - t0, 1)}]
    print(_fmt(rows[-1]), flush=True)
    models = {}
    for name, recipe, method, opts in ROWS:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        compress_model(m, tok, texts.calib, recipe, method, **opts)
        rows.append(_row(task, name, recipe, ref, m, batches, time.perf_counter() - t0))
        models[name] = m
        print(_fmt(rows[-1]), flush=True)
    for name, base in RECOVER:
        m = models[base]
        t0 = time.perf_counter()
        rep = recover(m, model, tok, texts.train, steps=args.steps, lr=args.lr, batch_size=32, max_seconds=args.max_seconds)
        note = f"{rep.steps} steps" + ("" if rep.kept else ", undone by the guard")
        rows.append(_row(task, name, rows[[r["method"] for r in rows].index(base)]["recipe"], ref, m, batches,
                         time.perf_counter() - t0, note))
        print(_fmt(rows[-1]), flush=True)
    return rows


def _row(task, name, recipe, ref, m, batches, seconds, note=""):
    s = task.score(m, batches, ref)
    return {"method": name + (f" ({note})" if note else ""), "recipe": recipe, "perplexity": round(s.perplexity, 2),
            "ppl_ratio": round(s.ppl_ratio, 4), "top1_agreement": round(s.top1_agreement, 3),
            "linear_mib": round(linear_weight_bytes(m)["after"] / 2**20, 2), "seconds": round(seconds, 1)}


def _fmt(r: dict) -> str:
    return (f"{r['method']:<44} {r['recipe']:<10} ppl {r['perplexity']:8.2f} x{r['ppl_ratio']:.4f} "
            f"top-1 {r['top1_agreement']:.3f} {r['linear_mib']:6.2f} MiB {r['seconds']:6.1f} s")


def verdicts(rows: list) -> list:
    """One line per target: measured numbers and whether the target is met."""
    r = {row["method"].split(" (")[0]: row for row in rows}
    out = []

    def say(text: str, ok: bool) -> None:
        out.append(f"- {text}: {'met' if ok else 'NOT met'}")

    w8 = r["w8a8, SmoothQuant alpha searched"]["ppl_ratio"]
    say(f"W8A8 perplexity ratio {w8:.4f} <= 1.01", w8 <= 1.01)
    mag, wanda, sgpt = (r[f"2:4 {k}"]["perplexity"] for k in ("magnitude", "Wanda", "SparseGPT sequential"))
    say(f"2:4 one-shot perplexity magnitude {mag:.2f} > Wanda {wanda:.2f} > SparseGPT {sgpt:.2f}", mag > wanda > sgpt)
    both = r["2:4+w8a8 SparseGPT sequential"]["perplexity"]
    say(f"2:4+W8A8 SparseGPT perplexity {both:.2f} = {both / sgpt:.4f}x 2:4 SparseGPT alone (<= 1.02x)", both / sgpt <= 1.02)
    rec = next(row for row in rows if row["method"].startswith("2:4 SparseGPT + KL recovery"))
    say(f"2:4 SparseGPT after recovery perplexity ratio {rec['ppl_ratio']:.4f} <= 1.25", rec["ppl_ratio"] <= 1.25)
    return out


def write(rows: list, args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = (f"sparseq causal-LM accuracy, git {args.git_sha}, torch {torch.__version__}, {cpu_model()} "
            f"({cpu_cores()} cores, {torch.get_num_threads()} threads, shared with other jobs), {platform.system()}, "
            f"{datetime.date.today()}; bundled Shakespeare Llama (sparseq/models/llama_shakespeare), calibration "
            f"{args.calib} lines of Hamlet, {args.eval_lines} held-out lines of the 6 evaluation plays, recovery "
            f"up to {args.steps} steps (lr {args.lr}, batch 32, token-level KL to the dense logits, at most "
            f"{args.max_seconds:.0f} s) on {args.train_lines} lines of Hamlet and the training plays")
    with open(out / "causal_lm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"<!-- {meta} -->", "", f"Command: `python benchmarks/accuracy_causal.py{' ' + args.argv if args.argv else ''}`", "",
             f"Targets: {TARGETS}.", "",
             "| method | recipe | perplexity | ratio to dense | next-token top-1 agreement | Linear weights (MiB) | time (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['recipe']} | {r['perplexity']:.2f} | {r['ppl_ratio']:.4f} | {r['top1_agreement']:.3f} | "
              f"{r['linear_mib']:.2f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", "Measured against the targets:", ""] + verdicts(rows) + ["", meta, ""]
    (out / "causal_lm.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--eval-lines", type=int, default=1200)
    p.add_argument("--train-lines", type=int, default=16000)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-seconds", type=float, default=900.0, help="cap on the recovery's time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, output to /tmp/sparseq-accuracy-causal")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy"))
    args = p.parse_args()
    args.argv = " ".join(sys.argv[1:])
    if args.quick:
        args.calib, args.eval_lines, args.train_lines, args.steps, args.out = 32, 60, 200, 3, "/tmp/sparseq-accuracy-causal"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run(args)
    write(rows, args, Path(args.out))
    print("\n".join(verdicts(rows)))
    print(f"wrote {args.out}/causal_lm.csv, causal_lm.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
