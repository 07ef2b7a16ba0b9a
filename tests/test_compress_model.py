"""sparseq.compress on a tiny random BERT: sequential calibration, recovery, export, save/load."""
import copy
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseq import reference  # noqa: E402
from sparseq.compress import compress_model, recover  # noqa: E402
from sparseq.compress.recovery import distill_loss  # noqa: E402
from sparseq.compress.evaluate import batches_by_length, compare, embed  # noqa: E402
from sparseq.compress.simulated import SimulatedLinear  # noqa: E402

LINES = [f"line {i} of the calibration text, {'with more words ' * (i % 4)}and a tail" for i in range(48)]
EVAL = [f"held out sentence number {i} {'about kings and queens ' * (i % 3)}here" for i in range(40)]


class Tok:
    """A tiny word-hash tokenizer with the call signature compress/evaluate use."""

    def tokenize(self, s):
        return s.split()

    def __call__(self, lines, return_tensors="pt", padding=True, truncation=True, max_length=64):
        # zlib.crc32, not hash(): str hashes change per process (PYTHONHASHSEED), and so would the data
        ids = [[1] + [3 + zlib.crc32(w.encode()) % 250 for w in s.split()][: max_length - 2] + [2] for s in lines]
        n = max(map(len, ids))
        return {"input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, initializer_range=0.2)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    return model, Tok()


def _score(dense, model, tok):
    b = batches_by_length(tok, EVAL, 16)
    return compare(embed(dense, b), embed(model, b))


def test_sequential_sparsegpt_beats_magnitude_and_masks_are_24(tiny):
    model, tok = tiny
    scores = {}
    for method in ("magnitude", "sparsegpt"):
        m = copy.deepcopy(model)
        res = compress_model(m, tok, LINES, "2:4+w8a8", method, batch_size=16)
        sims = [x for x in m.modules() if isinstance(x, SimulatedLinear)]
        assert len(sims) == 12 and len(res.layers) == 12
        assert all(reference.is_24_sparse(s.pruned_weight()) for s in sims)
        assert all(s.smooth is not None for s in sims)
        scores[method] = _score(model, m, tok).cosine
    assert scores["sparsegpt"] > scores["magnitude"], scores


def test_recipe_dict_leaves_other_layers_dense(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    res = compress_model(m, tok, LINES, {"*.intermediate.dense": "4:8", "*.output.dense": "w8a8"}, "wanda")
    assert set(res.recipe().values()) == {"4:8", "w8a8"}
    assert isinstance(m.encoder.layer[0].attention.self.query, torch.nn.Linear)


def test_recovery_keeps_masks_and_improves(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    compress_model(m, tok, LINES, "2:4", "magnitude")
    masks = {n: x.mask.clone() for n, x in m.named_modules() if isinstance(x, SimulatedLinear)}
    def loss():
        b = tok(LINES)
        with torch.no_grad():
            return float(distill_loss(m(**b).last_hidden_state, model(**b).last_hidden_state, b["attention_mask"])[0])

    before = loss()
    recover(m, model, tok, LINES, steps=40, batch_size=16, lr=1e-3)
    assert loss() < 0.9 * before
    for n, x in m.named_modules():
        if isinstance(x, SimulatedLinear):
            assert torch.equal(x.mask, masks[n])
            assert reference.is_24_sparse(x.pruned_weight()) and bool((x.weight[~x.mask] == 0).all())


@pytest.mark.parametrize("layers", ["all", "last"])
def test_recovery_layer_choice_improves_the_final_state(tiny, layers):
    """Distilling every layer's output (default) or only the last one both lower the loss
    on the final hidden state, which is what the sentence embeddings are made of."""
    model, tok = tiny
    m = copy.deepcopy(model)
    compress_model(m, tok, LINES, "2:4", "magnitude")
    b = tok(LINES)
    def loss():
        with torch.no_grad():
            return float(distill_loss(m(**b).last_hidden_state, model(**b).last_hidden_state, b["attention_mask"])[0])

    before = loss()
    recover(m, model, tok, LINES, steps=30, batch_size=16, lr=1e-3, layers=layers)
    assert loss() < 0.9 * before


def test_recovery_guard_undoes_a_harmful_run(tiny, monkeypatch):
    from sparseq.compress import recovery

    model, tok = tiny
    m = copy.deepcopy(model)
    compress_model(m, tok, LINES, "2:4", "magnitude")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    scores = iter([0.9, 0.8])  # the held-back lines get worse
    monkeypatch.setattr(recovery, "_val_cosine", lambda *a: next(scores))
    rep = recover(m, model, tok, LINES, steps=3, batch_size=16, lr=1e-2)
    assert rep.kept is False and (rep.val_cosine_before, rep.val_cosine_after) == (0.9, 0.8)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    rep = recover(m, model, tok, LINES, steps=3, batch_size=16, lr=1e-2, guard=False)
    assert rep.kept and rep.val_cosine_before is None
    assert not all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_split_validation_holds_back_a_tenth():
    from sparseq.compress.recovery import split_validation

    train, val = split_validation([f"l{i}" for i in range(100)])
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert split_validation(["a"] * 5) == (["a"] * 5, [])
    assert len(split_validation([f"l{i}" for i in range(10000)])[1]) == 256


def test_layered_loss_averages_layers_and_is_zero_at_the_teacher():
    from sparseq.compress.recovery import layered_distill_loss

    torch.manual_seed(0)
    t = [torch.randn(2, 5, 8) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.long)
    loss, cos = layered_distill_loss(t, t, mask)
    assert abs(float(loss)) < 1e-6 and abs(cos - 1.0) < 1e-6
    s = [t[0], -t[1], t[2]]  # one of three layers exactly opposite: token term (0 + 2 + 0) / 3
    loss, _ = layered_distill_loss(s, t, mask)
    assert abs(float(loss) - 2.0 / 3.0) < 1e-5


def test_recovery_rejects_bad_arguments(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    compress_model(m, tok, LINES, "2:4", "magnitude")
    with pytest.raises(ValueError, match="layers"):
        recover(m, model, tok, LINES, steps=1, layers="some")
    with pytest.raises(ValueError, match="activations"):
        compress_model(copy.deepcopy(model), tok, LINES, "w8a8", activations="per-tensor")
    with pytest.raises(ValueError, match="no lines"):
        recover(m, model, tok, [], steps=1)
    with pytest.raises(ValueError, match="no compressed"):
        recover(copy.deepcopy(model), model, tok, LINES, steps=1)


def test_lora_recovery_merges_back(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    compress_model(m, tok, LINES, "2:4", "magnitude")
    recover(m, model, tok, LINES, steps=5, batch_size=8, lora_rank=4)
    for x in m.modules():
        if isinstance(x, SimulatedLinear):
            assert x.lora_a is None and reference.is_24_sparse(x.pruned_weight())


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_export_swap_save_load_matches_simulation(tiny, tmp_path, activations):
    sparseq = pytest.importorskip("sparseq")
    pytest.importorskip("sparseq.nn")
    from sparseq.compress.export import to_kernel_layers

    model, tok = tiny
    m = copy.deepcopy(model)
    compress_model(m, tok, LINES, "2:4+w8a8", "sparsegpt", activations=activations)
    sims = [x for x in m.modules() if isinstance(x, SimulatedLinear)]
    assert all((x.act_amax is not None) == (activations == "static") for x in sims)
    b = batches_by_length(tok, EVAL, 16)
    sim_emb = embed(m, b)
    report, recipe = to_kernel_layers(m)
    assert len(report.swapped) == 12 and set(recipe.values()) == {"2:4+w8a8"}
    layers = [x for x in m.modules() if hasattr(x, "x_scale")]
    assert len(layers) == 12 and all((x.x_scale is not None) == (activations == "static") for x in layers)
    sparseq.save(m, tmp_path, recipe=recipe)
    loaded = sparseq.load(copy.deepcopy(model), tmp_path)
    assert compare(sim_emb, embed(loaded, b)).cosine > 0.9999


def test_planner_meets_the_budget_when_measured_and_writes_a_frontier(tiny, tmp_path):
    from sparseq.compress.planner import frontier_png, plan

    model, tok = tiny
    p = plan(model, tok, LINES, EVAL, formats=("2:4", "w8a8", "2:4+w8a8"), budget=0.02, method="magnitude")
    assert set(p.formats) == set(p.sensitivity) == set(p.layer_loss) and len(p.formats) == 12
    assert all(v >= 0 for losses in p.layer_loss.values() for v in losses.values())
    assert 1.0 - p.measured_cosine <= 0.02 and p.speedup >= 1.0  # the measured loss, not the estimate
    assert p.frontier[0] == (1.0, 1.0) and all(b[0] >= a[0] for a, b in zip(p.frontier, p.frontier[1:]))
    assert p.checked and p.speedup <= p.greedy_speedup + 1e-9
    frontier_png(p, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_greedy_takes_free_upgrades_and_never_an_unaffordable_one():
    from sparseq.compress.planner import greedy

    losses = {"a": {"w8a8": 0.0, "2:4": 1.0}, "b": {"w8a8": 0.0, "2:4": 1.0}}
    chosen, loss, frontier, path = greedy(losses, {"a": (64, 64), "b": (64, 64)}, budget=0.5)
    assert chosen == {"a": "w8a8", "b": "w8a8"} and loss == 0.0
    assert path[0] == {"a": "dense", "b": "dense"} and path[-1] == chosen and len(frontier) == len(path)


@pytest.mark.parametrize("true_losses,expected", [([0, .1, .2, .3, .4], 4), ([0, .1, .2, .3, .9], 3),
                                                  ([0, .6, .7, .8, .9], 0), ([0, .2, .5, .6, .9], 2)])
def test_back_off_finds_the_furthest_plan_within_budget(true_losses, expected):
    from sparseq.compress.planner import back_off

    calls = []

    def measure(i):
        calls.append(i)
        return true_losses[i]

    idx, checked = back_off(len(true_losses), 0.5, measure)
    assert idx == expected and checked[idx] <= 0.5 and len(calls) <= 3
    assert all(checked[i] == true_losses[i] for i in calls)


def _toy_model(first="2:4", second="w8a8"):
    """Three Linears of N*K = 4096, 8192, 8192: two simulated in ``first`` / ``second``, one dense."""
    torch.manual_seed(0)
    return torch.nn.Sequential(SimulatedLinear(torch.nn.Linear(64, 64), first),
                               SimulatedLinear(torch.nn.Linear(64, 128), second),
                               torch.nn.Linear(128, 64))


def test_modelled_speedup_is_the_per_layer_speed_model(monkeypatch):
    """As documented (planner step 2): model time = sum over Linears of N * K / the layer's
    speedup (tabled per format; no kernel or a slower one counts 1.0), and the modelled
    speedup is dense time / model time. Hand computations on a toy model, with the table
    entries set here so the result follows them, not the shipped numbers."""
    from sparseq.compress import planner
    from sparseq.compress.schedule import modelled_speedup

    monkeypatch.setitem(planner.TABLED_SPEEDUP, "2:4", 2.0)
    monkeypatch.setitem(planner.TABLED_SPEEDUP, "w8a8", 4.0)
    dense_time = 4096 + 8192 + 8192
    assert modelled_speedup(_toy_model()) == pytest.approx(dense_time / (4096 / 2 + 8192 / 4 + 8192))  # 5/3
    monkeypatch.setitem(planner.TABLED_SPEEDUP, "2:4", 4.0)  # one entry changes, the result follows
    assert modelled_speedup(_toy_model()) == pytest.approx(dense_time / (4096 / 4 + 8192 / 4 + 8192))  # 20/11
    monkeypatch.setitem(planner.TABLED_SPEEDUP, "w8a8", 0.5)  # a slower kernel: sparseq runs dense there
    assert modelled_speedup(_toy_model()) == pytest.approx(dense_time / (4096 / 4 + 8192 + 8192))  # 10/9
    # weighting is by N * K: the same formats on the two bigger layers save more
    monkeypatch.setitem(planner.TABLED_SPEEDUP, "w8a8", 4.0)
    assert modelled_speedup(_toy_model("50%", "w8a8")) == pytest.approx(dense_time / (4096 + 8192 / 4 + 8192))  # 10/7
    assert modelled_speedup(_toy_model("w8a8", "50%")) == pytest.approx(dense_time / (4096 / 4 + 8192 + 8192))  # 20/17
    assert modelled_speedup(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())) == 1.0


def test_planner_speed_uses_measured_speedups_over_the_table(tmp_path, monkeypatch):
    """The planner's frontier speedups under the same model, with a measured ops.csv entry
    for one shape (the best at M <= 16) overriding the table."""
    from sparseq.compress import planner

    monkeypatch.setitem(planner.TABLED_SPEEDUP, "2:4", 2.0)
    csv = tmp_path / "ops.csv"
    csv.write_text("format,N,K,M,speedup\n2:4,64,64,1,3.0\n2:4,64,64,16,2.5\n2:4,64,64,64,9.0\n"
                   "2:4,128,64,1,0.7\n")
    measured = planner.load_speedups(str(csv))
    assert measured == {("2:4", 64, 64): 3.0, ("2:4", 128, 64): 0.7}
    assert planner.layer_speedup("2:4", (64, 64), measured) == 3.0
    assert planner.layer_speedup("2:4", (128, 64), measured) == 1.0  # measured slower: runs dense
    assert planner.layer_speedup("2:4", (64, 128), measured) == 2.0  # not measured: tabled
    shapes = {"a": (64, 64), "b": (64, 128)}
    losses = {"a": {"2:4": 0.1}, "b": {"2:4": 0.1}}
    chosen, loss, frontier, path = planner.greedy(losses, shapes, budget=1.0, measured=measured)
    assert chosen == {"a": "2:4", "b": "2:4"} and loss == pytest.approx(0.2)
    dense_time = 4096 + 8192
    # b first (saves 8192 - 4096 = 4096 of time vs a's 4096 - 4096 / 3), then a
    assert path[1] == {"a": "dense", "b": "2:4"}
    assert frontier[1][0] == pytest.approx(dense_time / (4096 + 8192 / 2))  # 1.5
    assert frontier[2][0] == pytest.approx(dense_time / (4096 / 3 + 8192 / 2))  # 2.25


def _schedule(tiny, steps, floor=None):
    from sparseq.compress.schedule import compress_in_steps

    model, tok = tiny
    m = copy.deepcopy(model)
    b = batches_by_length(tok, EVAL, 16)
    done, result, _ = compress_in_steps(m, model, tok, LINES, b, embed(model, b), steps, "magnitude", floor=floor,
                                        say=lambda *_: None)
    return m, done, result


def test_schedule_steps_grow_sparsity_and_report_each_step(tiny, monkeypatch):
    from sparseq.compress import planner
    from sparseq.compress.schedule import modelled_speedup, steps_table

    monkeypatch.setitem(planner.TABLED_SPEEDUP, "2:4", 2.5)  # not the shipped entry: the steps must follow it
    m, done, result = _schedule(tiny, ["25%", "50%", "2:4"])
    assert [s.recipe for s in done] == ["25%", "50%", "2:4"] and all(s.kept for s in done)
    assert done[0].oneshot.cosine > done[1].oneshot.cosine > done[2].oneshot.cosine
    assert done[0].linear_bytes > done[1].linear_bytes
    # unstructured sparsity has no kernels (dense speed); every Linear in 2:4 runs at the 2:4 entry
    assert done[0].modelled_speedup == done[1].modelled_speedup == 1.0
    assert done[2].modelled_speedup == pytest.approx(2.5) == modelled_speedup(m)
    sims = [x for x in m.modules() if isinstance(x, SimulatedLinear)]
    assert all(str(x.format) == "2:4" and reference.is_24_sparse(x.pruned_weight()) for x in sims)
    assert len(result.layers) == 12
    table = steps_table(done, 1e6)
    assert "2:4" in table and "modelled" in table and len(table.splitlines()) == 6


def test_schedule_floor_undoes_the_step_that_costs_too_much(tiny):
    _, done, _ = _schedule(tiny, ["25%", "50%", "2:4"])
    floor = (done[1].oneshot.cosine + done[2].oneshot.cosine) / 2  # between step 2 and step 3
    m, done2, result = _schedule(tiny, ["25%", "50%", "2:4"], floor=floor)
    assert [s.kept for s in done2] == [True, True, False]
    sims = [x for x in m.modules() if isinstance(x, SimulatedLinear)]
    assert sims and all(str(x.format) == "50%" for x in sims)  # back at step 2
    assert {r.format for r in result.layers} == {"50%"}
    b = batches_by_length(tiny[1], EVAL, 16)
    assert compare(embed(tiny[0], b), embed(m, b)).cosine == pytest.approx(done2[1].oneshot.cosine, abs=1e-6)
    with pytest.raises(ValueError, match="first step"):
        _schedule(tiny, ["2:4", "50%"], floor=0.9999)
    with pytest.raises(ValueError, match="no steps"):
        _schedule(tiny, [])


def test_schedule_step_may_not_undo_compression_and_keeps_old_zeros(tiny):
    m, done, _ = _schedule(tiny, ["50%", "2:4"])
    for x in m.modules():
        if isinstance(x, SimulatedLinear):
            assert reference.is_24_sparse(x.pruned_weight()) and float((~x.mask).float().mean()) >= 0.5
    with pytest.raises(ValueError, match="undo sparsity"):
        _schedule(tiny, ["2:4", "w8a8"])
