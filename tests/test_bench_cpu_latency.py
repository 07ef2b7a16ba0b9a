"""``benchmarks/bench_cpu_latency.py`` (MiniLM, one sentence per call): the CSV and markdown it
writes with every sparseq model checked, and a wrong layer reported as wrong (exit status 1,
untimed) although its model is compared with itself on the reference backend too."""
import pytest
import torch

from sparseq.nn import FORMATS, Int8Linear

QUICK = ["--threads", "1", "--sentences", "3", "--budget", "0.3", "--retries", "0"]


@pytest.fixture(scope="module")
def bl(load_benchmark):
    return load_benchmark("bench_cpu_latency")


def test_writes_a_checked_row_per_model(bl, tmp_path, read_csv):
    threads = torch.get_num_threads()
    assert bl.main(QUICK + ["--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    header, rows = read_csv(tmp_path / "cpu_latency.csv")
    assert header == bl.COLUMNS
    assert [r["format"] for r in rows] == ["dense", "quantize_dynamic", *FORMATS]
    for r in rows:
        assert float(r["ms_per_sentence"]) > 0 and float(r["speedup"]) > 0
        assert r["sentences"] == "3" and 0 < int(r["tokens_min"]) <= int(r["tokens_max"])
    for r in rows[2:]:
        # W8A8 under the default fast CPU numerics: fbgemm rounds activations its own way (within
        # the bound the check above holds), so the model and its reference are two roundings apart
        assert r["checked"] == "yes" and float(r["cos_reference_min"]) > (0.98 if "w8a8" in r["format"] else 0.9999), r
        cos_dense = float(r["cos_dense_min"])  # 2:4 formats: a pruned model, far from dense
        assert (0.9 if not r["format"].startswith("2:4") else 0.0) < cos_dense <= 1.0 + 1e-6
    assert rows[0]["speedup"] == "1.00" and rows[0]["checked"] == "baseline"
    md = (tmp_path / "cpu_latency.md").read_text()
    assert "| 1 | w8a8 |" in md and "Contended:" in md


def test_wrong_layer_is_reported(bl, tmp_path, monkeypatch, read_csv):
    forward = Int8Linear.forward

    def off(self, x):  # one output element off by far more than any rounding, on every path
        y = forward(self, x).clone()
        y.view(-1)[0] += 1 + float(y.abs().max())
        return y

    monkeypatch.setattr(Int8Linear, "forward", off)
    assert bl.main(QUICK + ["--formats", "w8a8,int8_weight_only", "--out", str(tmp_path)]) == 1
    _, rows = read_csv(tmp_path / "cpu_latency.csv")
    by_format = {r["format"]: r for r in rows}
    assert by_format["w8a8"]["checked"].startswith("wrong: layer") and by_format["w8a8"]["ms_per_sentence"] == ""
    assert by_format["int8_weight_only"]["checked"] == "yes"
    assert "WRONG" in (tmp_path / "cpu_latency.md").read_text()
