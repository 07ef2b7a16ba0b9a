"""The op sweep: every contender on every weight shape, dtype and M, dense first at each M;
each output checked before it is timed, one-time costs (prepare, compress) timed apart.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from .checks import check_output
from .contenders import COMPRESS_OPS, Contender, discover, registered_backends, sparseq_op
from .harness import DTYPES, Timer, time_once_us
from .results import Row, error_text, tensor_bytes

def compress_rows(w: Tensor, dtype_name: str) -> List[Row]:
    """One-time costs of every registered compression/quantization op (the reference included)."""
    rows = []
    n, k = w.shape
    for base in COMPRESS_OPS:
        for b in registered_backends(base):
            row = Row("compress", b or "reference", base, dtype_name, n, k, None)
            try:
                fn = sparseq_op(base, b)
                time_once_us(lambda: fn(w), w.device)  # first call: compile / warm-up
                _, row.time_us = time_once_us(lambda: fn(w), w.device)
            except Exception as e:  # noqa: BLE001
                row.error = error_text(e)
            rows.append(row)
    return rows


def sweep_shape(n: int, k: int, ms: Sequence[int], dtype_name: str, contenders: Sequence[Contender],
                timer: Timer, check: bool = True, log: Callable[[str], None] = print) -> List[Row]:
    """All contenders on one weight shape and dtype for every M; dense runs first at each M."""
    device, dtype = timer.device, DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(n * 131 + k)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    w24 = w * ref.prune_24(w)
    rows = compress_rows(w, dtype_name)
    states: Dict[Tuple[str, str, str], Any] = {}
    failed: Dict[Tuple[str, str, str], str] = {}
    for c in contenders:
        row = Row("prepare", c.backend, c.format + ("" if c.op == "linear" else f" ({c.op})"), dtype_name, n, k, None)
        try:
            wc = w24 if c.sparse else w
            time_once_us(lambda: c.prepare(wc), device)  # first call may compile
            states[c.key], row.time_us = time_once_us(lambda: c.prepare(wc), device)
        except Exception as e:  # noqa: BLE001
            failed[c.key] = row.error = error_text(e)
        if c.format != "dense":
            rows.append(row)
    for m in ms:
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        refs: Dict[Tuple[str, bool], Callable] = {}
        dense_us = None
        for c in contenders:
            row = Row(c.op, c.backend, c.format, dtype_name, n, k, m, dense_us=dense_us, flops=2.0 * m * n * k)
            if c.key in failed:
                row.error = "prepare failed: " + failed[c.key]
                rows.append(row)
                continue
            try:
                fn = c.call(states[c.key], x)
                y = fn()
                checked = check_output(c, states[c.key], x, y, refs, w24 if c.sparse else w, dtype) if check \
                    else "no: --no-check"
                row.time_us = timer(fn)
                row.checked = checked
                out_bytes = y.numel() * y.element_size() if isinstance(y, Tensor) else 0
                row.bytes = float(tensor_bytes(states[c.key]) + x.numel() * x.element_size() + out_bytes)
                if c.format == "dense":
                    dense_us = row.dense_us = row.time_us
                del y
            except Exception as e:  # noqa: BLE001  (incl. torch.cuda.OutOfMemoryError)
                row.error = error_text(e)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
        log(f"  {n}x{k} {dtype_name} M={m}: dense {dense_us or float('nan'):.1f} us, "
            f"{sum(1 for r in rows if r.M == m and r.error)} failed of {len(contenders)}")
        del x, refs
    del states
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_op_sweep(shapes: Sequence[Tuple[int, int]], ms: Sequence[int], dtypes: Sequence[str], timer: Timer,
                 include_reference: bool = False, only: Sequence[str] = (), check: bool = True,
                 log: Callable[[str], None] = print) -> List[Row]:
    """The whole sweep: every shape x dtype x M x contender, plus one-time costs and import failures."""
    rows: List[Row] = []
    with torch.no_grad():
        for dtype_name in dtypes:
            contenders, errors = discover(DTYPES[dtype_name], timer.device, include_reference, only)
            if dtype_name == dtypes[0]:
                rows += errors
                log(f"contenders ({dtype_name}): " + ", ".join(" ".join(c.key[1:]) + f" [{c.op}]" for c in contenders))
            for n, k in shapes:
                rows += sweep_shape(n, k, ms, dtype_name, contenders, timer, check, log)
    return rows


