"""Packaging promises: light import, no top-level ``kernels``, backends report, CLI works."""
import subprocess
import sys

import pytest

import sparseq


def _python(code: str, cwd=None) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=cwd).stdout


def test_import_does_no_cuda_work_and_loads_no_kernels():
    out = _python(
        "import sys, torch, sparseq\n"
        "print(torch.cuda.is_initialized())\n"
        "print(sorted(m for m in sys.modules if m.startswith('sparseq.kernels') or m.startswith('sparseq._C')))\n"
    )
    assert out.split("\n")[:2] == ["False", "[]"]


def test_kernels_is_a_subpackage_not_top_level(tmp_path):
    # run outside the checkout so that only the installed package is visible
    out = _python(
        "import importlib.util, sparseq.kernels\n"
        "print(sparseq.kernels.__name__)\n"
        "print(importlib.util.find_spec('kernels') is None or 'sparseq' not in str(importlib.util.find_spec('kernels').origin))\n",
        cwd=tmp_path,
    )
    assert out.split("\n")[:2] == ["sparseq.kernels", "True"]


def test_kernels_available_reports_every_backend():
    status = sparseq.kernels_available()
    assert set(status) == {"reference", "triton", "cuda", "onednn", "fbgemm", "cpu_extension"}
    assert status["reference"].available
    for s in status.values():
        assert isinstance(s.available, bool) and s.reason


def test_lazy_export_unknown_name():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sparseq.nope


@pytest.mark.parametrize("argv", [["-m", "sparseq", "info"]])
def test_cli_info(argv):
    out = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True).stdout
    assert f"sparseq   {sparseq.__version__}" in out
    for backend in ("reference", "triton", "cuda"):
        assert f"backend   {backend}" in out


def test_cli_without_command_prints_help():
    proc = subprocess.run([sys.executable, "-m", "sparseq"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: sparseq" in proc.stdout
