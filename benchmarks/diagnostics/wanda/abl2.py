import torch, sys, copy, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
torch.set_num_threads(2)
from sparseq.models import load_llama
from sparseq.compress.data import load_texts
from sparseq.compress.tasks import task_for
from sparseq.compress import oneshot, lm
model, tok = load_llama(); model.eval()
task = task_for(model)
texts = load_texts(n_calib=256, n_eval=1200, n_train=10)
bs = task.batches(tok, texts.eval, 64)
ref = task.reference(model, bs, desc=None)
mm = copy.deepcopy(model); oneshot.compress_model(mm, tok, texts.calib, "2:4", "magnitude")
mw = copy.deepcopy(model); oneshot.compress_model(mw, tok, texts.calib, "2:4", "wanda")
W = dict(mw.named_modules())
groups = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "q+k": ("q_proj", "k_proj")}
for g, keys in list(groups.items()):
    m = copy.deepcopy(mm)
    for n, mod in m.named_modules():
        if not hasattr(mod, "mask") or mod.mask is None: continue
        take = (keys and n.split(".")[-1] in keys) or (g == "block0 all" and ".layers.0." in n) or (g == "blocks1-3 all" and ".layers.0." not in n)
        if take:
            mod.weight.data.copy_(W[n].weight.data); mod.mask.copy_(W[n].mask)
    s = lm.lm_compare(m, bs, ref, desc=None)
    print(f"magnitude + Wanda masks on {g:14s}: ppl ratio {s.ppl_ratio:.4f} top1 {s.top1_agreement:.3f}", flush=True)
