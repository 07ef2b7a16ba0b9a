"""Bounded fuzzing of loads, public ops and layers (tests/fuzz_harness.py) in subprocesses:
a crash (signal), a hang (the timeout) or memory beyond the cap fails here; problems the
harness finds are printed with their case numbers (replay: ``--replay N``).

Budget per target: ``SPARSEQ_FUZZ_SECONDS`` (default 35 s, about two minutes for the three);
the release check runs ``SPARSEQ_FUZZ_SECONDS=1800``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz_harness.py")
SECONDS = float(os.environ.get("SPARSEQ_FUZZ_SECONDS", "35"))
MEM_CAP_GIB = 4.0


@pytest.mark.parametrize("target", ["load", "ops", "layers"])
def test_fuzz(target, report_line):
    if sys.platform != "linux":
        pytest.skip("the harness caps memory through /proc and RLIMIT_AS (Linux)")
    env = dict(os.environ)  # ops: the Triton ops are compared under TRITON_INTERPRET=1 only
    cmd = [sys.executable, str(HARNESS), "--target", target, "--seconds", str(SECONDS), "--seed", "0",
           "--mem-cap-gib", str(MEM_CAP_GIB)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SECONDS + 240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fuzz {target}: no result {SECONDS + 240:.0f} s after start (a hang?):\n{e.stdout}")
    lines = [line for line in result.stdout.splitlines() if line.startswith(("fuzz ", "  "))]
    if lines:
        report_line(lines[0])
    assert result.returncode == 0, (
        f"fuzz {target} exited {result.returncode} "
        f"({'killed by signal ' + str(-result.returncode) if result.returncode < 0 else 'problems found'}):\n"
        + "\n".join(lines) + "\n" + result.stderr[-3000:])
    assert lines and " 0 cases" not in lines[0], result.stdout  # it really ran cases
