"""``sparseq tune``: measure every backend per op, shape and M bucket on this GPU and save
the winners as the dispatch table (``sparseq.dispatch.tuned_table_path()``).

A bucket where dense ``F.linear`` is faster than every sparseq kernel is saved as
``dense``, so a layer never runs slower than the dense layer it replaced. Every candidate's
output is checked against the dense layer it replaces (``sparseq.testing.check_layer_close``,
the format's stated bound) before it is timed: a fast wrong kernel is reported and never saved.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from . import dispatch
from .cli import command

FORMATS = ("2:4", "int8_weight_only", "w8a8", "2:4+w8a8", "2:4+int8_weight_only")
MARGIN = 0.97
"""A kernel must beat dense by 3% (timing noise) to be chosen over it."""


def _time_us(fn, x) -> float:
    from triton.testing import do_bench

    return 1000.0 * do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median")


def choose_backend(layer, x: torch.Tensor, dense_us: float, backends: Sequence[str] = ("triton", "cutlass"),
                   time_us: Callable = _time_us) -> Tuple[str, float, Dict[str, str]]:
    """``(backend, microseconds, rejected)`` for one layer and batch ``x``: the fastest candidate
    that computes the right answer and beats dense by :data:`MARGIN`, else ``dense``.
    ``rejected`` maps each candidate that was not timed to why (wrong output, error)."""
    from .testing import check_layer_close

    best, best_us = "dense", dense_us
    rejected: Dict[str, str] = {}
    for backend in backends:
        try:
            impl = layer.backend_impl(backend, x.shape[0], x.dtype, x.device)
            if impl is None:
                continue
            with torch.no_grad():
                wrong = check_layer_close(layer, x, impl(x))
            if wrong is not None:
                rejected[backend] = f"wrong output: {wrong}"
                continue
            us = time_us(impl, x)
        except Exception as e:  # a kernel that cannot run this shape loses
            rejected[backend] = f"{type(e).__name__}: {e}"
            continue
        if us < min(best_us, MARGIN * dense_us):
            best, best_us = backend, us
    return best, best_us, rejected


def tune_shape(n: int, k: int, dtype: torch.dtype, formats: Sequence[str] = FORMATS) -> Dict[str, Dict[str, str]]:
    """``{table key: {bucket: backend}}`` for one ``N x K`` on the current GPU."""
    from .nn.swap import make_layer

    device = torch.device("cuda", torch.cuda.current_device())
    cap = torch.cuda.get_device_capability(device)
    lin = nn.Linear(k, n, bias=True, device=device, dtype=dtype)
    out: Dict[str, Dict[str, str]] = {}
    for fmt in formats:
        layer = make_layer(lin, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
        choice: Dict[str, str] = {}
        for bucket, m in zip(dispatch.BUCKET_NAMES, dispatch.BUCKET_M):
            x = torch.randn(m, k, device=device, dtype=dtype)
            with torch.no_grad():
                dense_us = _time_us(lambda t: torch.nn.functional.linear(t, lin.weight, lin.bias), x)
                best, best_us, rejected = choose_backend(layer, x, dense_us)
            for backend, why in rejected.items():
                print(f"  {fmt} {backend} M={m}: not chosen: {why}", file=sys.stderr)
            choice[bucket] = best
            print(f"{fmt:<18} {n:>6}x{k:<6} M={m:<5} dense {dense_us:8.1f} us -> {best} {best_us:8.1f} us")
        out[dispatch.tuned_key(layer.table_op, n, k, dtype, cap)] = choice
    return out


def _parse_shape(text: str) -> Tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096 (N x K), got {text!r}") from None
    return n, k


@command("tune")
def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="measure kernels on this GPU and save the dispatch table")
    p.add_argument("--shape", type=_parse_shape, action="append", help="N x K (repeatable); default Llama-3-8B")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("sparseq tune: no CUDA GPU here; tuning measures kernels on the GPU that will run them",
              file=sys.stderr)
        return 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shapes: List[Tuple[int, int]] = args.shape or [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        print(f"sparseq tune: unknown formats {unknown}; choose from {sorted(FORMATS)}", file=sys.stderr)
        return 2
    path = dispatch.tuned_table_path()
    table = json.loads(path.read_text()) if path.exists() else {}
    for n, k in shapes:
        table.update(tune_shape(n, k, dtype, formats))
    table["_meta"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "note": "written by sparseq tune: {op|N|K|dtype|arch: {M bucket: backend}}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a server reading the table never sees half of it
    dispatch.reload_tables()
    print(f"sparseq tune: saved {len(table)} entries to {path}")
    return 0
