"""Op sweep: every sparseq kernel and peer vs dense ``F.linear`` over model shapes and M.

Shapes: Llama-3-8B, Llama-3-70B, Mistral-7B, the bundled MiniLM and any ``--shape NxK``;
M from 1 to 16384; bf16 and fp16. Writes ``ops.csv`` (columns: gpu,torch,cuda,git_sha,op,
backend,format,dtype,N,K,M,time_us,dense_us,speedup,tflops,gbps), ``ops.md`` (speedup tables,
one-time costs, failures) and ``ops_<N>x<K>_<dtype>.png`` to ``benchmarks/results/<gpu>/``.

    python benchmarks/bench_ops.py                 # the full sweep (GPU)
    python benchmarks/bench_ops.py --quick         # a few Llama-3-8B shapes (~1-2 min)
    python benchmarks/bench_ops.py --models none --shape 8192x8192 --m 1,16,4096
    python benchmarks/bench_ops.py --smoke         # CPU: tiny shapes, reference (+ interpreter)

The sweep itself lives in ``sparseq.benchmarks`` (also behind ``sparseq bench``).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from sparseq import benchmarks as bm


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the options, run the sweep, write the files, print the table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bm.add_op_args(parser)
    args = parser.parse_args(argv)
    out, rows = bm.run_ops(args)
    bm.print_rows([r for r in rows if r.op not in bm.ONE_TIME_OPS])
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
