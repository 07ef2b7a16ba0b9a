"""Generation on a GPU (issue 16 item 4; gpu-marked, for a GPU machine): the bundled Llama
swapped to every format generates with transformers' static KV cache under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs) the greedy tokens of the same model run
eagerly with the dynamic cache, and inductor records no CUDA-graph skip (a host sync, a CPU
tensor or a mutated input in any sparseq layer would make it fall back to eager).

Tokens are compared up to the first step where the eager run's top-2 logit gap is below
NEAR_TIE: compiled kernels fuse the non-sparseq ops (RMSNorm, rotary, SwiGLU) and round
differently in bf16, which may flip a near tie but nothing else."""
import copy

import pytest
import torch

import sparseq

pytest.importorskip("transformers")
from sparseq.models import load_llama  # noqa: E402

FORMATS = ["2:4", "w8a8", "int8_weight_only", "2:4+w8a8", "2:4+int8_weight_only"]
PROMPT = "To be, or not to be"
NEW = 24
NEAR_TIE = 0.1  # bf16 logits of this model are O(10): a few ulps


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model, tokenizer = load_llama()
    return model.eval(), tokenizer


def _eager(model, batch):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, batch["input_ids"].shape[1]:]
    gaps = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    return tokens, gaps


def _static_cuda_graphs(model, batch):
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # the first call records the graphs, the second replays them
            out = compiled.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                    cache_implementation="static")
    return out[0, batch["input_ids"].shape[1]:]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_static_cache_cuda_graphs_generate_the_eager_tokens(llama, fmt):
    from torch._dynamo.utils import counters

    base, tokenizer = llama
    model = copy.deepcopy(base)
    sparseq.swap(model, {"lm_head": "dense", "*": fmt}, prune="magnitude")
    model = model.to(torch.bfloat16).cuda()
    batch = tokenizer(PROMPT, return_tensors="pt").to("cuda")
    expected, gaps = _eager(model, batch)

    torch._dynamo.reset()
    counters.clear()
    got = _static_cuda_graphs(model, batch)
    skips = dict(counters["inductor"])
    assert not any(k.startswith("cudagraph_skips") and v for k, v in skips.items()), skips

    first_tie = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), len(gaps))
    assert first_tie >= 4, f"a near tie at step {first_tie} leaves too little to compare: {gaps[:8]}"
    assert torch.equal(got[:first_tie].cpu(), expected[:first_tie].cpu()), (got.tolist(), expected.tolist())
