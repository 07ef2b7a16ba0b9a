"""Result rows and their CSV form: :class:`Row` (one measurement or one failure), the exact CSV
columns every results file has, and the CSV writer and readers.

A benchmark script produces rows; ``report`` turns them into tables and plots.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from .harness import Environment

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

ONE_TIME_OPS = ("prepare", "compress", "import")
"""Ops whose rows are one-time costs or setup failures, not per-call measurements."""


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


