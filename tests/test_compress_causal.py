"""sparseq.compress on causal LMs through the task seam: task choice, 2:4 / W8A8 on the bundled
Shakespeare Llama's decoder blocks, perplexity against a direct computation, KL recovery with
fixed masks, the perplexity budget of the planner and schedule, and the CLI end to end."""
import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseq import reference  # noqa: E402
from sparseq.compress import compress_model, recover  # noqa: E402
from sparseq.compress.data import load_model  # noqa: E402
from sparseq.compress.lm import LMScores, kl_distill_loss  # noqa: E402
from sparseq.compress.simulated import SimulatedLinear  # noqa: E402
from sparseq.compress.tasks import CausalLMTask, EmbeddingTask, task_for  # noqa: E402
from sparseq.models import BUNDLED_LLAMA_DIR, held_out_perplexity, load_llama  # noqa: E402

CALIB = [f"My lord, the {w} is come to court with news of {v}" for w, v in
         zip(["king", "queen", "duke", "fool", "army", "night"] * 3, ["war", "peace", "love", "death", "gold", "snow"] * 3)]
EVAL = ["What light through yonder window breaks", "The quality of mercy is not strained",
        "Now is the winter of our discontent", "Friends, Romans, countrymen, lend me your ears",
        "All the world's a stage, and all the men and women merely players", "Good night, good night",
        "I am a man more sinned against than sinning", "If music be the food of love, play on"]
PROJ = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"}


@pytest.fixture(scope="module")
def llama():
    return load_llama()


@pytest.fixture(scope="module")
def tiny(llama):
    """A small random Llama (2 blocks, hidden 64, GQA) with the bundled tokenizer: fast tests."""
    _, tok = llama
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                   tie_word_embeddings=True, initializer_range=0.1, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return transformers.LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def one_block(llama):
    """The bundled Llama cut to its first decoder block: trained weights (pruning costs
    perplexity monotonically), a quarter of the calibration work."""
    model, tok = llama
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:1]
    m.config.num_hidden_layers = 1
    return m, tok


def _sims(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SimulatedLinear)}


def test_task_is_picked_from_the_model(llama):
    model, _ = llama
    task = task_for(model)
    assert isinstance(task, CausalLMTask) and task.max_length == model.config.max_position_embeddings
    prefix, blocks = task.blocks(model)
    assert prefix == "model.layers" and blocks is model.model.layers
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64))
    assert isinstance(task_for(bert), EmbeddingTask)
    assert isinstance(task_for(model.model), EmbeddingTask)  # the bare decoder has no logits to score
    loaded, tok = load_model(BUNDLED_LLAMA_DIR)  # `sparseq compress --model DIR` loads the LM head
    assert type(loaded).__name__ == "LlamaForCausalLM" and isinstance(task_for(loaded), CausalLMTask)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2


@pytest.mark.parametrize("recipe,method", [("2:4", "sparsegpt"), ("2:4+w8a8", "wanda")])
def test_decoder_blocks_get_valid_24_layers(llama, recipe, method):
    model, tok = llama
    m = copy.deepcopy(model)
    res = compress_model(m, tok, CALIB, recipe, method, batch_size=8, alpha=0.5)  # a fixed alpha: no search, faster
    sims = _sims(m)
    n_layers = model.config.num_hidden_layers
    assert len(sims) == len(res.layers) == 7 * n_layers
    assert {n.split(".", 3)[3] for n in sims} == PROJ and all(n.startswith("model.layers.") for n in sims)
    assert all(reference.is_24_sparse(s.pruned_weight()) and str(s.format) == recipe for s in sims.values())
    assert all((s.smooth is not None) == recipe.endswith("w8a8") for s in sims.values())
    assert type(m.lm_head) is torch.nn.Linear and m.lm_head.weight is m.model.embed_tokens.weight  # tied, dense
    task = task_for(m)
    b = task.batches(tok, EVAL, 4)
    s = task.score(m, b, task.reference(model, b))
    assert 1.0 < s.ppl_ratio < 2.0 and 0.3 < s.top1_agreement < 1.0  # compressed: close, not identical


def test_perplexity_matches_a_direct_computation(llama):
    model, tok = llama
    task = task_for(model)
    batches = task.batches(tok, EVAL, 3)  # sorted by length, padded: the sums must not care
    ref = task.reference(model, batches)
    nll, n = 0.0, 0
    with torch.no_grad():
        for line in EVAL:  # one line at a time, no padding: <s> line </s>, mean loss over predicted tokens
            ids = torch.tensor([[tok.bos_token_id] + tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
            loss = model(input_ids=ids, labels=ids).loss.item()
            nll, n = nll + loss * (ids.shape[1] - 1), n + ids.shape[1] - 1
    assert ref.n_tokens == n and ref.n_lines == len(EVAL)
    assert math.isclose(ref.perplexity, math.exp(nll / n), rel_tol=1e-4)
    assert math.isclose(ref.perplexity, held_out_perplexity(model, tok, EVAL).perplexity, rel_tol=1e-4)
    same = task.score(model, batches, ref)
    assert isinstance(same, LMScores) and same.ppl_ratio == pytest.approx(1.0, abs=1e-6) and same.top1_agreement == 1.0
    assert task.loss(same) == pytest.approx(0.0, abs=1e-6)


def test_top1_agreement_counts_argmax_matches():
    t = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    s = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [9.0, 0.0, 0.0]]])  # 1 of 2 real positions agrees
    mask = torch.tensor([[1, 1, 0]])
    loss, agree = kl_distill_loss(s, t, mask)
    assert agree == 0.5 and float(loss) > 0
    zero, one = kl_distill_loss(t, t, mask)
    assert abs(float(zero)) < 1e-6 and one == 1.0


def test_kl_recovery_lowers_the_kl_with_masks_fixed(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    compress_model(m, tok, CALIB, "2:4", "magnitude", batch_size=8)
    masks = {n: s.mask.clone() for n, s in _sims(m).items()}
    task = task_for(m)
    batch = task.model_inputs(task.batches(tok, CALIB, len(CALIB))[0], torch.device("cpu"))

    def kl():
        with torch.no_grad():
            return float(task.distill_loss(m, model, batch, True)[0])

    before = kl()
    rep = recover(m, model, tok, CALIB, steps=12, batch_size=6, lr=3e-4, guard=False)
    assert rep.steps == 12 and kl() < 0.8 * before, (before, kl())
    for n, s in _sims(m).items():
        assert torch.equal(s.mask, masks[n]) and reference.is_24_sparse(s.pruned_weight())
        assert bool((s.weight[~s.mask] == 0).all())


def test_schedule_floor_and_planner_budget_are_perplexity_ratios(one_block):
    from sparseq.compress.planner import plan
    from sparseq.compress.schedule import compress_in_steps, steps_table

    model, tok = one_block
    task = task_for(model)
    b = task.batches(tok, EVAL, 8)
    ref = task.reference(model, b)
    with pytest.raises(ValueError, match="perplexity ratio"):
        compress_in_steps(copy.deepcopy(model), model, tok, CALIB, b, ref, ["2:4"], "magnitude", floor=0.9)
    done, _, _ = compress_in_steps(copy.deepcopy(model), model, tok, CALIB, b, ref, ["25%", "1:8"], "magnitude",
                                   say=lambda *_: None)
    r1, r2 = (s.oneshot.ppl_ratio for s in done)
    assert isinstance(done[0].oneshot, LMScores) and 1.0 < r1 < r2
    m = copy.deepcopy(model)
    done, result, _ = compress_in_steps(m, model, tok, CALIB, b, ref, ["25%", "1:8"], "magnitude", say=lambda *_: None,
                                        floor=(r1 + r2) / 2)  # a ceiling between the two steps' ratios
    assert [s.kept for s in done] == [True, False] and {str(s.format) for s in _sims(m).values()} == {"25%"}
    table = steps_table(done, 1e6)
    assert "ppl x" in table and "top-1" in table
    p = plan(model, tok, CALIB[:8], EVAL, formats=("2:4", "w8a8"), budget=0.02, method="magnitude")
    assert p.metric == "perplexity ratio" and len(p.formats) == 7 * model.config.num_hidden_layers
    assert p.measured - 1.0 <= 0.02 and p.frontier[0] == (1.0, 1.0)  # the measured ratio meets the budget
    assert all(v >= 0 for losses in p.layer_loss.values() for v in losses.values())


def test_cli_compresses_and_evaluates_the_bundled_llama(capsys, tmp_path):
    pytest.importorskip("sparseq.nn")
    from sparseq.cli import main

    out = tmp_path / "out"
    rc = main(["compress", "--model", str(BUNDLED_LLAMA_DIR), "--recipe", "2:4+w8a8", "--method", "magnitude",
               "--calib", "16", "--eval-lines", "24", "--out", str(out), "--quiet", "--threads", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "perplexity" in text and "task causal-lm" in text
    report = json.loads((out / "compress.json").read_text())
    assert report["task"] == "causal-lm" and len(report["layers"]) == 28 and 1.0 < report["ppl_ratio"] < 2.0
    assert report["scores"]["oneshot"]["n"] == 24 and "cosine" not in report
    rc = main(["eval", str(out), "--quiet", "--threads", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "perplexity" in text
    ratio = float(text.split("ratio ")[1].split(")")[0])
    assert abs(ratio - report["ppl_ratio"]) < 0.02  # kernel layers score what the simulation reported
