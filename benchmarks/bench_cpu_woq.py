"""sparseq's int8 weight-only CPU kernel (``cpu_woq``: ``sparseq._C_cpu``'s int8_weight_only_cpu)
alone against the dense GEMM it replaces, per shape, dtype, M and thread count: the numbers behind
the ``cpu_woq`` entries of the CPU tables in ``sparseq/data/dispatch_default.json``.

Contenders (bias included, no layer or dispatch overhead): ``dense`` = ``F.linear`` on the
dequantized weight in the compute dtype (what a weight-only layer runs otherwise); ``cpu_woq`` =
the kernel on the stored int8 weight, checked within the format's tolerance of
``reference.int8_weight_only_mm`` (``sparseq.testing.check_matmul_close``; a miss stops the run,
exit 1). Timing as ``bench_cpu_kernels.py``: interleaved rounds, median per-call time in us.
Run: ``python benchmarks/bench_cpu_woq.py --out FILE.csv`` (~6 min on 2 cores).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_kernels import cells, emit, median_us, sweep_parser, write_csv  # noqa: E402

from sparseq import cpu_kernels  # noqa: E402
from sparseq import reference as ref  # noqa: E402
from sparseq.testing import check_matmul_close  # noqa: E402

SHAPES = "384x384,1536x384,384x1536,2048x2048,4096x4096"
COLUMNS = ["threads", "dtype", "N", "K", "M", "dense_us", "cpu_woq_us", "speedup"]


def main(argv=None) -> int:
    args = sweep_parser(__doc__, SHAPES, "1,2,4,5,7,8,12,13,16,32,64", "float32,bfloat16,float16", 0.2).parse_args(argv)
    why = cpu_kernels.weight_only_unavailable_reason()
    if why:
        print(f"cpu_woq does not run here: {why}", file=sys.stderr)
        return 2
    rows = []
    print(",".join(COLUMNS), flush=True)
    for c in cells(args):
        y = cpu_kernels.int8_weight_only(c.x, c.wq, c.ws, c.bias)
        msg = check_matmul_close(y, ref.int8_weight_only_mm(c.x, c.wq, c.ws, c.bias), c.x, c.wq, None, c.ws, c.bias)
        if msg:
            raise SystemExit(f"cpu_woq {c.n}x{c.k} M={c.m} {c.dtype}: {msg}")
        t = median_us({"dense": lambda: F.linear(c.x, c.w, c.b),
                       "cpu_woq": lambda: cpu_kernels.int8_weight_only(c.x, c.wq, c.ws, c.bias)}, args.budget)
        emit(rows, c.key() + [f"{t['dense']:.1f}", f"{t['cpu_woq']:.1f}", f"{t['dense'] / t['cpu_woq']:.2f}"])
    write_csv(args.out, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
