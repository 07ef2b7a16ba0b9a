import torch, time, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
torch.set_num_threads(1)
from sparseq.models import load_llama
from sparseq.compress.data import load_texts
from sparseq.compress.tasks import task_for
from sparseq.compress.calibration import capture_block_inputs, collect_stats, run_block, linear_names
from sparseq.compress.oneshot import _token_masks
from sparseq.compress.pruning import prune_magnitude, prune_wanda, Sparsity
torch.manual_seed(0)
model, tok = load_llama(); model.eval()
task = task_for(model)
texts = load_texts(n_calib=256, n_eval=10, n_train=10)
batches = task.batches(tok, texts.calib, 32, 128)
masks = _token_masks(batches)
ntok = sum(int(m.sum()) for m in masks)
print("calib lines", len(texts.calib), "real tokens", ntok, "padded positions", sum(m.numel() for m in masks), "bos frac", len(texts.calib)/ntok)
print("example:", texts.calib[:3]); print(batches[0]["input_ids"][0][:12], batches[0]["attention_mask"][0][:12])
prefix, blocks = task.blocks(model)
inputs = capture_block_inputs(model, batches, blocks[0], task.model_inputs)
print("kwargs keys", list(inputs[0][1].keys()), "am", type(inputs[0][1].get("attention_mask")))
sp = Sparsity(2, 4)
# also stats with first position (BOS) excluded
nobos = []
for m in masks:
    m2 = m.clone(); m2[:, 0] = False; nobos.append(m2)
for i, block in enumerate(blocks):
    names = linear_names(block)
    mods = {n: block.get_submodule(n) for n in names}
    st = collect_stats(block, inputs, masks, mods, 0)
    st2 = collect_stats(block, inputs, nobos, mods, 0)
    for n in names:
        W = mods[n].weight.detach().double()
        H = st[n].hessian; H2 = st2[n].hessian
        def err(Wp, H): 
            D = W - Wp.double(); return float(torch.einsum("nk,kl,nl->", D, H, D) / torch.einsum("nk,kl,nl->", W, H, W))
        def derr(Wp, H):  # diagonal-only (what Wanda scores)
            D = W - Wp.double(); return float(((D**2) * torch.diag(H)[None]).sum() / ((W**2) * torch.diag(H)[None]).sum())
        wm, _ = prune_magnitude(W.float(), sp)
        ww, _ = prune_wanda(W.float(), sp, st[n].x_norm)
        ww2, _ = prune_wanda(W.float(), sp, st2[n].x_norm)
        d = torch.diag(H); d2 = torch.diag(H2)
        bosshare = float(((d - d2) / d.clamp(min=1e-30)).max())
        bosmean = float(((d - d2).sum() / d.sum()))
        print(f"{i}.{n:18s} full err mag {err(wm,H):.4f} wanda {err(ww,H):.4f} wanda-noBOS {err(ww2,H):.4f} | noBOS-H: mag {err(wm,H2):.4f} wanda {err(ww,H2):.4f} wanda-noBOS {err(ww2,H2):.4f} | diag mag {derr(wm,H):.4f} wanda {derr(ww,H):.4f} | BOS share of ||X||^2 mean {bosmean:.3f} max {bosshare:.3f} | normratio max/med {float(d.sqrt().max()/d.sqrt().median()):.1f}", flush=True)
    inputs = run_block(block, inputs)
