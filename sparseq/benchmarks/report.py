"""What a person reads: markdown speedup tables (one per shape and dtype, then one-time costs
and failures), PNG plots and a console table, all made from result rows.

A time taken from an output that was not verified carries :data:`UNCHECKED_MARK` everywhere it
is shown.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .harness import Environment
from .results import ONE_TIME_OPS, UNCHECKED_MARK, Row, clean_error

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

