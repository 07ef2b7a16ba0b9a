"""sparseq's int8 weight-only CPU kernel (``cpu_woq``: ``sparseq._C_cpu``'s int8_weight_only_cpu)
alone against the dense GEMM it replaces, per shape, dtype, M and thread count: the numbers behind
the ``cpu_woq`` entries of the CPU tables in ``sparseq/data/dispatch_default.json``.

Contenders (bias included, no layer or dispatch overhead): ``dense`` = ``F.linear`` on the
dequantized weight in the compute dtype (what a weight-only layer runs otherwise); ``cpu_woq`` =
the kernel on the stored int8 weight, checked within the format's tolerance of
``reference.int8_weight_only_mm`` (``sparseq.testing.check_matmul_close``; a miss stops the run,
exit 1). Timing as ``bench_cpu_kernels.py``: interleaved rounds, median per-call time in us.
Run: ``python benchmarks/bench_cpu_woq.py --out FILE.csv`` (~4 min on 2 cores).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_kernels import median_us, sweep_parser, write_csv  # noqa: E402

from sparseq import cpu_kernels  # noqa: E402
from sparseq import reference as ref  # noqa: E402
from sparseq.testing import check_matmul_close  # noqa: E402

SHAPES = "384x384,1536x384,384x1536,2048x2048,4096x4096"
COLUMNS = ["threads", "dtype", "N", "K", "M", "dense_us", "cpu_woq_us", "speedup"]


def main(argv=None) -> int:
    args = sweep_parser(__doc__, SHAPES, "1,2,4,5,7,8,16,32", "float32,bfloat16,float16", 0.2).parse_args(argv)
    why = cpu_kernels.weight_only_unavailable_reason()
    if why:
        print(f"cpu_woq does not run here: {why}", file=sys.stderr)
        return 2
    rows = []
    print(",".join(COLUMNS), flush=True)
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
                    x = torch.randn(m, k).to(dtype)
                    y = cpu_kernels.int8_weight_only(x, wq, ws, bias)
                    msg = check_matmul_close(y, ref.int8_weight_only_mm(x, wq, ws, bias), x, wq, None, ws, bias)
                    if msg:
                        raise SystemExit(f"cpu_woq {n}x{k} M={m} {dtype}: {msg}")
                    t = median_us({"dense": lambda: F.linear(x, w, b),
                                   "cpu_woq": lambda: cpu_kernels.int8_weight_only(x, wq, ws, bias)}, args.budget)
                    row = [threads, str(dtype).replace("torch.", ""), n, k, m, f"{t['dense']:.1f}",
                           f"{t['cpu_woq']:.1f}", f"{t['dense'] / t['cpu_woq']:.2f}"]
                    rows.append(row)
                    print(",".join(map(str, row)), flush=True)
    write_csv(args.out, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
