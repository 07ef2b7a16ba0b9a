"""``sparseq bench``: the command line of the op sweep (``benchmarks/bench_ops.py`` is its script
form); writes ``ops[_mode].csv``, ``.md`` and PNGs, and ``--full`` adds the end-to-end runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ..cli import command
from . import harness as hn
from . import report
from .harness import (M_CPU, M_FULL, M_QUICK, M_SMOKE, QUICK_SHAPES, SMOKE_SHAPES, all_shapes, cpu_shapes,
                      parse_shape)
from .results import ONE_TIME_OPS, Row, rows_from_csv, write_csv
from .sweep import run_op_sweep

# -------------------------------------------------------------------------------- CLI


def add_op_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``sparseq bench`` and ``benchmarks/bench_ops.py``."""
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny shapes, reference (+ interpreter) ops")
    p.add_argument("--quick", action="store_true", help="a few Llama-3-8B shapes and M values (< 2 min on a GPU)")
    p.add_argument("--cpu", action="store_true", help="measure the CPU paths: fp32/bf16 nn.Linear (the baseline), "
                   "quantize_dynamic (the peer) and every sparseq layer, on MiniLM's shapes and 2048x2048")
    p.add_argument("--threads", type=int, default=None, help="--cpu: torch.set_num_threads for the run "
                   "(default: torch's current count); the file stem names it")
    p.add_argument("--shape", action="append", type=parse_shape, default=[], metavar="NxK",
                   help="an extra weight shape, N x K (out x in); repeatable")
    p.add_argument("--models", default="llama3-8b,llama3-70b,mistral-7b,minilm",
                   help="model shape sets of the full sweep (comma separated; 'none' for --shape only)")
    p.add_argument("--m", default=None, help="comma-separated M values (default: the issue's list)")
    p.add_argument("--dtype", default=None, help="comma-separated activation dtypes: bf16,fp16 (default both)")
    p.add_argument("--backends", default="", help="only contenders whose backend contains one of these (comma separated)")
    p.add_argument("--with-reference", action="store_true", help="also time the pure-PyTorch reference ops")
    p.add_argument("--no-check", action="store_true", help="skip checking each output against the reference math "
                   "(rows are marked 'no: --no-check', tables carry a note)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition budget per measurement (ms)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<gpu>/)")
    p.add_argument("--name", default=None, help="file stem (default ops / ops_quick / ops_smoke): split a long "
                   "sweep into runs with their own files, then --merge them")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="CSV",
                   help="measure nothing: combine these results CSVs into <out>/<name>.csv/.md/.png")


def _csv_list(text: Optional[str], cast: Callable[[str], Any]) -> List[Any]:
    return [cast(v) for v in text.split(",") if v.strip()] if text else []


def op_plan(args: argparse.Namespace) -> Tuple[str, List[Tuple[int, int]], List[int], List[str]]:
    """(mode, shapes, Ms, dtypes) from the options."""
    if args.smoke:
        mode, shapes, ms, dtypes = "smoke", list(SMOKE_SHAPES), list(M_SMOKE), ["fp16"]
    elif getattr(args, "cpu", False):
        mode, shapes, ms, dtypes = "cpu", list(args.shape) or cpu_shapes(), list(M_CPU), ["fp32", "bf16"]
    elif args.quick:
        mode, shapes, ms, dtypes = "quick", list(QUICK_SHAPES), list(M_QUICK), ["bf16"]
    else:
        models = [m for m in _csv_list(args.models, str) if m != "none"]
        try:
            shapes = list(all_shapes(models)) if models else []
        except ValueError as e:
            raise SystemExit(f"--models: {e}") from None
        mode, ms, dtypes = "full", list(M_FULL), ["bf16", "fp16"]
    shapes += [s for s in args.shape if s not in shapes]
    ms = _csv_list(args.m, int) or ms
    dtypes = _csv_list(args.dtype, str) or dtypes
    bad = [d for d in dtypes if d not in hn.DTYPES]
    if bad:
        raise SystemExit(f"unknown dtype {bad}; choose from {sorted(hn.DTYPES)}")
    return mode, shapes, ms, dtypes


def write_op_results(out: Path, stem: str, rows: Sequence[Row], env: hn.Environment, title: str) -> None:
    """``<stem>.csv``, ``<stem>.md`` and ``<stem>_<N>x<K>_<dtype>.png`` under ``out``."""
    names = all_shapes()
    write_csv(out / f"{stem}.csv", rows, env)
    report.write_markdown(out / f"{stem}.md", report.speedup_markdown(rows, env, title, names))
    report.plot_speedups(rows, env, out, prefix=stem, shape_names=names)


def merge_ops(args: argparse.Namespace) -> Tuple[Path, List[Row]]:
    """Combine results CSVs of split runs into one set of files (rows keep their own environment)."""
    rows = [r for path in args.merge for r in rows_from_csv(path)]
    if not rows:
        raise SystemExit("--merge: the CSVs hold no rows")
    env = rows[0].env
    shas = sorted({r.env.git_sha for r in rows if r.env})
    if len(shas) > 1:
        env = hn.Environment(env.gpu, env.torch, env.cuda, "/".join(shas))
    out = Path(args.out) if args.out else hn.results_dir(env)
    write_op_results(out, args.name or "ops", rows, env, "sparseq op sweep")
    return out, rows


def run_ops(args: argparse.Namespace) -> Tuple[Path, List[Row]]:
    """Run the op sweep the options describe and write ``ops[_mode].csv/.md`` and PNGs; returns (folder, rows)."""
    if getattr(args, "merge", None):
        return merge_ops(args)
    if getattr(args, "cpu", False) and not args.smoke:
        return run_cpu_ops(args)
    if not args.smoke and not torch.cuda.is_available():
        print("sparseq bench: no CUDA GPU here, so no GPU speed can be measured; running the CPU smoke mode "
              "instead (checks that the benchmark works; its times are not speed claims). "
              "`sparseq bench --cpu` measures the CPU paths.")
        args.smoke = True
    device = torch.device("cpu") if args.smoke else hn.default_device()
    mode, shapes, ms, dtypes = op_plan(args)
    env = hn.environment(device)
    smoke = args.smoke
    timer = hn.Timer(device, warmup_ms=5 if mode == "quick" else 10,
                     rep_ms=args.rep_ms or (20 if mode == "quick" else 50), cpu_reps=2 if smoke else 5)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="sparseq-bench-smoke-")) if smoke
                                           else hn.results_dir(env))
    print(f"sparseq bench ({mode}): {env.header()}")
    if smoke:
        print(hn.smoke_env_note())
    rows = run_op_sweep(shapes, ms, dtypes, timer, include_reference=args.with_reference or smoke,
                        only=_csv_list(args.backends, str), check=not args.no_check)
    stem = args.name or ("ops" if mode == "full" else f"ops_{mode}")
    title = f"sparseq op sweep ({mode})" + (" — CPU smoke run, not a speed claim" if smoke else "")
    write_op_results(out, stem, rows, env, title)
    return out, rows


def run_cpu_ops(args: argparse.Namespace) -> Tuple[Path, List[Row]]:
    """``--cpu``: every sparseq layer vs fp32/bf16 ``nn.Linear`` and ``quantize_dynamic`` on this CPU
    at ``--threads``, timed in interleaved rounds; writes ``ops_cpu_t<threads>.csv/.md`` and PNGs
    under ``benchmarks/results/cpu-<model>-<cores>c/``."""
    device = torch.device("cpu")
    mode, shapes, ms, dtypes = op_plan(args)
    threads_before = torch.get_num_threads()
    threads = args.threads or threads_before
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    env = hn.environment(device)
    timer = hn.Timer(device, cpu_reps=10, rounds=5)
    out = Path(args.out) if args.out else hn.results_dir(env)
    print(f"sparseq bench (cpu, {threads} threads): {env.header()}")
    torch.set_num_threads(threads)
    try:
        rows = run_op_sweep(shapes, ms, dtypes, timer, only=_csv_list(args.backends, str), check=not args.no_check,
                            cpu=True)
    finally:
        torch.set_num_threads(threads_before)
    stem = args.name or f"ops_cpu_t{threads}"
    title = (f"sparseq layers on CPU, {threads} thread{'s' if threads > 1 else ''} (dense: nn.Linear; "
             "peer: torch.ao quantize_dynamic)")
    write_op_results(out, stem, rows, env, title)
    return out, rows


@command("bench")
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark sparseq kernels and layers against dense and peers")
    p.add_argument("--full", action="store_true", help="the whole suite: full op sweep and end-to-end runs")
    add_op_args(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """``sparseq bench``: a quick sweep by default, ``--full`` for the suite, ``--smoke`` on the CPU."""
    if not args.smoke and not args.full:
        args.quick = True
    out, rows = run_ops(args)
    timed = [r for r in rows if r.op not in ONE_TIME_OPS]
    if len(timed) <= 400:
        report.print_rows(timed)
    else:
        print(f"{len(timed)} measurements, {sum(1 for r in timed if r.error)} failed: see the .md tables")
    print(f"results: {out}")
    if args.full and not args.smoke and not args.merge and not args.cpu:  # CPU end to end: bench_cpu.py
        return run_e2e_script(["--out", str(out)])
    return 0


def run_e2e_script(argv: List[str]) -> int:
    """Run ``benchmarks/bench_e2e.py`` of the source checkout (not installed with the package)."""
    root = hn.repo_root()
    script = root / "benchmarks" / "bench_e2e.py" if root else None
    if script is None or not script.exists():
        print("sparseq bench --full: the end-to-end benchmark lives in benchmarks/bench_e2e.py of the source "
              "checkout; run it from there (python benchmarks/bench_e2e.py).")
        return 0
    spec = importlib.util.spec_from_file_location("sparseq_bench_e2e", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)
