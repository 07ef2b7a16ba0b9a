"""Which backend runs an op for (op, N, K, dtype, GPU, M bucket).

Resolution happens once per layer, device and M bucket (outside the hot path) and is cached
by the layer; a tuned table written by ``sparseq tune`` overrides the shipped defaults.
Backends: ``triton`` (sparseq.kernels), ``cutlass`` (sparseq._C*), ``onednn`` (PyTorch's CPU
int8 GEMM, ``sparseq.cpu_ops``), ``fbgemm`` (fbgemm's int8 GEMM, ``sparseq.cpu_fbgemm``),
``int8pack`` (PyTorch's int8 weight-only kernel), ``dense`` (F.linear on a dense copy of the weight: the "never
slower than dense" fallback) and ``reference``. On the CPU the shipped table's ``cpu`` section
applies (x86 has no sparse instructions: 2:4 runs dense; W8A8 runs oneDNN), then ``dense``, then
the reference (``dense_fallback=False``); under the default ``"fast"`` CPU numerics
(:func:`cpu_numerics`) the ``cpu_fast`` section, keyed by compute dtype, overrides it per op
(fbgemm for W8A8 at small M; dense on the dequantized weight where no int8 kernel wins); under
``"exact"`` its fbgemm entries still apply (fbgemm's path is exact where the CPU has VNNI). On a GPU
the list always ends with ``dense``, never the reference: the reference checks values (a host
sync) and rebuilds the weight every call, which no GPU path may do.

The M buckets are defined here, once; the Triton configs (``sparseq.kernels.configs``) use them.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import threading
import warnings
from importlib import resources
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

BUCKET_BOUNDS = (1, 16, 64, 256, 1024)
"""Upper bounds of the M buckets; above the last one is the large-M bucket."""
BUCKET_NAMES = ("1", "2-16", "17-64", "65-256", "257-1024", ">1024")
BUCKET_M = (1, 16, 64, 256, 1024, 4096)
"""A representative M per bucket (what ``sparseq tune`` measures)."""
CACHE_ENV = "SPARSEQ_TUNE_CACHE"
NUMERICS_ENV = "SPARSEQ_CPU_NUMERICS"
CPU_NUMERICS = ("fast", "exact")
"""``fast`` (default): on the CPU, W8A8 layers may skip quantizing the activations where no int8
kernel beats the dense GEMM, and run fbgemm's approximate ``linear_dynamic`` form where its exact
form does not run (no VNNI, no ``sparseq._C_cpu``): bounded, tested
(``sparseq.cpu_fbgemm.error_bound``). ``exact``: every CPU path equals the reference format bit
for bit (as the GPU kernels do): the choice for accuracy evaluation."""

EXACT_FAST_BACKEND = "fbgemm"
"""The ``cpu_fast`` section's backend that the ``"exact"`` numerics take too, in the same places
(``sparseq.cpu_fbgemm.exact_runs``: its weights equal the reference; a layer whose fbgemm runs
only approximately declines it there, and the next backend runs)."""

_lock = threading.Lock()
_tables: Dict[str, dict] = {}


def bucket_of(m: int) -> int:
    """Index of the M bucket (1, 2-16, 17-64, 65-256, 257-1024, >1024)."""
    for i, bound in enumerate(BUCKET_BOUNDS):
        if m <= bound:
            return i
    return len(BUCKET_BOUNDS)


def _initial_numerics() -> str:
    mode = os.environ.get(NUMERICS_ENV, "fast").strip().lower() or "fast"
    if mode not in CPU_NUMERICS:
        warnings.warn(f"sparseq: ${NUMERICS_ENV}={mode!r} is not one of {CPU_NUMERICS}; using 'fast'")
        mode = "fast"
    return mode


_numerics = _initial_numerics()
_numerics_listeners: List[Callable[[], None]] = []


def get_cpu_numerics() -> str:
    """The CPU numerics in force: ``"fast"`` or ``"exact"`` (see :data:`CPU_NUMERICS`)."""
    return _numerics


def set_cpu_numerics(mode: str) -> str:
    """Set the CPU numerics for the process (``"fast"`` or ``"exact"``); returns the previous
    mode. Every sparseq layer forgets its resolved CPU kernels, so the next call re-resolves
    (packed weights and dense copies are kept)."""
    global _numerics
    if mode not in CPU_NUMERICS:
        raise ValueError(f"CPU numerics must be one of {CPU_NUMERICS}, got {mode!r}")
    with _lock:
        before, _numerics = _numerics, mode
    if before != mode:
        for listener in list(_numerics_listeners):
            listener()
    return before


@contextmanager
def cpu_numerics(mode: str) -> Iterator[None]:
    """``with sparseq.cpu_numerics("exact"): ...`` runs the block with those CPU numerics and
    restores the previous mode after (process-wide, not per thread)."""
    before = set_cpu_numerics(mode)
    try:
        yield
    finally:
        set_cpu_numerics(before)


def on_cpu_numerics_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever the CPU numerics change (layers drop their CPU kernels)."""
    _numerics_listeners.append(listener)


def tuned_table_path() -> Path:
    """Where ``sparseq tune`` saves its table (``$SPARSEQ_TUNE_CACHE`` overrides)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sparseq" / "dispatch.json"


def _load(name: str) -> dict:
    with _lock:
        if name not in _tables:
            if name == "default":
                text = resources.files("sparseq").joinpath("data/dispatch_default.json").read_text()
                _tables[name] = json.loads(text)
            else:
                _tables[name] = _read_tuned(tuned_table_path())
        return _tables[name]


def _read_tuned(path: Path) -> dict:
    """The tuned table, or {} (with a warning) when it is missing or unreadable."""
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        warnings.warn(f"sparseq: ignoring the tuned dispatch table {path}: {e}; using the shipped defaults")
        return {}
    return table


def reload_tables() -> None:
    """Forget cached tables (after ``sparseq tune`` wrote a new one)."""
    with _lock:
        _tables.clear()


def tuned_key(op: str, n: int, k: int, dtype: torch.dtype, capability: Tuple[int, int]) -> str:
    return f"{op}|{n}|{k}|{str(dtype).replace('torch.', '')}|sm{capability[0]}{capability[1]}"


def cpu_table() -> dict:
    """The shipped table's CPU sections in force here: as measured with ``sparseq._C_cpu`` (the
    one-pass W8A8 quantization and epilogue) and fbgemm's packed GEMM, with this CPU vendor's
    ``cpu_vendor`` section over them (:func:`cpu_vendor`); where that extension is
    not built, its ``cpu_torch_ops`` overrides (the same arithmetic in torch ops costs more per
    call, so int8 kernels start at larger layers); where fbgemm runs its ``linear_dynamic`` form
    (``sparseq.cpu_fbgemm.default_form``), its ``cpu_linear_dynamic`` overrides."""
    from . import cpu_fbgemm, cpu_kernels

    table = _load("default")
    if not cpu_kernels.available():
        return {**table, **table.get("cpu_torch_ops", {})}
    if cpu_fbgemm.default_form() != "packed_gemm":  # fbgemm's slower form: its own thresholds
        return {**table, **table.get("cpu_linear_dynamic", {})}
    return _with_vendor(table, table.get("cpu_vendor", {}).get(cpu_vendor(), {}))


_BY_KEY = ("cpu_dtype", "cpu_min_nk", "cpu_min_nk_one_thread")
"""Sections a vendor's section merges into entry by entry (per dtype, per backend): it states
only the dtypes and backends measured differently there."""


def _with_vendor(table: dict, section: dict) -> dict:
    """``table`` with a ``cpu_vendor`` section over it: its sections replace the table's, but
    those of :data:`_BY_KEY` replace only the entries (dtypes, backends) they name."""
    merged = {**table, **section}
    for key in _BY_KEY:
        if key in section:
            merged[key] = {**table.get(key, {}), **section[key]}
    return merged


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """This CPU's vendor (``GenuineIntel``, ``AuthenticAMD``; "" where unknown): the key of the
    CPU tables' ``cpu_vendor`` sections. The same int8 kernels win at different sizes on
    different cores (AMD Zen 4's dense GEMMs are slower next to its int8 ones than a Xeon's), so
    the thresholds are measured per vendor; a vendor without a section keeps the Xeon's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    processor = platform.processor()  # e.g. "Intel64 Family 6 ... GenuineIntel" on Windows
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in processor), "")


def cpu_splits(bucket: str) -> Tuple[int, ...]:
    """The Ms at which the CPU tables split ``bucket`` into parts (``"2-16"`` at 4, 8 and 10: parts
    ``"2-3"``, ``"4-7"``, ``"8-9"``, ``"10-16"``), ascending; empty where it is not split. A dense GEMV of a
    small layer beats an int8 GEMM's fixed cost at M = 2 but not at M = 16; the layer then
    switches per call on M. (The JSON holds one M or a list.)"""
    value = cpu_table().get("cpu_split", {}).get(bucket)
    if value is None:
        return ()
    return tuple(sorted(int(v) for v in (value if isinstance(value, list) else [value])))


def cpu_parts(bucket: str) -> List[Tuple[int, int]]:
    """``[(first M, last M), ...]`` of each part of ``bucket`` (the bucket itself where it is not split)."""
    lo, _, hi = bucket.partition("-")
    if not hi:
        return []
    bounds = [int(lo), *cpu_splits(bucket), int(hi) + 1]
    return [(a, b - 1) for a, b in zip(bounds, bounds[1:])]


def cpu_part(bucket: str, m: int) -> str:
    """The key of M ``m``'s part of ``bucket`` in the CPU tables (the bucket's own name unless
    :func:`cpu_splits` splits it)."""
    for a, b in cpu_parts(bucket):  # an unsplit bucket is its one part, named as the bucket
        if a <= m <= b:
            return f"{a}-{b}"
    return bucket


def by_part(d: dict, bucket: str, part: str, default):
    """``d``'s entry for ``part`` of ``bucket``: its own key, else the narrowest key ``"a-b"``
    spanning the part (``"8-16"`` serves the parts ``"8-9"`` and ``"10-16"``: a table states
    only where a finer part differs), else the bucket's, else ``default``."""
    if part in d:
        return d[part]
    lo, _, hi = part.partition("-")
    if not (lo.isdigit() and hi.isdigit()):
        return d.get(bucket, default)
    best = None
    for key in d:
        a, sep, b = key.partition("-")
        if sep and a.isdigit() and b.isdigit() and int(a) <= int(lo) and int(hi) <= int(b):
            if best is None or int(b) - int(a) < best[0]:
                best = (int(b) - int(a), key)
    if best is not None:
        return d[best[1]]
    return d.get(bucket, default)


def _merged(min_nk: dict, over: dict) -> dict:
    """``{backend: {part: N*K}}`` with ``over``'s entries replacing ``min_nk``'s, part by part."""
    return {b: {**min_nk.get(b, {}), **over.get(b, {})} for b in {*min_nk, *over}}


def preferences(op: str, n: int, k: int, dtype: torch.dtype, device: torch.device, m: int,
                one_thread: bool = False) -> List[str]:
    """Backends to try, best first, for this op and shape on ``device`` at batch ``m``
    (``one_thread``: for a CPU running torch with one intra-op thread, where
    ``cpu_min_nk_one_thread`` and the ``cpu_fast`` section's ``min_nk_one_thread`` lower
    thresholds: a dense GEMV gains more from a second core than an int8 kernel does). CPU lists
    and thresholds are keyed by the part of the M bucket ``m`` falls in (:func:`cpu_part`),
    falling back to the bucket's name."""
    if device.type == "cpu":
        table = cpu_table()
        bucket = BUCKET_NAMES[bucket_of(m)]
        part = cpu_part(bucket, m)

        def part_of(d: dict, default):
            return by_part(d, bucket, part, default)

        dtype_name = str(dtype).replace("torch.", "")
        min_nk = table.get("cpu_min_nk", {})  # a backend that loses to the dense bucket on small layers
        if one_thread:  # a dense GEMV gains more from a second core than these kernels do
            min_nk = _merged(min_nk, table.get("cpu_min_nk_one_thread", {}))
        by_dtype = table.get("cpu_dtype", {}).get(dtype_name, {})  # lists for one compute dtype
        min_nk = _merged(min_nk, by_dtype.get("min_nk", {}))
        max_nk = by_dtype.get("max_nk", {})  # a backend that loses to dense on large layers
        per_op = part_of(by_dtype.get("ops", {}).get(op) or table.get("cpu", {}).get(op, {}), [])
        sections = table.get("cpu_fast", {})
        fast_table = sections.get(dtype_name, sections.get("default", {}))
        if op in fast_table.get("ops", {}):
            fast_list = part_of(fast_table["ops"][op], [])
            fast_min = fast_table.get("min_nk", {})
            if one_thread:
                fast_min = _merged(fast_min, fast_table.get("min_nk_one_thread", {}))
            fast_max = _merged(max_nk, fast_table.get("max_nk", {}))  # e.g. fbgemm: oneDNN wins on large layers
            if _numerics == "fast":
                per_op, min_nk, max_nk = fast_list, fast_min, fast_max
            elif EXACT_FAST_BACKEND in fast_list:
                # fbgemm's path is exact too: where the fast section runs it, so does "exact"
                per_op = [EXACT_FAST_BACKEND] + [b for b in per_op if b != EXACT_FAST_BACKEND]
                min_nk = _merged(min_nk, {EXACT_FAST_BACKEND: fast_min.get(EXACT_FAST_BACKEND, {})})
                max_nk = _merged(max_nk, {EXACT_FAST_BACKEND: fast_max.get(EXACT_FAST_BACKEND, {})})
        fast = [b for b in per_op if part_of(min_nk.get(b, {}), 0) <= n * k <= part_of(max_nk.get(b, {}), n * k)]
        return list(dict.fromkeys(fast + ["dense", "reference"]))
    if device.type != "cuda":
        return ["reference"]
    cap = torch.cuda.get_device_capability(device)
    bucket = BUCKET_NAMES[bucket_of(m)]
    tuned = _load("tuned").get(tuned_key(op, n, k, dtype, cap))
    if tuned and bucket in tuned:
        return list(dict.fromkeys([tuned[bucket], "dense"]))
    table = _load("default")
    arch = f"sm{cap[0]}x" if f"sm{cap[0]}x" in table else "default"
    per_op = table[arch].get(op) or table["default"].get(op) or {}
    return list(dict.fromkeys(list(per_op.get(bucket, [])) + ["dense"]))


def triton_op(op: str) -> Optional[object]:
    """The ``sparseq::<op>_triton`` op, importing its kernel module on first use; None where no
    Triton kernel implements ``op`` or the kernels fail to import (warned once, with the cause)."""
    from . import ops

    if ops.backend_impl(op, "triton") is None:
        return None
    return getattr(torch.ops.sparseq, f"{op}_triton")


def triton_launcher(op: str) -> Optional[Callable]:
    """The unchecked launcher of ``sparseq::<op>_triton`` (see ``sparseq.ops.launcher``)."""
    from . import ops

    return ops.launcher(op, "triton")


def cutlass_op(op: str) -> Optional[object]:
    """The ``sparseq::<op>_cutlass`` op when the CUDA extension is loaded and implements it."""
    from .backends import load_cuda_extensions

    if not any(load_cuda_extensions().values()):
        return None
    name = f"sparseq::{op}_cutlass"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
        return None
    return getattr(torch.ops.sparseq, f"{op}_cutlass")
