"""GPU hardening (gpu-marked, for the Hopper run): CUDA-graph replays equal eager over 1,000
replays; compute-sanitizer memcheck and racecheck find nothing in one call of each kernel."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseq

SCRIPT = Path(__file__).with_name("sanitize_kernels.py")


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 128), nn.Linear(128, 128),
                          nn.Linear(128, 128), nn.Linear(128, 64))
    sparseq.swap(model, {"0": "2:4", "2": "w8a8", "3": "int8_weight_only", "4": "2:4+w8a8",
                         "5": "2:4+int8_weight_only"}, prune="magnitude")
    return model.to(torch.bfloat16).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100])
def test_cuda_graph_1000_replays_equal_eager(m):
    model = _model()
    static_x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(static_x)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        inputs = [torch.randn(m, 256, device="cuda", dtype=torch.bfloat16) for _ in range(10)]
        expected = [model(x) for x in inputs]
        bad = []
        for i in range(1000):
            j = i % len(inputs)
            static_x.copy_(inputs[j])
            graph.replay()
            if i % 10 == 0 or i >= 990:
                torch.cuda.synchronize()
                if not torch.equal(static_out, expected[j]):
                    bad.append(i)
    assert not bad, f"replays {bad[:10]} differ from eager"


def _sanitizer():
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and root and Path(root, "bin", "compute-sanitizer").exists():
            found = str(Path(root, "bin", "compute-sanitizer"))
    return found


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (CUDA toolkit bin/)")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # the caching allocator hides overruns
    result = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "99", sys.executable, str(SCRIPT)],
                            capture_output=True, text=True, env=env, timeout=900)
    text = result.stdout + result.stderr
    assert "ERROR SUMMARY: 0 errors" in text or (tool == "racecheck" and "RACECHECK SUMMARY: 0 hazards" in text), \
        text[-4000:]
    assert result.returncode == 0, text[-4000:]
    assert "ran" in result.stdout
