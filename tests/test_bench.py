"""The benchmark suite runs on the CPU (smoke mode), writes its files and reads them back.

Nothing here is a speed claim: it keeps ``benchmarks/*.py`` and ``sparseq bench`` from rotting
and pins the harness rules (exact CSV columns, failures recorded, outputs checked).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparseq import benchmarks as bm
from sparseq import reference as ref



def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_rows(rows):
    assert rows, "no rows"
    for r in rows:
        assert r["gpu"] and r["torch"] and r["cuda"] and r["git_sha"]
        if r["time_us"].startswith(bm.ERROR_PREFIX):
            assert len(r["time_us"]) > len(bm.ERROR_PREFIX)
        else:
            assert float(r["time_us"]) > 0


@pytest.fixture(scope="module")
def ops_smoke(tmp_path_factory, load_benchmark):
    out = tmp_path_factory.mktemp("ops")
    assert load_benchmark("bench_ops").main(["--smoke", "--out", str(out)]) == 0
    return out


def test_ops_smoke_csv_has_exact_columns(ops_smoke):
    first = (ops_smoke / "ops_smoke.csv").read_text().splitlines()[0]
    assert first == ",".join(bm.CSV_COLUMNS)
    assert first == "gpu,torch,cuda,git_sha,op,backend,format,dtype,N,K,M,time_us,dense_us,speedup,tflops,gbps,checked"
    rows = bm.read_csv(ops_smoke / "ops_smoke.csv")
    _check_rows(rows)
    timed = [r for r in rows if r["op"] not in bm.ONE_TIME_OPS and not r["time_us"].startswith(bm.ERROR_PREFIX)]
    assert timed and all(r["checked"] == "yes" for r in timed)  # every contender here has a reference
    assert not [r for r in rows if "wrong result" in r["time_us"]]
    dense = [r for r in rows if r["format"] == "dense"]
    assert {(int(r["N"]), int(r["K"])) for r in dense} == set(bm.SMOKE_SHAPES)
    assert {int(r["M"]) for r in dense} == set(bm.M_SMOKE)
    assert all(float(r["speedup"]) == 1.0 for r in dense)


def test_ops_smoke_measures_every_reference_format(ops_smoke):
    rows = bm.read_csv(ops_smoke / "ops_smoke.csv")
    measured = {(r["op"], r["format"]) for r in rows if r["backend"] == "reference"
                and r["op"] in ("gemm", "linear") and not r["time_us"].startswith(bm.ERROR_PREFIX)}
    for fmt in ("2:4", "int8_weight_only", "w8a8", "2:4+int8_weight_only", "2:4+w8a8"):
        assert ("gemm", fmt) in measured, fmt
    one_time = {r["format"] for r in rows if r["op"] == "compress" and r["backend"] == "reference"}
    assert {"prune_and_compress_24", "prune_and_compress_24_int8"} <= one_time
    timed = [r for r in rows if r["op"] in ("gemm", "linear") and r["speedup"]]
    assert all(float(r["tflops"]) > 0 and float(r["gbps"]) > 0 for r in timed)


def test_ops_smoke_writes_markdown_and_plots(ops_smoke):
    md = (ops_smoke / "ops_smoke.md").read_text()
    assert "| contender |" in md and "not a speed claim" in md and "git " in md
    for n, k in bm.SMOKE_SHAPES:
        assert _is_png(ops_smoke / f"ops_smoke_{n}x{k}_fp16.png")


def test_e2e_smoke_writes_files(tmp_path, load_benchmark):
    script = load_benchmark("bench_e2e")
    assert script.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = bm.read_csv(tmp_path / "e2e_smoke.csv")
    _check_rows(rows)
    unsupported = getattr(script, "UNSUPPORTED", {})
    for r in rows:  # a recipe that errors fails the run, unless listed as unsupported here, with a reason
        if r["time_us"].startswith(bm.ERROR_PREFIX):
            reason = unsupported.get((r["format"], "cpu"))
            assert reason and r["time_us"].startswith(f"{bm.ERROR_PREFIX}unsupported on cpu: {reason}"), r
    scenarios = {("decode", "1"), ("decode", "2"), ("prefill", "32"), ("embed", "2")}
    for fmt in ("dense", *bm.SWAP_FORMATS):
        if (fmt, "cpu") not in unsupported:
            timed = {(r["op"], r["M"]) for r in rows if r["format"] == fmt and r["speedup"]}
            assert scenarios <= timed, fmt
    assert {r["format"] for r in rows} == {"dense", *bm.SWAP_FORMATS}
    for r in rows:  # each recipe's output was checked against the dense model with its weights
        if not r["time_us"].startswith(bm.ERROR_PREFIX):
            assert r["checked"] == ("reference" if r["format"] == "dense" else "yes"), r
    md = (tmp_path / "e2e_smoke.md").read_text()
    assert "| format |" in md and bm.UNCHECKED_MARK not in md
    assert _is_png(tmp_path / "e2e_smoke.png")


def test_merge_combines_split_runs(ops_smoke, tmp_path):
    out, rows = bm.run_ops(bench_args(["--merge", str(ops_smoke / "ops_smoke.csv"), str(ops_smoke / "ops_smoke.csv"),
                                          "--out", str(tmp_path), "--name", "merged"]))
    merged = bm.read_csv(tmp_path / "merged.csv")
    original = bm.read_csv(ops_smoke / "ops_smoke.csv")
    assert merged == original + original
    assert (tmp_path / "merged.md").exists() and _is_png(tmp_path / f"merged_{64}x{128}_fp16.png")


def test_cli_without_gpu_says_so_and_runs_smoke(tmp_path, capsys, monkeypatch):
    from sparseq import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--m", "1", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert bm.read_csv(tmp_path / "ops_smoke.csv")


def _dense() -> bm.Contender:
    return bm.Contender("linear", "torch", "dense", lambda w: w, lambda w, x: lambda: F.linear(x, w))


def test_failures_and_wrong_results_are_recorded_not_raised():
    def boom(w):
        raise RuntimeError("no kernel for this shape")

    contenders = [
        _dense(),
        bm.Contender("gemm", "broken", "2:4", boom, lambda s, x: lambda: x),
        bm.Contender("gemm", "raises", "2:4", lambda w: w, lambda s, x: (lambda: 1 / 0)),
        bm.Contender("gemm", "wrong", "2:4", lambda w: w, lambda w, x: lambda: F.linear(x, w) * 2, sparse=True),
    ]
    rows = bm.sweep_shape(32, 64, [1, 3], "fp32", contenders, bm.Timer(torch.device("cpu"), cpu_reps=1), log=lambda s: None)
    by = {(r.backend, r.M): r for r in rows if r.M is not None}
    assert by[("torch", 3)].time_us > 0 and by[("torch", 3)].error is None
    assert "no kernel for this shape" in by[("broken", 1)].error
    assert "ZeroDivisionError" in by[("raises", 1)].error
    assert "wrong result" in by[("wrong", 3)].error
    assert any(r.op == "prepare" and r.backend == "broken" and r.error for r in rows)


@pytest.fixture
def fake_backend(monkeypatch):
    """A ``sparseq::sparse24_mm_benchtest`` op with a layout hook, removed afterwards."""
    calls = []
    lib = torch.library.Library("sparseq", "FRAGMENT")
    lib.define("sparse24_mm_benchtest(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor")
    lib.impl("sparse24_mm_benchtest", lambda x, v, m, b=None: ref.sparse24_mm(x, v, m, b), "CompositeExplicitAutograd")
    import sparseq.cuda_ops

    def hook(values, meta):
        calls.append(values.shape)
        return values.clone(), meta.clone()

    monkeypatch.setattr(sparseq.cuda_ops, "prepare_sparse24_mm_benchtest", hook, raising=False)
    yield calls
    lib._destroy()


def test_registered_backend_is_discovered_and_timed(fake_backend):
    assert "benchtest" in bm.registered_backends("sparse24_mm")
    assert "int8" not in bm.registered_backends("prune_and_compress_24")
    contenders, _ = bm.discover(torch.float16, torch.device("cpu"), only=("benchtest",))
    assert [c.key for c in contenders] == [("linear", "torch", "dense"), ("gemm", "benchtest", "2:4")]
    rows = bm.sweep_shape(16, 64, [2], "fp16", contenders, bm.Timer(torch.device("cpu"), cpu_reps=1), log=lambda s: None)
    timed = [r for r in rows if r.backend == "benchtest" and r.op == "gemm"]
    assert timed and timed[0].error is None and timed[0].speedup > 0
    assert fake_backend, "the layout hook was not used"


def test_csv_round_trip_and_error_cell(tmp_path):
    env = bm.Environment("cpu (test)", "2.x", "none", "abc123")
    rows = [bm.Row("gemm", "b", "2:4", "fp16", 8, 16, 4, time_us=2.0, dense_us=4.0, flops=1e6, bytes=1e3),
            bm.Row("gemm", "c", "2:4", "fp16", 8, 16, 4, dense_us=4.0, error="Boom:\n  multi-line, reason")]
    back = bm.read_csv(bm.write_csv(tmp_path / "x.csv", rows, env))
    assert back[0]["speedup"] == "2.0000" and back[0]["tflops"] == "0.5" and back[0]["gbps"] == "0.5"
    assert back[1]["time_us"] == "error: Boom: multi-line, reason" and back[1]["speedup"] == ""
    (tmp_path / "bad.csv").write_text("gpu,torch\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        bm.read_csv(tmp_path / "bad.csv")


def test_shapes_and_m_values_follow_the_issue():
    shapes = bm.all_shapes()
    for nk in [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096),
               (28672, 8192), (8192, 28672), (10240, 8192), (384, 384), (1536, 384), (384, 1536)]:
        assert nk in shapes
    assert bm.M_FULL == [2 ** i for i in range(15)]
    assert bm.parse_shape("14336x4096") == (14336, 4096)
    with pytest.raises(Exception, match="NxK"):
        bm.parse_shape("4096")


def test_reference_checks_follow_the_reference():
    x, w = torch.randn(3, 64), torch.randn(16, 64)
    wq, sw = ref.quantize_per_channel(w)
    xq, sx = ref.quantize_per_token(x)
    y = ref.int8_mm(xq, wq, sx, sw, None, torch.float32)
    assert bm.reference_check("w8a8", x, w, torch.float32)(y) is None
    assert bm.reference_check("w8a8", x, w, torch.float32)(y * (1 + 1e-5)) is not None
    y = ref.int8_weight_only_mm(x, wq, sw)
    assert bm.reference_check("int8_weight_only", x, w, torch.float32)(y) is None
    assert bm.reference_check("float", x, w, torch.float32)(y, tol=5e-2) is None  # approx: quantization error
    assert bm.reference_check("float", x, w, torch.float32)(y) is not None


def test_cpu_timer_and_environment():
    t = bm.Timer(torch.device("cpu"), cpu_reps=3)(lambda: torch.ones(8).sum())
    assert t > 0
    env = bm.environment(torch.device("cpu"))
    assert env.gpu.startswith("cpu") and env.torch == torch.__version__ and env.git_sha
    assert bm.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bm.results_dir(env, tmp := Path("/x")) == tmp / bm.slug(env.gpu)


@pytest.mark.gpu
def test_quick_sweep_on_gpu(tmp_path):
    """On a GPU: a tiny sweep times dense and every discovered contender without crashing."""
    out, rows = bm.run_ops(bench_args(["--quick", "--m", "16", "--shape", "4096x4096", "--models", "none",
                                          "--rep-ms", "5", "--out", str(tmp_path)]))
    assert any(r.format == "dense" and r.time_us for r in rows)
    _check_rows(bm.read_csv(out / "ops_quick.csv"))


def bench_args(argv):
    import argparse

    p = argparse.ArgumentParser()
    bm.add_op_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
