import torch, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
torch.set_num_threads(2)
from sparseq.models import load_llama
from sparseq.compress.data import load_texts
from sparseq.compress.tasks import task_for
model, tok = load_llama(); model.eval()
model.config._attn_implementation = "eager"
for l in model.model.layers: l.self_attn.config._attn_implementation = "eager"
texts = load_texts(n_calib=256, n_eval=300, n_train=10)
bs = task_for(model).batches(tok, texts.eval, 64)
tot = None; n = 0
with torch.no_grad():
    for b in bs:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True, use_cache=False)
        m = b["attention_mask"].bool()
        for i, a in enumerate(out.attentions):  # [B, H, T, T]
            bos = a[:, :, :, 0]  # attention each query gives to position 0
            q = m[:, None, :].expand_as(bos) & (torch.arange(m.shape[1])[None, None, :] > 0)
            v = float(bos[q].mean())
            tot = [0.0]*len(out.attentions) if tot is None else tot
            tot[i] += v * 1
        n += 1
print("mean attention mass on <s> (queries after position 0), per block:", [round(t/n, 3) for t in tot])
