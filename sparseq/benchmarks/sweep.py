"""The op sweep: every contender on every weight shape, dtype and M, dense first at each M;
each output checked before it is timed, one-time costs (prepare, compress) timed apart.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from .checks import check_output
from .contenders import COMPRESS_OPS, Contender, discover, discover_cpu, registered_backends, sparseq_op
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
        cell = measure_cell(x, w, w24, dtype_name, contenders, states, failed, timer, check)
        rows += cell
        log(f"  {n}x{k} {dtype_name} M={m}: dense {cell[0].dense_us or float('nan'):.1f} us, "
            f"{sum(1 for r in cell if r.error)} failed of {len(contenders)}")
        del x
    del states
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_cell(x: Tensor, w: Tensor, w24: Tensor, dtype_name: str, contenders: Sequence[Contender],
                 states: Dict[Tuple[str, str, str], Any], failed: Dict[Tuple[str, str, str], str], timer: Timer,
                 check: bool = True) -> List[Row]:
    """One (shape, dtype, M) cell: each contender's output checked, then all of them timed in
    ``timer.rounds`` interleaved rounds (median per contender); the dense row's time is every
    row's ``dense_us``."""
    device, dtype = timer.device, DTYPES[dtype_name]
    (m, k), n = x.shape, w.shape[0]
    refs: Dict[Tuple[str, bool], Callable] = {}
    rows: List[Row] = []
    runs: List[Tuple[Row, Callable[[], Any]]] = []
    for c in contenders:
        row = Row(c.op, c.backend, c.format, dtype_name, n, k, m, flops=2.0 * m * n * k)
        rows.append(row)
        if c.key in failed:
            row.error = "prepare failed: " + failed[c.key]
            continue
        try:
            fn = c.call(states[c.key], x)
            y = fn()
            row.checked = check_output(c, states[c.key], x, y, refs, w24 if c.sparse else w, dtype) if check \
                else "no: --no-check"
            out_bytes = y.numel() * y.element_size() if isinstance(y, Tensor) else 0
            row.bytes = float(tensor_bytes(states[c.key]) + x.numel() * x.element_size() + out_bytes)
            runs.append((row, fn))
            del y
        except Exception as e:  # noqa: BLE001  (incl. torch.cuda.OutOfMemoryError)
            row.error, row.checked = error_text(e), None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times: Dict[int, List[float]] = {id(row): [] for row, _ in runs}
    for _ in range(max(1, timer.rounds)):
        for row, fn in runs:
            if row.error:
                continue
            try:
                times[id(row)].append(timer(fn))
            except Exception as e:  # noqa: BLE001
                row.error, row.checked = error_text(e), None
    for row, _ in runs:
        if not row.error:
            row.time_us = statistics.median(times[id(row)])
    dense = next((r for r, c in zip(rows, contenders) if c.format == "dense" and r.time_us), None)
    for row in rows:
        row.dense_us = dense.time_us if dense else None
    return rows


def run_op_sweep(shapes: Sequence[Tuple[int, int]], ms: Sequence[int], dtypes: Sequence[str], timer: Timer,
                 include_reference: bool = False, only: Sequence[str] = (), check: bool = True,
                 log: Callable[[str], None] = print, cpu: bool = False) -> List[Row]:
    """The whole sweep: every shape x dtype x M x contender, plus one-time costs and import failures.
    ``cpu``: the CPU contenders (:func:`discover_cpu`) instead of the GPU ones."""
    rows: List[Row] = []
    with torch.no_grad():
        for dtype_name in dtypes:
            if cpu:
                contenders, errors = discover_cpu(DTYPES[dtype_name], only)
            else:
                contenders, errors = discover(DTYPES[dtype_name], timer.device, include_reference, only)
            if dtype_name == dtypes[0]:
                rows += errors
                log(f"contenders ({dtype_name}): " + ", ".join(" ".join(c.key[1:]) + f" [{c.op}]" for c in contenders))
            for n, k in shapes:
                rows += sweep_shape(n, k, ms, dtype_name, contenders, timer, check, log)
    return rows


