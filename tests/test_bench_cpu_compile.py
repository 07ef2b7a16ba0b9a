"""``benchmarks/bench_cpu_compile.py`` (MiniLM eager and under torch.compile): the CSV and markdown
it writes with each compiled model checked against itself eager, and a compiled model that
drifts reported as wrong (untimed, exit status 1)."""
import pytest
import torch
from torch import nn

QUICK = ["--quick"]
MODELS = [("dense", "no"), ("dense", "yes"), ("w8a8", "no"), ("w8a8", "yes"), ("quantize_dynamic", "no")]


@pytest.fixture(scope="module")
def bcc(load_benchmark):
    return load_benchmark("bench_cpu_compile")


def test_writes_checked_rows_eager_and_compiled(bcc, tmp_path, read_csv):
    threads = torch.get_num_threads()
    assert bcc.main(QUICK + ["--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    header, rows = read_csv(tmp_path / "cpu_compile.csv")
    assert header == bcc.COLUMNS
    for workload in ("batch", "sentence"):
        got = [r for r in rows if r["workload"] == workload]
        assert [(r["model"], r["compiled"]) for r in got] == MODELS
        assert [r["checked"] for r in got] == ["baseline", "yes", "yes", "yes", "approx"]
        for r in got:
            assert float(r["ms_per_call"]) > 0 and float(r["speedup_vs_dense_compiled"]) > 0
        assert float(got[1]["compile_s"]) > 0 and float(got[3]["compile_s"]) > 0
        assert float(got[1]["cos_min"]) >= bcc.COMPILED_COS and float(got[2]["cos_min"]) >= bcc.W8A8_COS
    assert int(rows[0]["rows_per_linear"]) > 4 and rows[5]["rows_per_linear"] == str(bcc.SENTENCE_TOKENS)
    md = (tmp_path / "cpu_compile.md").read_text()
    assert "| 1 | batch |" in md and "| 1 | sentence |" in md and "Contended:" in md


class _Drifting(nn.Module):
    """What a miscompiled model would give: the eager outputs, shifted."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.last_hidden_state.add_(torch.randn_like(out.last_hidden_state))
        return out


def test_a_drifting_compiled_model_is_wrong_and_untimed(bcc, tmp_path, monkeypatch, read_csv):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: _Drifting(model))
    assert bcc.main(QUICK + ["--out", str(tmp_path)]) == 1
    _, rows = read_csv(tmp_path / "cpu_compile.csv")
    for r in rows:
        if r["compiled"] == "yes":
            assert r["checked"].startswith("wrong: ") and r["ms_per_call"] == "", r
        else:
            assert not r["checked"].startswith("wrong") and float(r["ms_per_call"]) > 0, r
