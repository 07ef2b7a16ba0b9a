"""sparseq's benchmark package: the harness every benchmark script shares and the op sweep
behind ``sparseq bench``.

- ``harness``: environment metadata, model shapes and M lists, timers;
- ``results``: result rows and the CSV every results file is written in;
- ``report``: markdown tables, PNG plots, the console table;
- ``checks``: output checks against each format's reference, before any time is taken;
- ``contenders``, ``sweep``: what the op sweep measures and how;
- ``cli``: the ``sparseq bench`` command.

The names below are the package's public API (``from sparseq import benchmarks as bm``);
each is defined once, in the module named above.
"""
from __future__ import annotations

from .checks import CHECK_KINDS, check_layer, check_output, first_difference, ieee_fp32, reference_check, rel_error
from .cli import add_op_args, merge_ops, op_plan, run_bench, run_cpu_ops, run_e2e_script, run_ops, write_op_results
from .contenders import (COMPRESS_OPS, MATMUL_OPS, QUANTIZE_DYNAMIC_TOL, SWAP_FORMATS, TORCHAO_CONFIGS, Contender,
                         discover, discover_cpu, layout_hook, load_backends, op_contenders, quantize_dynamic_contender,
                         registered_backends, sparseq_op, swap_contenders, torch_contenders, torchao_contenders)
from .harness import (DTYPES, M_CPU, M_FULL, M_QUICK, M_SMOKE, MODEL_SHAPES, QUICK_SHAPES, SMOKE_SHAPES, Environment,
                      Timer, all_shapes, cpu_cores, cpu_model, cpu_shapes, cpu_time_us, cuda_event_time_us, default_device, environment, flush_l2, git_sha,
                      minilm_shapes, parse_shape, repo_root, results_dir, slug, smoke_env_note, synchronize,
                      time_once_us)
from .report import (check_notes, errors_markdown, plot_bars, plot_speedups, print_rows, speedup_markdown,
                     write_markdown)
from .results import (CHECKED_OK, CSV_COLUMNS, ERROR_PREFIX, ONE_TIME_OPS, UNCHECKED_MARK, Row, clean_error,
                      error_text, read_csv, rows_from_csv, tensor_bytes, write_csv)
from .sweep import compress_rows, measure_cell, run_op_sweep, sweep_shape

__all__ = [
    "CHECK_KINDS", "check_layer", "check_output", "first_difference", "ieee_fp32", "reference_check", "rel_error",
    "add_op_args", "merge_ops", "op_plan", "run_bench", "run_cpu_ops", "run_e2e_script", "run_ops", "write_op_results",
    "COMPRESS_OPS", "MATMUL_OPS", "QUANTIZE_DYNAMIC_TOL", "SWAP_FORMATS", "TORCHAO_CONFIGS", "Contender", "discover",
    "discover_cpu", "layout_hook", "load_backends", "op_contenders", "quantize_dynamic_contender",
    "registered_backends", "sparseq_op", "swap_contenders", "torch_contenders", "torchao_contenders",
    "DTYPES", "M_CPU", "M_FULL", "M_QUICK", "M_SMOKE", "MODEL_SHAPES", "QUICK_SHAPES", "SMOKE_SHAPES", "Environment",
    "Timer", "all_shapes", "cpu_cores", "cpu_model", "cpu_shapes", "cpu_time_us", "cuda_event_time_us", "default_device", "environment", "flush_l2", "git_sha",
    "minilm_shapes", "parse_shape", "repo_root", "results_dir", "slug", "smoke_env_note", "synchronize",
    "time_once_us",
    "check_notes", "errors_markdown", "plot_bars", "plot_speedups", "print_rows", "speedup_markdown", "write_markdown",
    "CHECKED_OK", "CSV_COLUMNS", "ERROR_PREFIX", "ONE_TIME_OPS", "UNCHECKED_MARK", "Row", "clean_error", "error_text",
    "read_csv", "rows_from_csv", "tensor_bytes", "write_csv",
    "compress_rows", "measure_cell", "run_op_sweep", "sweep_shape",
]
