"""Start from the magnitude-pruned bundled Llama and swap in Wanda's 2:4 masks (and weights) on
one selection of layers at a time; print the held-out perplexity ratio to dense of each mix."""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sparseq.compress import lm, oneshot  # noqa: E402
from sparseq.compress.data import load_texts  # noqa: E402
from sparseq.compress.tasks import task_for  # noqa: E402
from sparseq.models import load_llama  # noqa: E402


def _kind(*kinds):
    return lambda name: name.split(".")[-1] in kinds


SELECTIONS = [
    ("q/k/v", _kind("q_proj", "k_proj", "v_proj")), ("o", _kind("o_proj")),
    ("gate/up", _kind("gate_proj", "up_proj")), ("down", _kind("down_proj")),
    ("block0 all", lambda n: ".layers.0." in n), ("blocks1-3 all", lambda n: ".layers.0." not in n),
    ("q", _kind("q_proj")), ("k", _kind("k_proj")), ("v", _kind("v_proj")), ("q+k", _kind("q_proj", "k_proj")),
] + [(f"v of block {b}", lambda n, b=b: n.endswith("v_proj") and f".layers.{b}." in n) for b in range(4)]

if __name__ == "__main__":
    torch.set_num_threads(2)
    model, tok = load_llama()
    model.eval()
    task = task_for(model)
    texts = load_texts(n_calib=256, n_eval=1200, n_train=10)
    batches = task.batches(tok, texts.eval, 64)
    ref = task.reference(model, batches, desc=None)
    magnitude = copy.deepcopy(model)
    oneshot.compress_model(magnitude, tok, texts.calib, "2:4", "magnitude")
    wanda = copy.deepcopy(model)
    oneshot.compress_model(wanda, tok, texts.calib, "2:4", "wanda")
    wanda_layers = dict(wanda.named_modules())
    for label, selected in SELECTIONS:
        mix = copy.deepcopy(magnitude)
        for name, module in mix.named_modules():
            if getattr(module, "mask", None) is not None and selected(name):
                module.weight.data.copy_(wanda_layers[name].weight.data)
                module.mask.copy_(wanda_layers[name].mask)
        s = lm.lm_compare(mix, batches, ref, desc=None)
        print(f"magnitude + Wanda masks on {label:14s}: ppl ratio {s.ppl_ratio:.4f} top1 {s.top1_agreement:.3f}",
              flush=True)
