"""The SGLang plugin in a real SGLang engine (GPU): the bundled Shakespeare Llama, swapped to each
sparseq format and saved by ``sparseq.save``, generates in ``sglang.Engine(quantization="sparseq")``
the greedy tokens of transformers running the same saved model (``sparseq.load``) on the GPU; the
dense model goes through the same check, and one run finds the method in config.json alone.

bf16 on the GPU: two correct engines may pick different tokens where the top two logits nearly
tie, so tokens are compared up to the first step whose transformers top-2 margin is below
``MARGIN`` (and at least ``MIN_COMPARED`` steps of each prompt must be compared).

Skipped without a GPU or without SGLang (it pins a CUDA stack; ``pip install sglang==0.5.23`` in
the GPU environment). SGLang's layers and loaders on CPU: test_sglang_layers.py.
"""
import json
import shutil

import pytest
import torch

pytestmark = pytest.mark.gpu
sglang = pytest.importorskip("sglang", reason="needs SGLang (pip install sglang==0.5.23)")

import sparseq  # noqa: E402
from sparseq.models import load_llama  # noqa: E402

PROMPTS = ["To be, or not to be", "My lord, the king", "O Romeo, Romeo"]
MAX_TOKENS = 16
MARGIN = 0.05  # logits; below it a bf16 tie-break may differ between two correct engines
MIN_COMPARED = 4
DTYPE = torch.bfloat16
CASES = {  # name: recipe (lm_head stays dense: SGLang runs it as an embedding-shaped LM head)
    "2:4": {"lm_head": "dense", "*": "2:4"},
    "w8a8": {"lm_head": "dense", "*": "w8a8"},
    "int8_weight_only": {"lm_head": "dense", "*": "int8_weight_only"},
    "2:4+w8a8": {"lm_head": "dense", "*": "2:4+w8a8"},
    "2:4+int8_weight_only": {"lm_head": "dense", "*": "2:4+int8_weight_only"},
}


def greedy(model, ids, n):
    """Greedy tokens and the top-2 logit margin at each step (transformers, with the KV cache)."""
    out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(ids):].tolist()
    margins = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    return tokens, margins


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    model, tokenizer = load_llama()
    model = model.to(DTYPE).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    dirs = {"dense": root / "dense"}
    model.save_pretrained(dirs["dense"])
    tokenizer.save_pretrained(dirs["dense"])
    for case, recipe in CASES.items():
        m, _ = load_llama()
        m = m.to(DTYPE).eval()
        sparseq.swap(m, recipe, prune="magnitude")
        d = dirs[case] = root / case.replace(":", "").replace("+", "_")
        sparseq.save(m, d)
        tokenizer.save_pretrained(d)
    auto = dirs["w8a8 auto"] = root / "w8a8_auto"  # config.json names the method: no flag needed
    shutil.copytree(dirs["w8a8"], auto)
    config = json.loads((auto / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sparseq"
    return {"dirs": dirs, "prompts": prompts}


def expected(d, prompts):
    model = (sparseq.load(d) if (d / "sparseq.json").exists() else _dense(d)).to("cuda").eval()
    with torch.no_grad():
        return [greedy(model, p, MAX_TOKENS) for p in prompts]


def _dense(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, torch_dtype=DTYPE)


def engine_tokens(d, prompts, quantization):
    engine = sglang.Engine(model_path=str(d), quantization=quantization, dtype="bfloat16",
                           mem_fraction_static=0.3, random_seed=0, log_level="error")
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0.0,
                                                                   "max_new_tokens": MAX_TOKENS,
                                                                   "ignore_eos": True})
    finally:
        engine.shutdown()
    return [list(o["output_ids"]) for o in outs]


@pytest.mark.parametrize("case, quantization", [("dense", None)] + [(c, "sparseq") for c in CASES]
                         + [("w8a8 auto", None)])
def test_sglang_engine_generates_the_tokens_of_transformers(saved, case, quantization):
    d = saved["dirs"][case]
    want = expected(d, saved["prompts"])
    got = engine_tokens(d, saved["prompts"], quantization)
    for i, ((tokens, margins), engine) in enumerate(zip(want, got)):
        n = next((j for j, m in enumerate(margins) if m < MARGIN), len(tokens))
        assert n >= MIN_COMPARED, f"{case}, prompt {i}: near-tie at step {n} (margins {margins}); pick another prompt"
        assert engine[:n] == tokens[:n], f"{case}, prompt {i}: SGLang {engine} != transformers {tokens} (first {n})"
