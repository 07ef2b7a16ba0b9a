"""Shared by the vLLM tests (tests/test_vllm_plugin.py, tests/test_vllm_stock.py): where vLLM's
python is, transformers' greedy tokens, and running tests/vllm_driver.py on a job.

vLLM runs in its own venv (``SPARSEQ_VLLM_PYTHON``; ``bash .ci/vllm`` builds it and runs the
tests); the tests run in the main venv and start the driver as a subprocess.
"""
import inspect
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

VLLM_PYTHON = os.environ.get("SPARSEQ_VLLM_PYTHON")
ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "vllm_driver.py"
SKIP_REASON = "the vLLM tests need SPARSEQ_VLLM_PYTHON (a python with vllm: bash .ci/vllm)"
KV_CACHE_BYTES = 64 << 20  # 4 KiB per token of the bundled Llama in fp32: room for 16k tokens


@torch.no_grad()
def greedy(model, prompt: List[int], n: int) -> List[int]:
    """``n`` greedy tokens after ``prompt`` (token ids) with the KV cache: the prompt in one
    forward, then one token per step; no EOS handling (vLLM runs with ignore_eos)."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.24
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        if len(tokens) < n:
            out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{key: getattr(out, key)})
    return tokens


def vllm_env(root: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of vLLM's processes: sparseq from this checkout, offline, torch.compile
    caches under the test's folder, the KV cache size from the job (not VLLM_CPU_KVCACHE_SPACE)."""
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CACHE_ROOT=str(root / "vllm-cache"), **(extra or {}))
    return env


def start_driver(job: dict, root: Path, name: str, env: Optional[Dict[str, str]] = None) -> dict:
    """Start ``job`` (see tests/vllm_driver.py) in a driver process and return at once (the
    caller computes transformers' side meanwhile: vLLM's in-process engines are bound to one
    core, so the other one is free); :func:`finish_driver` waits for it."""
    (root / f"{name}.json").write_text(json.dumps({"kv_cache_memory_bytes": KV_CACHE_BYTES, **job}))
    log = root / f"{name}.log"
    out = root / f"{name}.out.json"
    with open(log, "w") as f:
        proc = subprocess.Popen([VLLM_PYTHON, str(DRIVER), str(root / f"{name}.json"), str(out)], stdout=f,
                                stderr=subprocess.STDOUT, env=vllm_env(root, env), cwd=root)
    return {"proc": proc, "log_path": log, "out": out, "t0": time.perf_counter()}


def finish_driver(handle: dict, timeout_s: float) -> dict:
    """Wait for a driver; ``{"results", "log", "log_path", "seconds"}``. Fails with the log's
    tail when the driver exits non-zero or runs past ``timeout_s`` (then it is killed)."""
    proc, log = handle["proc"], handle["log_path"]
    try:
        proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - handle["t0"])))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"vllm_driver.py ran past {timeout_s} s; log {log}:\n"
                             f"{log.read_text(errors='replace')[-6000:]}") from None
    seconds = time.perf_counter() - handle["t0"]
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"vllm_driver.py exited {proc.returncode}; log {log}:\n{text[-6000:]}"
    return {"results": json.loads(handle["out"].read_text()), "log": text, "log_path": log, "seconds": seconds}


def stop_driver(handle: dict) -> None:
    """Kill a driver still running (the caller failed before :func:`finish_driver`)."""
    if handle["proc"].poll() is None:
        handle["proc"].kill()
        handle["proc"].wait()


def check_tokens(got: dict, want: List[List[int]], what: str) -> None:
    """A driver result's greedy tokens equal ``want`` prompt by prompt (its margins in the message)."""
    assert "error" not in got, f"vLLM run {what} failed: {got.get('error')}"
    assert len(got["tokens"]) == len(want)
    for i, (g, w) in enumerate(zip(got["tokens"], want)):
        assert g == w, f"{what}, prompt {i}: vLLM {g} != transformers + sparseq {w}; " \
                       f"vLLM top-2 logprob margins {got['margins'][i]}"
