import torch, time, sys, copy, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
torch.set_num_threads(2)
from sparseq.models import load_llama
from sparseq.compress.data import load_texts
from sparseq.compress.tasks import task_for
from sparseq.compress import oneshot, lm
torch.manual_seed(0)
model, tok = load_llama(); model.eval()
task = task_for(model)
texts = load_texts(n_calib=256, n_eval=1200, n_train=1200)
sets = {"heldout": task.batches(tok, texts.eval, 64), "train-plays": task.batches(tok, texts.train, 64)}
@torch.no_grad()
def logits_all(m, bs):
    return [lm.logits_of(m, b)[:, :-1] for b in bs]
dense = {k: logits_all(model, v) for k, v in sets.items()}
def score(m):
    out = []
    for k, bs in sets.items():
        nll = dn = kl = n = 0.0
        for b, L, D in zip(bs, logits_all(m, bs), dense[k]):
            t = lm._targets(b); real = t != -100
            nll += torch.nn.functional.cross_entropy(L.transpose(1, 2), t, ignore_index=-100, reduction="sum").item()
            dn += torch.nn.functional.cross_entropy(D.transpose(1, 2), t, ignore_index=-100, reduction="sum").item()
            lp, lq = D.log_softmax(-1), L.log_softmax(-1)
            kl += ((lp.exp() * (lp - lq)).sum(-1)[real]).sum().item(); n += real.sum().item()
        out.append(f"{k}: ppl ratio {math.exp((nll-dn)/n):.4f} KL(dense||m) {kl/n:.4f} (dense ppl {math.exp(dn/n):.1f})")
    return " | ".join(out)
orig_masks = oneshot._token_masks
def nobos(batches):
    ms = orig_masks(batches)
    for m in ms: m[:, 0] = False
    return ms
for name, method, patch in [("magnitude", "magnitude", None), ("wanda", "wanda", None), ("wanda, BOS excluded from norms", "wanda", nobos), ("sparsegpt", "sparsegpt", None)]:
    oneshot._token_masks = patch or orig_masks
    m = copy.deepcopy(model)
    oneshot.compress_model(m, tok, texts.calib, "2:4", method)
    print(f"{name:32s} {score(m)}", flush=True)
