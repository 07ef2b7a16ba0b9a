"""``benchmarks/bench_cpu.py --quick``: the CSV and markdown it writes, every sparseq row checked
against the dense layer it replaces, and a wrong layer reported as wrong (exit status 1), in the
layer rows and in the end-to-end MiniLM row."""
import pytest
import torch

from sparseq.nn import FORMATS, Int8Linear

COLUMNS = ["device", "cpu", "threads", "torch", "git_sha", "format", "backend", "dtype", "N", "K", "M",
           "time_us", "dense_us", "speedup", "checked"]


@pytest.fixture(scope="module")
def bc(load_benchmark):
    return load_benchmark("bench_cpu")


def test_quick_run_writes_checked_rows(bc, tmp_path, read_csv):
    threads = torch.get_num_threads()
    assert bc.main(["--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    header, rows = read_csv(tmp_path / "cpu_layers_quick.csv")
    assert header == COLUMNS == bc.COLUMNS
    md = (tmp_path / "cpu_layers_quick.md").read_text()
    assert "## 1 thread" in md and "## 2 threads" in md and "## End to end" in md
    assert {r["device"] for r in rows} == {"cpu"} and {r["threads"] for r in rows} == {"1", "2"}
    layer_rows = [r for r in rows if not r["format"].startswith("e2e")]
    # every (shape, dtype, threads, M) cell: dense, the quantize_dynamic peer (fp32), every format
    cells = {(r["N"], r["K"], r["dtype"], r["threads"], r["M"]) for r in layer_rows}
    assert {c[2] for c in cells} == {"fp32", "bf16"}
    for cell in cells:
        fmts = {r["format"] for r in layer_rows if (r["N"], r["K"], r["dtype"], r["threads"], r["M"]) == cell}
        assert fmts == {"dense", *FORMATS} | ({"quantize_dynamic"} if cell[2] == "fp32" else set())
    for r in rows:
        if r["format"] in ("dense", "e2e-minilm-dense"):
            assert r["checked"] == "baseline" and float(r["speedup"]) == 1.0
        elif "quantize_dynamic" in r["format"]:
            assert r["checked"] == "approx" and r["backend"].startswith("ao-")
        else:  # a sparseq layer (or the swapped model): checked, timed, the backend that ran named
            assert r["checked"] == "yes", r
            assert r["backend"] not in ("", "-", "?"), r
        assert float(r["time_us"]) > 0 and float(r["dense_us"]) > 0
        # times are written to 0.01 us, the speedup to 4 digits from the unrounded times
        slack = 1e-3 + 0.006 / float(r["time_us"]) + 0.006 / float(r["dense_us"])
        assert float(r["speedup"]) == pytest.approx(float(r["dense_us"]) / float(r["time_us"]), rel=slack)
    assert {r["format"] for r in rows if r["format"].startswith("e2e")} == {
        "e2e-minilm-dense", "e2e-minilm-w8a8", "e2e-minilm-quantize_dynamic"}


def test_wrong_layer_is_reported(bc, tmp_path, monkeypatch, read_csv):
    forward = Int8Linear.forward

    def off(self, x):  # one output element off by far more than any rounding
        y = forward(self, x).clone()
        y.view(-1)[0] += 1 + float(y.abs().max())
        return y

    monkeypatch.setattr(Int8Linear, "forward", off)
    code = bc.main(["--quick", "--formats", "w8a8,2:4", "--threads", "1", "--out", str(tmp_path)])
    assert code == 1
    _, rows = read_csv(tmp_path / "cpu_layers_quick.csv")
    w8 = [r for r in rows if r["format"] in ("w8a8", "e2e-minilm-w8a8")]  # the swapped model too
    assert len({r["format"] for r in w8}) == 2
    assert all(r["checked"].startswith("wrong") and r["time_us"] == "" for r in w8)
    assert all(r["checked"] == "yes" for r in rows if r["format"] == "2:4")
    assert "WRONG" in (tmp_path / "cpu_layers_quick.md").read_text()
