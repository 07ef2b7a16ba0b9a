"""One call of every sparseq GPU kernel (Triton and CUTLASS, each op and the metadata
converters), for ``compute-sanitizer --tool memcheck|racecheck python tests/sanitize_kernels.py``
(tests/test_gpu_hardening.py runs it). Small ragged shapes: edge tiles and masks are where
out-of-bounds accesses hide. Prints one line per kernel; exits 1 if one raises."""
import sys

import torch

from sparseq import dispatch
from sparseq import reference as ref


def calls():
    torch.manual_seed(0)
    dev = "cuda"
    m, n, k = 37, 72, 264  # ragged M, N; K a multiple of 8 but not of the K tile
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    xq, xs = ref.quantize_per_token(x)
    wq, ws = ref.quantize_per_channel(w)
    values, meta = ref.prune_and_compress_24(w)
    qv, qmeta, qs = ref.prune_and_compress_24(w, quantize=True)
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    smooth = torch.rand(k, device=dev) + 0.5
    yield "triton quantize_per_token", "quantize_per_token", (x, smooth)
    yield "triton quantize_per_tensor", "quantize_per_tensor", (x, torch.tensor([0.05], device=dev), smooth)
    yield "triton int8_mm", "int8_mm", (xq, wq, xs, ws, bias, torch.bfloat16)
    yield "triton int8_mm m=1 (split-K)", "int8_mm", (xq[:1], wq, xs[:1], ws, bias, torch.bfloat16)
    yield "triton int8_weight_only_mm", "int8_weight_only_mm", (x, wq, ws, bias)
    yield "triton sparse24_mm", "sparse24_mm", (x, values, meta, bias)
    yield "triton sparse24_int8_mm w8a8", "sparse24_int8_mm", (xq, qv, qmeta, qs, xs, bias, torch.bfloat16)
    yield "triton sparse24_int8_mm weight-only", "sparse24_int8_mm", (x, qv, qmeta, qs, None, bias, None)
    yield "triton prune_and_compress_24", "prune_and_compress_24", (w, None)
    yield "triton prune_and_compress_24_int8", "prune_and_compress_24_int8", (w, None)


def main() -> int:
    failures = 0
    for label, op, args in calls():
        handle = dispatch.triton_op(op)
        if handle is None:
            print(f"{label}: no Triton kernel")
            failures += 1
            continue
        try:
            handle(*args)
            torch.cuda.synchronize()
            print(f"{label}: ran")
        except Exception as e:  # noqa: BLE001
            print(f"{label}: {type(e).__name__}: {e}")
            failures += 1
    from sparseq import cuda_ops
    from sparseq.backends import load_cuda_extensions

    if any(load_cuda_extensions().values()) and cuda_ops.supported_arch() is not None:
        torch.manual_seed(1)
        n, k, m = 128, 256, 37  # the CUTLASS shape rule: N % 64, K % 128
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        values, meta = ref.prune_and_compress_24(w)
        qv, qmeta, qs = ref.prune_and_compress_24(w, quantize=True)
        xq, xs = ref.quantize_per_token(x)
        bias = torch.randn(n, device="cuda", dtype=torch.float32)
        try:
            prepared = cuda_ops.prepare_sparse24_cutlass(values, meta)
            back = cuda_ops.unprepare_sparse24_cutlass(values, prepared)
            assert torch.equal(back, meta)
            print("cutlass meta converters: ran")
            cuda_ops.sparse24_mm_cutlass(x, values, prepared, bias)
            torch.cuda.synchronize()
            print("cutlass sparse24_mm: ran")
            qprepared = cuda_ops.prepare_sparse24_cutlass(qv, qmeta)
            cuda_ops.sparse24_int8_mm_cutlass(xq, qv, qprepared, qs, xs, bias, torch.bfloat16)
            torch.cuda.synchronize()
            print("cutlass sparse24_int8_mm: ran")
        except Exception as e:  # noqa: BLE001
            print(f"cutlass: {type(e).__name__}: {e}")
            failures += 1
    else:
        print("cutlass: extension not loaded or GPU not supported; skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
