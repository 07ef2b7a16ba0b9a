"""The speed table of the Triton kernels (issue 4): each kernel vs dense bf16 ``F.linear`` (cuBLAS).

Shapes (N x K): 4096x4096, 14336x4096, 4096x14336, 28672x8192; M = 1 ... 4096. Contenders:

| op | format | what is timed |
|---|---|---|
| gemm | int8_weight_only | ``int8_weight_only_mm(x, wq, w_scale)`` |
| gemm / linear | w8a8 | ``int8_mm`` alone / ``quantize_per_token`` + ``int8_mm`` |
| gemm | 2:4 | ``sparse24_mm(x, values, meta)`` (bf16 values) |
| gemm / linear | 2:4+int8_weight_only, 2:4+w8a8 | ``sparse24_int8_mm`` (+ ``quantize_per_token``) |
| compress | 2:4 | ``prune_and_compress_24(w)`` once per layer (ms in the one-time table) |

Every kernel output is checked against ``sparseq.reference`` elementwise, within the bound of
``sparseq.testing`` (int8 x int8: exact accumulator), at every M before it is timed: a wrong
kernel becomes an error row, never a time. Timing: ``triton.testing.do_bench`` median with the L2
flushed before every run, dense measured in the same run. Writes ``triton.csv`` (the columns of
``sparseq.benchmarks.CSV_COLUMNS``), ``triton.md`` (speedup tables, then each goal of the
issue: met or not, with the bytes moved and the bandwidth reached) to
``benchmarks/results/<gpu>/``.

    python benchmarks/bench_triton.py                       # H100: the issue's table
    python benchmarks/bench_triton.py --shape 4096x4096 --m 1,16
    python benchmarks/bench_triton.py --smoke --out /tmp/x  # CPU, interpreter: tiny shapes, no claims
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
M_LIST = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
SMOKE_SHAPES = [(64, 128), (128, 64)]
SMOKE_M = [1, 5, 32]
# (format, op, M range, target speedup, byte limit or None): the goals of issue 4.
GOALS = [
    ("w8a8", "linear", (4096, 1 << 30), 1.4, None),
    ("int8_weight_only", "gemm", (1, 16), 1.8, 2.0),
    ("2:4", "gemm", (1, 16), 1.5, 1.78),
    ("2:4+int8_weight_only", "gemm", (1, 16), 2.5, 3.2),
]
COMPRESS_GOAL_MS = 10.0  # prune_and_compress_24 on 28672x8192 bf16


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from sparseq.benchmarks import parse_shape

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", type=parse_shape, help="NxK (repeatable; default: the issue's four)")
    p.add_argument("--m", default=None, help="comma-separated M values")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench time budget per measurement")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<gpu>/)")
    p.add_argument("--name", default="triton", help="file stem of the CSV/markdown")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run under TRITON_INTERPRET=1: tiny shapes, fp16, never a speed claim")
    return p.parse_args(argv)


def _bytes(fmt: str, m: int, n: int, k: int, act: int) -> float:
    """Bytes a kernel must move: weights in their format, activations in, outputs out."""
    weight = {"dense": 2 * n * k, "int8_weight_only": n * k, "w8a8": n * k + 4 * n, "2:4": n * k + n * k / 8,
              "2:4+int8_weight_only": n * k / 2 + n * k / 8 + 4 * n, "2:4+w8a8": n * k / 2 + n * k / 8 + 4 * n}[fmt]
    x_bytes = m * k * (1 if "w8a8" in fmt else act)
    return weight + x_bytes + m * n * act


def _contenders(dtype: torch.dtype) -> List[Tuple[str, str, Callable, Callable, Callable]]:
    """(op, format, prepare(w) -> state, make(state, x) -> fn, check(state, x, y) -> None or what is wrong)."""
    from sparseq import reference as ref
    from sparseq.kernels import int8_mm, int8_weight_only_mm, quantize, sparse24_mm
    from sparseq.testing import check_matmul_close

    q = quantize.quantize_per_token

    def w8a8_check(st, x, y):  # the reference quantizer: the kernel's must match it bit for bit
        xq, xs = ref.quantize_per_token(x)
        return check_matmul_close(y, ref.int8_mm(xq, st[0], xs, st[1], None, dtype), xq, st[0], xs, st[1])

    def s24_w8a8_check(st, x, y):
        xq, xs = ref.quantize_per_token(x)
        expected = ref.sparse24_int8_mm(*_s24_args((xq, xs), st), None, dtype)
        return check_matmul_close(y, expected, xq, ref.decompress_24(st[0], st[1]), xs, st[2])

    def quant_w(w):
        return ref.quantize_per_channel(w)

    def s24(w):
        return ref.prune_and_compress_24(w)

    def s24q(w):
        return ref.prune_and_compress_24(w, None, quantize=True)

    def w8a8_gemm(st, x):
        xq, xs = q(x)
        return lambda: int8_mm.int8_mm(xq, st[0], xs, st[1], None, dtype)

    def s24_w8a8_gemm(st, x):
        xq, xs = q(x)
        return lambda: sparse24_mm.sparse24_int8_mm(xq, st[0], st[1], st[2], xs, None, dtype)

    return [
        ("gemm", "int8_weight_only", quant_w, lambda st, x: lambda: int8_weight_only_mm.int8_weight_only_mm(x, *st),
         lambda st, x, y: check_matmul_close(y, ref.int8_weight_only_mm(x, *st), x, st[0], w_scale=st[1])),
        ("gemm", "w8a8", quant_w, w8a8_gemm, w8a8_check),
        ("linear", "w8a8", quant_w, lambda st, x: lambda: int8_mm.int8_mm(*_pair(q(x), st), None, dtype), w8a8_check),
        ("gemm", "2:4", s24, lambda st, x: lambda: sparse24_mm.sparse24_mm(x, *st),
         lambda st, x, y: check_matmul_close(y, ref.sparse24_mm(x, *st), x, ref.decompress_24(*st))),
        ("gemm", "2:4+int8_weight_only", s24q, lambda st, x: lambda: sparse24_mm.sparse24_int8_mm(x, *st),
         lambda st, x, y: check_matmul_close(y, ref.sparse24_int8_mm(x, *st), x, ref.decompress_24(st[0], st[1]),
                                      w_scale=st[2])),
        ("gemm", "2:4+w8a8", s24q, s24_w8a8_gemm, s24_w8a8_check),
        ("linear", "2:4+w8a8", s24q,
         lambda st, x: lambda: sparse24_mm.sparse24_int8_mm(*_s24_args(q(x), st), None, dtype), s24_w8a8_check),
    ]


def _pair(xq_xs, st):
    """(xq, wq, x_scale, w_scale) for int8_mm."""
    return xq_xs[0], st[0], xq_xs[1], st[1]


def _s24_args(xq_xs, st):
    """(xq, qvalues, meta, w_scale, x_scale) for sparse24_int8_mm."""
    return xq_xs[0], st[0], st[1], st[2], xq_xs[1]


def run(shapes: Sequence[Tuple[int, int]], ms: Sequence[int], dtype_name: str, timer, device: torch.device) -> list:
    """Measure every contender on every (shape, M); returns ``sparseq.benchmarks.Row`` objects."""
    import torch.nn.functional as F

    from sparseq import benchmarks as bm
    from sparseq.kernels import prune_compress
    from sparseq.testing import check_matmul_close

    dtype = bm.DTYPES[dtype_name]
    act = torch.tensor([], dtype=dtype).element_size()
    rows: List[bm.Row] = []
    for n, k in shapes:
        w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        try:
            prune_compress.prune_and_compress_24(w)  # compile outside the timing
            t = timer(lambda: prune_compress.prune_and_compress_24(w))
            rows.append(bm.Row("compress", "triton", "2:4", dtype_name, n, k, None, time_us=t,
                               bytes=2 * n * k + n * k + n * k / 8))
        except Exception as e:  # noqa: BLE001
            rows.append(bm.Row("compress", "triton", "2:4", dtype_name, n, k, None, error=bm.error_text(e)))
        states: Dict[str, object] = {}
        for m in ms:
            x = torch.randn(m, k, device=device).to(dtype)
            base = bm.Row("linear", "torch", "dense", dtype_name, n, k, m, flops=2.0 * m * n * k,
                          bytes=_bytes("dense", m, n, k, act))
            with bm.ieee_fp32():
                wrong = check_matmul_close(F.linear(x, w), (x.float() @ w.float().T).to(dtype), x, w)
            if wrong:  # the baseline of every speedup: no time, so no speedup either
                base.error = f"wrong result: {wrong} (vs the fp32 matmul)"
            else:
                base.time_us = base.dense_us = timer(lambda: F.linear(x, w))
                base.checked = "yes"
            dense = base.time_us
            rows.append(base)
            for op, fmt, prep, make, check in _contenders(dtype):
                row = bm.Row(op, "triton", fmt, dtype_name, n, k, m, dense_us=dense, flops=2.0 * m * n * k,
                             bytes=_bytes(fmt, m, n, k, act))
                try:
                    if fmt not in states:
                        states[fmt] = prep(w)
                    fn = make(states[fmt], x)
                    with bm.ieee_fp32():
                        wrong = check(states[fmt], x, fn())
                    if wrong:
                        raise AssertionError(f"wrong result: {wrong} (vs sparseq.reference)")
                    row.time_us = timer(fn)
                    row.checked = "yes"
                except Exception as e:  # noqa: BLE001
                    row.error = bm.error_text(e)
                rows.append(row)
            del x
        del w, states
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def goals_markdown(rows: Sequence, smoke: bool) -> str:
    """Each goal of issue 4: the best speedup in its M range, met or not, and what bounds it."""
    lines = ["## Goals of issue 4", ""]
    if smoke:
        lines += ["CPU smoke run: no goal can be judged.", ""]
    lines += ["| goal | shape | best M | speedup | target | byte limit | met | bytes moved | achieved |",
              "|---|---|---|---|---|---|---|---|---|"]
    for fmt, op, (lo, hi), target, limit in GOALS:
        for (n, k) in dict.fromkeys((r.N, r.K) for r in rows):
            cands = [r for r in rows if r.format == fmt and r.op == op and (r.N, r.K) == (n, k)
                     and r.M is not None and lo <= r.M <= hi and r.speedup]
            if not cands:
                continue
            best = max(cands, key=lambda r: r.speedup)
            per_s = 1e6 / best.time_us
            achieved = (f"{best.bytes * per_s / 1e9:.3g} GB/s" if limit else f"{best.flops * per_s / 1e12:.3g} TOP/s")
            met = "–" if smoke else ("yes" if best.speedup >= target else "no")
            bound = f"{limit}x" if limit else "–"
            lines.append(f"| {fmt} ({op}), M {lo}-{min(hi, 10**6)} | {n}x{k} | {best.M} | {best.speedup:.2f}x | "
                         f"{target}x | {bound} | {met} | {best.bytes / 1e6:.3g} MB | {achieved} |")
    comp = [r for r in rows if r.op == "compress" and r.time_us]
    for r in comp:
        met = "–" if smoke else ("yes" if r.time_us / 1e3 < COMPRESS_GOAL_MS else "no")
        lines.append(f"| prune_and_compress_24 | {r.N}x{r.K} | – | {r.time_us / 1e3:.3f} ms | "
                     f"< {COMPRESS_GOAL_MS} ms | – | {met} | {r.bytes / 1e6:.3g} MB | "
                     f"{r.bytes / r.time_us / 1e3:.3g} GB/s |")
    lines += ["", "Small-M goals are bound by bytes (weights in their format + activations + outputs): "
              "'achieved' is that traffic divided by the time (H100 SXM copy rate ~3.0 TB/s). "
              "The W8A8 goal is bound by the int8 tensor-core rate ('achieved': 2·M·N·K / time).", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; running the CPU smoke mode (no speed claims)", file=sys.stderr)
        args.smoke = True
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels (and triton.jit) are imported
    from sparseq import benchmarks as bm

    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    shapes = args.shape or (SMOKE_SHAPES if args.smoke else SHAPES)
    ms = [int(v) for v in args.m.split(",")] if args.m else (SMOKE_M if args.smoke else M_LIST)
    dtype = "fp16" if args.smoke else args.dtype  # the interpreter has no bf16
    timer = bm.Timer(device, rep_ms=args.rep_ms, cpu_reps=1)
    env = bm.environment(device)
    rows = run(shapes, ms, dtype, timer, device)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="sparseq-bench-triton-")) if args.smoke
                                           else bm.results_dir(env))
    csv_path = bm.write_csv(out / f"{args.name}.csv", rows, env)
    title = "sparseq Triton kernels vs dense F.linear" + (" — CPU smoke run, not a speed claim" if args.smoke else "")
    md = bm.speedup_markdown(rows, env, title) + "\n" + goals_markdown(rows, args.smoke)
    if args.smoke:
        md = bm.smoke_env_note() + "\n\n" + md
    bm.write_markdown(out / f"{args.name}.md", md)
    bm.print_rows([r for r in rows if r.op not in bm.ONE_TIME_OPS])
    print(f"results: {csv_path} and {args.name}.md")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
