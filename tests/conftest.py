"""Shared test setup: GPU-marked tests skip cleanly without CUDA; fixed seeds; helpers to
import a script from benchmarks/ and to race threads on one model; a summary section for
lines tests report (``report_line``: fuzz case counts)."""
import csv
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Callable, List

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_REPORT: List[str] = []


@pytest.fixture(scope="session")
def report_line() -> Callable[[str], None]:
    """``report_line(text)``: print ``text`` in the summary at the end of the run (what a test
    measured, e.g. how many fuzz cases it tried), even under ``-q``."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("sparseq reports")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture
def exact_cpu_numerics():
    """Run the test under ``sparseq.cpu_numerics("exact")``: CPU layers bit-exact to the reference."""
    import sparseq

    with sparseq.cpu_numerics("exact"):
        yield


@pytest.fixture
def xeon_tables(monkeypatch):
    """The CPU dispatch tables of a CPU without a ``cpu_vendor`` section (the Xeon's, which the
    tests asserting chosen backends were written against), on any machine."""
    from sparseq import dispatch

    monkeypatch.setattr(dispatch, "cpu_vendor", lambda: "GenuineIntel")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _load_script(name: str, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark() -> Callable:
    """``load_benchmark(name, module_name=None)``: import ``benchmarks/<name>.py`` (a script
    folder, not a package) as a fresh module named ``module_name`` (``_sparseq_<name>``)."""
    return lambda name, module_name=None: _load_script(name, module_name or f"_sparseq_{name}")


@pytest.fixture(scope="session")
def read_csv() -> Callable:
    """``read_csv(path)``: ``(header, rows as dicts)`` of a CSV a benchmark wrote."""

    def read(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            return reader.fieldnames, list(reader)

    return read


@pytest.fixture(scope="session")
def race() -> Callable:
    """``race(work, n=8)``: run ``work(i)`` for i < n in n threads released together by a
    barrier (so they contend on first use); returns the exceptions raised."""

    def run(work: Callable[[int], None], n: int = 8) -> List[BaseException]:
        barrier = threading.Barrier(n)
        errors: List[BaseException] = []

        def body(i: int) -> None:
            try:
                barrier.wait()
                work(i)
            except Exception as e:  # noqa: BLE001  (reported to the test)
                errors.append(e)

        threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    return run
