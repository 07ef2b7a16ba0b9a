"""CPU W8A8 kernel candidates, alone, per shape, dtype, M and thread count: the numbers behind the
``cpu_fast`` thresholds of ``sparseq/data/dispatch_default.json``.

Contenders (bias included, no layer or dispatch overhead):

- ``dense``: ``F.linear`` on the dequantized weight in the compute dtype (the dense bucket);
- ``fbgemm``: ``sparseq.cpu_fbgemm`` (fbgemm's int8 GEMM in ``cpu_fbgemm.default_form()``, or
  ``--fbgemm-form``; the form is printed to stderr), checked equal to the reference (the exact
  ``packed_gemm`` form) or within ``cpu_fbgemm.error_bound`` of it (``linear_dynamic``);
- ``exact``: ``sparseq.cpu_ops`` (the W8A8 format bit for bit: per-token quantization and
  epilogue in ``sparseq._C_cpu`` where built, oneDNN's int8 GEMM or ``torch._int_mm``),
  checked equal to the reference.

An output that fails its check stops the run (exit 1). Timing: contenders interleaved in 7
rounds of repeated calls within ``--budget`` seconds each; the median per-call time in us.
Run: ``python benchmarks/bench_cpu_kernels.py --m 1,2,16,64,256 --out FILE.csv`` (~3 min on
2 cores for the default shapes at 1 and 2 threads).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from sparseq import cpu_fbgemm, cpu_kernels, cpu_ops
from sparseq import reference as ref

SHAPES = "384x384,1536x384,384x1536,1024x1024,2048x2048,4096x4096"
COLUMNS = ["threads", "dtype", "N", "K", "M", "dense", "fbgemm", "exact"]


def median_us(fs: Dict[str, Callable[[], object]], budget: float, rounds: int = 7) -> Dict[str, float]:
    """Median per-call time of each contender, interleaved round by round."""
    reps = {}
    for name, f in fs.items():
        f(), f()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.02:
            f()
            n += 1
        per_call = (time.perf_counter() - t0) / n
        reps[name] = max(3, min(200, int(budget / rounds / per_call)))
    times: Dict[str, list] = {name: [] for name in fs}
    for _ in range(rounds):
        for name, f in fs.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                f()
            times[name].append((time.perf_counter() - t) / reps[name] * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def check(x, wq, ws, bias, y_fbgemm, y_exact, fbgemm_exact: bool = False) -> None:
    xq, scale = ref.quantize_per_token(x)
    want = ref.int8_mm(xq, wq, scale, ws, bias, torch.float32)
    if not torch.equal(y_exact.float(), want.to(x.dtype).float()):
        raise SystemExit(f"exact path differs from the reference (max {(y_exact.float() - want).abs().max():.3g})")
    if fbgemm_exact:
        if not torch.equal(y_fbgemm.float(), want.to(x.dtype).float()):
            raise SystemExit("fbgemm's packed_gemm form differs from the reference")
        return
    bound = cpu_fbgemm.error_bound(x, wq, ws, None, bias) + (want.abs() * 2**-7 if x.dtype == torch.bfloat16 else 0)
    if not ((y_fbgemm.float() - want).abs() <= bound).all():
        raise SystemExit("fbgemm path outside cpu_fbgemm.error_bound")


def sweep_parser(doc: str, shapes: str, m: str, dtypes: str, budget: float) -> argparse.ArgumentParser:
    """The options of a kernel sweep (this script's, bench_cpu_woq.py's), with their defaults."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--shapes", default=shapes)
    p.add_argument("--m", default=m)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtypes", default=dtypes)
    p.add_argument("--budget", type=float, default=budget, help="seconds per contender and cell")
    p.add_argument("--out", type=Path, default=None, help="CSV file (default: stdout only)")
    return p


class Cell(NamedTuple):
    """One measurement of a sweep: its key, the shape's int8 weight, bias and dense copy in the
    compute dtype, and the activations."""
    threads: int
    dtype: torch.dtype
    n: int
    k: int
    m: int
    wq: torch.Tensor
    ws: torch.Tensor
    bias: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor

    def key(self) -> list:
        return [self.threads, str(self.dtype).replace("torch.", ""), self.n, self.k, self.m]


def cells(args: argparse.Namespace) -> Iterator[Cell]:
    """Every thread count x shape x dtype x M of a sweep (``sweep_parser``'s options), torch set
    to the thread count; each shape's weight is seeded by the shape, so every sweep sees the same."""
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            torch.manual_seed(n + k)
            wq, ws = ref.quantize_per_channel(torch.randn(n, k))
            bias = torch.randn(n)
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                w, b = (wq.float() * ws[:, None]).to(dtype), bias.to(dtype)
                for m in (int(v) for v in args.m.split(",")):
                    yield Cell(threads, dtype, n, k, m, wq, ws, bias, w, b, torch.randn(m, k).to(dtype))


def emit(rows: List[list], row: list) -> None:
    """Keep a CSV row and print it as it comes."""
    rows.append(row)
    print(",".join(map(str, row)), flush=True)


def main(argv=None) -> int:
    parser = sweep_parser(__doc__, SHAPES, "1,2,16,64,256", "float32,bfloat16", 0.3)
    parser.add_argument("--fbgemm-form", choices=cpu_fbgemm.FORMS, default=None,
                        help="the fbgemm contender's form (default: the one layers use here)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # torch's deprecation notes on quantized tensors
    if not cpu_kernels.available():
        print(f"note: {cpu_kernels.unavailable_reason()}", file=sys.stderr)
    form = args.fbgemm_form or cpu_fbgemm.default_form()
    print(f"note: fbgemm form {form}", file=sys.stderr)
    rows = []
    print(",".join(COLUMNS), flush=True)
    built: Dict[str, object] = {}
    for c in cells(args):
        if built.get("wq") is not c.wq:  # a new shape (or thread count): pack its weight once
            built = {"wq": c.wq, "fbgemm": cpu_fbgemm.w8a8_impl(cpu_fbgemm.PackedWeight(c.wq, c.ws, form), None, c.bias),
                     "exact": cpu_ops.w8a8_impl(cpu_ops.prepack(c.wq), c.ws, None, None, c.bias)}
        fbgemm, exact, x = built["fbgemm"], built["exact"], c.x
        check(x, c.wq, c.ws, c.bias, fbgemm(x), exact(x), fbgemm_exact=form == "packed_gemm")
        t = median_us({"dense": lambda: F.linear(x, c.w, c.b), "fbgemm": lambda: fbgemm(x),
                       "exact": lambda: exact(x)}, args.budget)
        emit(rows, c.key() + [f"{t[name]:.1f}" for name in COLUMNS[5:]])
    write_csv(args.out, COLUMNS, rows)
    return 0


def write_csv(path: Optional[Path], columns: List[str], rows: List[list]) -> None:
    """The rows under a header line, where ``--out`` names a file (also bench_cpu_woq.py's)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([columns] + rows)


if __name__ == "__main__":
    sys.exit(main())
