"""``sparseq bench --cpu``: the op sweep on the CPU paths, on tiny shapes (not a speed claim).

Every cell holds dense ``F.linear`` (1.0x), the ``quantize_dynamic`` peer (fp32) and every
``sparseq.swap`` format, each output checked against the dense layer before it is timed; a
wrong layer becomes an error row; all contenders of a cell are timed in interleaved rounds.
"""
import torch
import torch.nn.functional as F

from sparseq import benchmarks as bm
from sparseq import cli
from sparseq.nn import Int8Linear

CPU = torch.device("cpu")


def _cells(rows):
    out = {}
    for r in rows:
        if r["op"] not in bm.ONE_TIME_OPS:
            out.setdefault((r["N"], r["K"], r["dtype"], r["M"]), []).append(r)
    return out


def test_cpu_sweep_writes_checked_rows_in_the_csv_columns(tmp_path):
    threads = torch.get_num_threads()
    argv = ["bench", "--cpu", "--shape", "64x128", "--m", "1,5", "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == threads  # restored
    assert (tmp_path / "ops_cpu_t1.csv").read_text().splitlines()[0] == ",".join(bm.CSV_COLUMNS)
    rows = bm.read_csv(tmp_path / "ops_cpu_t1.csv")
    assert all(r["gpu"].startswith("cpu ") and r["git_sha"] for r in rows)
    assert not [r for r in rows if r["time_us"].startswith(bm.ERROR_PREFIX)]
    cells = _cells(rows)
    assert set(cells) == {("64", "128", d, m) for d in ("fp32", "bf16") for m in ("1", "5")}
    for (_, _, dtype, _), cell in cells.items():
        by_format = {r["format"]: r for r in cell}
        peers = {"quantize_dynamic"} if dtype == "fp32" else set()
        assert set(by_format) == {"dense", *bm.SWAP_FORMATS} | peers
        assert float(by_format["dense"]["speedup"]) == 1.0
        dense_us = float(by_format["dense"]["time_us"])
        for r in cell:
            assert float(r["time_us"]) > 0 and float(r["dense_us"]) == dense_us
            if r["backend"] == "sparseq.nn":
                assert r["checked"] == "yes", r
            elif r["format"] == "quantize_dynamic":
                assert r["backend"] == "torch.ao" and r["checked"].startswith("approx: relative L2"), r
    md = (tmp_path / "ops_cpu_t1.md").read_text()
    assert "1 thread" in md and "quantize_dynamic" in md and "## 64 x 128, bf16" in md


def test_cpu_sweep_reports_a_wrong_layer_and_does_not_time_it(monkeypatch):
    forward = Int8Linear.forward

    def off(self, x):  # one element far off any rounding bound
        y = forward(self, x).clone()
        y.view(-1)[0] += 0.05 * (1 + float(y.abs().max()))
        return y

    monkeypatch.setattr(Int8Linear, "forward", off)
    rows = bm.run_op_sweep([(32, 64)], [3], ["fp32"], bm.Timer(CPU, cpu_reps=1), cpu=True, log=lambda s: None)
    timed = {r.format: r for r in rows if r.op not in bm.ONE_TIME_OPS}
    assert timed["w8a8"].error and "wrong result" in timed["w8a8"].error and timed["w8a8"].time_us is None
    assert timed["2:4"].checked == "yes" and timed["2:4"].time_us > 0


def test_cell_times_every_contender_in_interleaved_rounds():
    order = []

    def counted(name):
        return bm.Contender("linear", name, "dense" if name == "base" else "2:4", lambda w: w,
                            lambda w, x: lambda: (order.append(name), F.linear(x, w))[1])

    contenders = [counted("base"), counted("other")]
    timer = bm.Timer(CPU, cpu_reps=1, rounds=3)
    rows = bm.sweep_shape(16, 32, [2], "fp32", contenders, timer, log=lambda s: None)
    # one checked call each, then per round: one warm-up + one timed call each, in turn
    assert order == ["base", "other"] + ["base", "base", "other", "other"] * 3
    base, other = [r for r in rows if r.M == 2]
    assert base.dense_us == base.time_us == other.dense_us and other.time_us > 0
