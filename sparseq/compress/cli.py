"""``sparseq compress`` / ``sparseq eval`` / ``sparseq plan`` subcommands (a CLI plugin)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli import command
from .recipe import DEFAULT_RECIPE


def _threads(n: int) -> None:
    import torch

    from .job import default_threads

    torch.set_num_threads(n or default_threads())


def _fail(msg: str) -> int:
    print(f"sparseq: error: {msg}", file=sys.stderr)
    return 2


def _recipe_arg(value: str):
    """A format string, or a JSON dict / JSON file of ``{layer pattern: format}``."""
    from pathlib import Path

    v = value.strip()
    if v.startswith("{"):
        return json.loads(v)
    if v.endswith(".json") and Path(v).is_file():
        data = json.loads(Path(v).read_text())
        return data.get("recipe", data) if isinstance(data, dict) else data  # plan.json or a plain dict
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="transformers model directory (default: bundled all-MiniLM-L6-v2); a "
                        "causal LM (e.g. sparseq/models/llama_shakespeare) is scored by perplexity instead of cosine")
    p.add_argument("--text", metavar="FILE", help="plain-text file, one sentence a line (default: bundled Shakespeare)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: cores, at most 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("compress")
def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="prune/quantize a model, report accuracy, save it (the main job)")
    _common(p)
    p.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help="format for every Linear (2:4, w8a8, int8_weight_only, 2:4+w8a8, 2:4+int8_weight_only, "
                        "N:M, 50%%, dense) or a JSON dict/file {layer pattern: format} (default %(default)s)")
    p.add_argument("--schedule", metavar="R1,R2,...",
                   help="compress step by step instead: formats applied in turn, each scored (and recovered with "
                        "--recover), e.g. 30%%,50%%,2:4,2:4+w8a8")
    p.add_argument("--floor", type=float, metavar="LIMIT",
                   help="with --schedule: undo and stop at the first step whose cosine ends below this (causal LM: "
                        "whose perplexity ratio to dense ends above this, e.g. 1.1)")
    p.add_argument("--method", default="sparsegpt", choices=("magnitude", "wanda", "sparsegpt"))
    p.add_argument("--alpha", default="search", help="SmoothQuant migration strength, 'search' (default) or 'none'")
    p.add_argument("--activations", default="dynamic", choices=("dynamic", "static"),
                   help="W8A8 activation scales: per token at run time (default) or one calibrated scale per layer")
    p.add_argument("--calib", type=int, default=512, help="calibration lines (default %(default)s)")
    p.add_argument("--eval-lines", type=int, default=1200, help="held-out lines scored (default %(default)s)")
    p.add_argument("--recover", action="store_true", help="distillation recovery with masks fixed")
    p.add_argument("--steps", type=int, default=200, help="recovery steps of 32 lines (default %(default)s; 2000 took the bundled model "
                        "to cosine 0.964 in README's table, about 14 min on 2 CPU cores)")
    p.add_argument("--lr", type=float, default=None,
                   help="recovery peak learning rate (default 1e-3 for embedding models, 1e-4 for causal LMs)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="recover through LoRA adapters of this rank, merged back")
    p.add_argument("--out", default="sparseq-out", metavar="DIR", help="where to save (default %(default)s)")
    p.add_argument("--no-save", action="store_true", help="report only")
    p.set_defaults(func=run_compress)


def run_compress(args: argparse.Namespace) -> int:
    from .data import DataError
    from .job import compress_job
    from .progress import set_quiet

    set_quiet(args.quiet)
    _threads(args.threads)
    alpha = args.alpha if args.alpha in ("search", "none") else float(args.alpha)
    if args.floor is not None and not args.schedule:
        return _fail("--floor needs --schedule (a floor stops a schedule of several steps)")
    schedule = [r.strip() for r in args.schedule.split(",") if r.strip()] if args.schedule else None
    if args.schedule is not None and not schedule:
        return _fail("--schedule is empty: give formats separated by commas, e.g. 50%,2:4")
    try:
        recipe = _recipe_arg(args.recipe)
        report = compress_job(args.model, args.text, recipe, args.method, args.out,
                              recover_steps=args.steps if args.recover else 0, n_calib=args.calib,
                              n_eval=args.eval_lines, alpha=alpha, lora_rank=args.lora, save=not args.no_save,
                              activations=args.activations, recover_lr=args.lr, schedule=schedule, floor=args.floor)
    except (DataError, ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as e:
        return _fail(str(e))
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    """The human-readable summary of a compress run."""
    print()
    print(f"{'layer':<44} {'format':<22} {'alpha':>5} {'rel. err':>9}")
    for layer in report["layers"]:
        a = "-" if layer["alpha"] is None else ("off" if layer["alpha"] < 0 else f"{layer['alpha']:.2f}")
        print(f"{layer['name']:<44} {layer['format']:<22} {a:>5} {layer['rel_error']:>9.2e}")
    mib = 2 ** 20
    b, a = report["linear_bytes_bf16"], report["linear_bytes_compressed"]
    if report.get("schedule"):
        from .schedule import Step, steps_table
        from .tasks import scores_from_dict

        steps = [Step(**dict(s, oneshot=scores_from_dict(s["oneshot"]),
                             recovered=scores_from_dict(s["recovered"]) if s["recovered"] else None))
                 for s in report["steps"]]
        print("\n" + steps_table(steps, b))
    print(f"\nLinear weights: {b / mib:.2f} MiB (bf16) -> {a / mib:.2f} MiB ({b / max(a, 1):.2f}x smaller)")
    from .tasks import scores_from_dict

    for name, s in report["scores"].items():
        print(f"accuracy ({name}) vs dense on {s['n']} held-out lines: {scores_from_dict(s).summary()}")
    if report.get("speed"):
        sp = report["speed"]
        print(f"speed (GPU, one batch): dense {sp['dense_ms']:.2f} ms, compressed {sp['compressed_ms']:.2f} ms ({sp['speedup']:.2f}x)")
    else:
        print("speed: no GPU here (CPU runs the reference ops; see `sparseq bench` on a GPU)")
    if report.get("out"):
        print(f"saved to {report['out']} (sparseq.load('{report['out']}'); re-score: sparseq eval {report['out']})")
    print(f"total {report['seconds']:.0f} s")


@command("eval")
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="re-score a model saved by `sparseq compress` against its dense original")
    p.add_argument("path", metavar="DIR")
    _common(p)
    p.add_argument("--eval-lines", type=int, default=0, help="held-out lines (default: as when compressed)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .data import DataError
    from .job import eval_saved
    from .progress import set_quiet

    set_quiet(args.quiet)
    _threads(args.threads)
    t0 = time.perf_counter()
    try:
        r = eval_saved(args.path, args.model, args.text, args.eval_lines or None)
    except (DataError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"{r['path']}: recipe {r['recipe']}, method {r['method']}, task {r['task']}")
    print(f"{r['summary']} on {r['n']} lines ({time.perf_counter() - t0:.0f} s)")
    if r.get("reported") is not None:
        print(f"(compress reported {r['metric']} {r['reported']:.4f} with simulated layers)")
    return 0


@command("plan")
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-layer format under an accuracy budget; accuracy-vs-speed frontier plot")
    _common(p)
    p.add_argument("--budget", type=float, default=0.01,
                   help="allowed loss vs dense: of mean cosine, or for a causal LM of perplexity ratio - 1 "
                        "(0.05: at most 5%% higher perplexity) (default %(default)s)")
    p.add_argument("--formats", default="2:4,w8a8,2:4+w8a8,int8_weight_only,2:4+int8_weight_only",
                   help="candidate formats, comma separated")
    p.add_argument("--speedups", metavar="CSV", help="measured per-layer speedups (ops.csv of sparseq bench); default: tabled")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--eval-lines", type=int, default=600)
    p.add_argument("--out", default="sparseq-plan", metavar="DIR", help="plan.json, plan.md and frontier.png go here")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from .data import DataError
    from .planner import plan_job
    from .progress import set_quiet

    set_quiet(args.quiet)
    _threads(args.threads)
    try:
        text = plan_job(args.model, args.text, [f.strip() for f in args.formats.split(",") if f.strip()],
                        args.budget, args.out, speedups_csv=args.speedups, n_calib=args.calib, n_eval=args.eval_lines)
    except (DataError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    print(text)
    return 0
