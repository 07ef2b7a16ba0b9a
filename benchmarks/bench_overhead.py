"""Host overhead per call of a sparseq layer's GPU path, measured on the CPU.

A decode step on a GPU spends ~10 us per layer in the kernel, so Python work around the launch
matters. This script times, per format, everything a layer does per call except the Triton
kernel itself (the kernels' ``__getitem__`` launch is stubbed), on CPU tensors:

- ``layer``: ``layer(x)`` as it runs on a GPU path now (dict lookup, unchecked launcher);
- ``checked op``: the same kernels through their checked ``sparseq::<op>_triton`` ops (what
  layers called per call before);
- ``F.linear``: a tiny ``F.linear`` (1x8 @ 8x8), the floor of any PyTorch op call.

Run: ``TRITON_INTERPRET=1 python benchmarks/bench_overhead.py [--out DIR]`` (median of 2000
calls after 200 warm-up calls; writes ``overhead.md``/``overhead.csv`` when ``--out`` is given).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import sparseq  # noqa: E402
import sparseq.nn  # noqa: E402
from sparseq import benchmarks, dispatch  # noqa: E402
from sparseq.nn import FORMATS  # noqa: E402


def _stub_kernels() -> None:
    """Replace every Triton kernel launch with a no-op (the outputs stay uninitialized)."""
    from sparseq import kernels
    from sparseq.kernels import _common, int8_mm, int8_weight_only_mm, quantize, sparse24_mm

    kernels.register()

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    for module in (_common, int8_mm, int8_weight_only_mm, quantize, sparse24_mm):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
                setattr(module, name, _NoLaunch())  # a JITFunction, or an InterpretedFunction


def _median_us(fn, calls: int = 2000, warmup: int = 200) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls // 100):
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        samples.append((time.perf_counter() - t0) / 100 * 1e6)
    return statistics.median(samples)


def _checked_call(layer, x):
    """The per-call path before: the checked Triton ops, quantizer op first for W8A8."""
    ops = torch.ops.sparseq
    if layer.FORMAT == "2:4":
        return lambda: ops.sparse24_mm_triton(x, layer.values, layer.meta, layer.bias)
    if layer.FORMAT == "int8_weight_only":
        return lambda: ops.int8_weight_only_mm_triton(x, layer.weight_q, layer.w_scale, layer.bias)
    if layer.FORMAT == "w8a8":
        def run():
            xq, xs = ops.quantize_per_token_triton(x, None)
            return ops.int8_mm_triton(xq, layer.weight_q, xs, layer.w_scale, layer.bias, x.dtype)
        return run
    if layer.FORMAT == "2:4+int8_weight_only":
        return lambda: ops.sparse24_int8_mm_triton(x, layer.values, layer.meta, layer.w_scale, None, layer.bias, None)

    def run24():
        xq, xs = ops.quantize_per_token_triton(x, None)
        return ops.sparse24_int8_mm_triton(xq, layer.values, layer.meta, layer.w_scale, xs, layer.bias, x.dtype)
    return run24


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write overhead.md and overhead.csv here")
    args = p.parse_args()
    torch.set_num_threads(1)
    _stub_kernels()
    dispatch.preferences = lambda *a, **k: ["triton"]  # the GPU path, on CPU tensors
    n = k = 4096
    lin = nn.Linear(k, n, dtype=torch.float16)
    x = torch.randn(1, k, dtype=torch.float16)
    tiny_x, tiny_w = torch.randn(1, 8), torch.randn(8, 8)
    floor = _median_us(lambda: F.linear(tiny_x, tiny_w))
    rows = []
    with torch.no_grad():
        for fmt in FORMATS:
            layer = sparseq.nn.make_layer(lin, fmt, **({"prune": "magnitude"} if fmt.startswith("2:4") else {}))
            layer(x)
            assert set(layer.backends.values()) == {"triton"}, layer.backends
            rows.append((fmt, _median_us(lambda: layer(x)), _median_us(_checked_call(layer, x)), floor))
    sha = benchmarks.git_sha()  # marks a dirty tree, unlike a bare rev-parse
    head = (f"Host overhead per call, kernels stubbed (CPU: {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, 1 thread, M=1, 4096x4096 fp16, git {sha}; median of 2000 calls)")
    lines = [head, "", "| format | layer (us) | checked ops (us) | F.linear 1x8x8 (us) |", "|---|---|---|---|"]
    lines += [f"| {f} | {a:.1f} | {b:.1f} | {c:.1f} |" for f, a, b, c in rows]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.md").write_text("\n".join(lines) + "\n")
        (args.out / "overhead.csv").write_text("format,layer_us,checked_ops_us,f_linear_floor_us,git_sha\n" + "".join(
            f"{f},{a:.2f},{b:.2f},{c:.2f},{sha}\n" for f, a, b, c in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
