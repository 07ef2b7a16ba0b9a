"""Accuracy of sparseq's compression on the bundled model (MiniLM) and text (Shakespeare).

Calibrates on Hamlet, scores >= 1000 held-out lines of other plays: mean cosine of sentence
embeddings (compressed vs dense) and nearest-neighbour agreement. Writes
benchmarks/results/accuracy/{accuracy.csv, accuracy.md, accuracy.png}.

    python benchmarks/accuracy.py                 # full table (CPU, about 40 min on 2 cores)
    python benchmarks/accuracy.py --quick         # small smoke run, written to /tmp
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparseq.compress.data import load_model, load_texts  # noqa: E402
from sparseq.compress.evaluate import batches_by_length, compare, embed  # noqa: E402
from sparseq.compress.export import linear_weight_bytes  # noqa: E402
from sparseq.compress.oneshot import compress_model  # noqa: E402
from sparseq.compress.recovery import recover  # noqa: E402

TARGETS = "W8A8 >= 0.997; 2:4 magnitude < Wanda < SparseGPT >= 0.89; W8A8 on 2:4 costs <= 0.005; recovered >= 0.96"

# (row name, recipe, method, options); "recover" rows start from the named one-shot row
ROWS = [
    ("w8a8, no smoothing (plain)", "w8a8", "magnitude", {"alpha": "none"}),
    ("w8a8, SmoothQuant alpha 0.5", "w8a8", "magnitude", {"alpha": 0.5}),
    ("w8a8, SmoothQuant alpha searched", "w8a8", "magnitude", {"alpha": "search"}),
    ("w8a8 static activations, SmoothQuant alpha searched", "w8a8", "magnitude", {"alpha": "search", "activations": "static"}),
    ("2:4 magnitude", "2:4", "magnitude", {}),
    ("2:4 Wanda", "2:4", "wanda", {}),
    ("2:4 SparseGPT one-shot (dense inputs)", "2:4", "sparsegpt", {"sequential": False}),
    ("2:4 SparseGPT sequential", "2:4", "sparsegpt", {}),
    ("2:4+w8a8 SparseGPT sequential", "2:4+w8a8", "sparsegpt", {}),
    ("2:4+w8a8 static activations, SparseGPT sequential", "2:4+w8a8", "sparsegpt", {"activations": "static"}),
]
RECOVER = [("2:4 SparseGPT + recovery", "2:4 SparseGPT sequential"),
           ("2:4+w8a8 SparseGPT + recovery", "2:4+w8a8 SparseGPT sequential")]


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace) -> list:
    args.git_sha = git_sha()  # the code that ran, even if HEAD moves while the table is computed
    torch.manual_seed(0)
    model, tok = load_model()
    texts = load_texts(n_calib=args.calib, n_eval=args.eval_lines, n_train=args.train_lines)
    batches = batches_by_length(tok, texts.eval, 128)
    ref = embed(model, batches, desc="dense")
    dense_mib = linear_weight_bytes(model)["before"] / 2**20
    rows, models = [], {}
    rows.append({"method": "dense (bf16)", "recipe": "dense", "cosine": 1.0, "cosine_min": 1.0, "nn_agreement": 1.0,
                 "linear_mib": round(dense_mib, 2), "seconds": 0.0})
    for name, recipe, method, opts in ROWS:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        compress_model(m, tok, texts.calib, recipe, method, **opts)
        rows.append(_row(name, recipe, ref, m, batches, time.perf_counter() - t0))
        models[name] = m
        print(_fmt(rows[-1]), flush=True)
    for name, base in RECOVER:
        m = models[base]
        t0 = time.perf_counter()
        rep = recover(m, model, tok, texts.train, steps=args.steps, lr=args.lr, batch_size=32)
        rows.append(_row(name, rows[[r["method"] for r in rows].index(base)]["recipe"], ref, m, batches,
                         time.perf_counter() - t0, f"{rep.steps} steps"))
        print(_fmt(rows[-1]), flush=True)
    return rows


def _row(name, recipe, ref, m, batches, seconds, note=""):
    s = compare(ref, embed(m, batches, desc="score"))
    return {"method": name + (f" ({note})" if note else ""), "recipe": recipe, "cosine": round(s.cosine, 4),
            "cosine_min": round(s.cosine_min, 4), "nn_agreement": round(s.nn_agreement, 3),
            "linear_mib": round(linear_weight_bytes(m)["after"] / 2**20, 2), "seconds": round(seconds, 1)}


def _fmt(r: dict) -> str:
    return (f"{r['method']:<48} {r['recipe']:<10} cos {r['cosine']:.4f} min {r['cosine_min']:.3f} "
            f"nn {r['nn_agreement']:.3f} {r['linear_mib']:6.2f} MiB {r['seconds']:6.1f} s")


def write(rows: list, args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = (f"sparseq accuracy, git {getattr(args, 'git_sha', None) or git_sha()}, torch {torch.__version__}, {platform.machine()} CPU x{torch.get_num_threads()} threads, "
            f"{datetime.date.today()}; bundled all-MiniLM-L6-v2, calibration {args.calib} lines of Hamlet, "
            f"{args.eval_lines} held-out lines of 6 other plays, recovery {args.steps} steps (lr {args.lr}, batch 32, "
            f"every layer's output distilled) on {args.train_lines} lines of 30 other plays")
    with open(out / "accuracy.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"<!-- {meta} -->", "", f"Targets: {TARGETS}.", "",
             "| method | recipe | cosine | min cosine | NN agreement | Linear weights (MiB) | time (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['recipe']} | {r['cosine']:.4f} | {r['cosine_min']:.3f} | {r['nn_agreement']:.3f} | "
              f"{r['linear_mib']:.2f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", meta, ""]
    (out / "accuracy.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["method"] for r in rows]
    ax.barh(range(len(rows)), [r["cosine"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    ax.barh(range(len(rows)), [r["nn_agreement"] for r in rows], height=0.3, color="tab:orange", label="NN agreement")
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    for y, r in enumerate(rows):
        ax.text(min(r["cosine"], 1.0) + 0.005, y, f"{r['cosine']:.4f}", va="center", fontsize=7)
    for x in (0.89, 0.96, 0.997):
        ax.axvline(x, color="gray", ls="--", lw=0.6)
    ax.set_xlim(0.0, 1.08)
    ax.set_xlabel("mean cosine vs dense (bars); nearest-neighbour agreement (orange)")
    ax.set_title("all-MiniLM-L6-v2 on held-out Shakespeare", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--eval-lines", type=int, default=1200)
    p.add_argument("--train-lines", type=int, default=64000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, output to /tmp/sparseq-accuracy")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy"))
    args = p.parse_args()
    if args.quick:
        args.calib, args.eval_lines, args.train_lines, args.steps, args.out = 64, 200, 200, 5, "/tmp/sparseq-accuracy"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run(args)
    write(rows, args, Path(args.out))
    print(f"wrote {args.out}/accuracy.csv, accuracy.md, accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
