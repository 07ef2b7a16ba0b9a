"""transformers integration (issue 16 item 5): ``import sparseq`` registers quant method
``sparseq`` lazily; ``AutoModelForCausalLM.from_pretrained`` of a ``sparseq.save`` directory
builds sparseq layers and gives the logits and greedy tokens of ``sparseq.load`` bit for bit,
with tied embeddings; ``save_pretrained`` writes the same tensors back, which ``sparseq.load``
and ``from_pretrained`` read; loading stays below the dense model's size (measured in a
subprocess); bad configs and buffers are refused naming the layer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparseq

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from sparseq.integrations.serving import parse_manifest  # noqa: E402
from sparseq.models import load_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["To be, or not to be", "My lord, the king"]
RECIPES = {
    "2:4": "2:4",
    "w8a8": "w8a8",
    "int8_weight_only": "int8_weight_only",
    "2:4+w8a8": "2:4+w8a8",
    "2:4+int8_weight_only": "2:4+int8_weight_only",
    # mixed, with SmoothQuant factors and a static activation scale on one layer
    "mixed": {"*.q_proj": "w8a8", "*.k_proj": "2:4", "*mlp*": "2:4+w8a8", "*": "int8_weight_only"},
}
DENSE_HEAD = {"lm_head": "dense"}  # tied to the embeddings: swap keeps it dense anyway


def _run(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(ROOT))


def _save(tmp: Path, name: str) -> Path:
    torch.manual_seed(0)
    model, _ = load_llama()
    recipe = RECIPES[name]
    recipe = {**DENSE_HEAD, **recipe} if isinstance(recipe, dict) else {**DENSE_HEAD, "*": recipe}
    kw = {}
    if name == "mixed":
        q = "model.layers.0.self_attn.q_proj"
        kw = {"smooth": {q: torch.rand(256) + 0.5}, "act_amax": {q: 4.0}}
    sparseq.swap(model, recipe, prune="magnitude", **kw)
    return sparseq.save(model.eval(), tmp / name)


def _generate(model, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:]


def _logits(model, tokenizer):
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tokenizer():
    return load_llama()[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return {name: _save(tmp, name) for name in RECIPES}


def test_import_sparseq_registers_without_importing_transformers():
    code = ("import sys, sparseq\n"
            "assert 'transformers' not in sys.modules, 'import sparseq imported transformers'\n"
            "from transformers.quantizers import auto\n"
            "print(auto.AUTO_QUANTIZER_MAPPING['sparseq'].__name__, auto.AUTO_QUANTIZATION_CONFIG_MAPPING['sparseq'].__name__)\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SparseqHfQuantizer", "SparseqHfConfig"]


def test_registers_when_transformers_was_imported_first():
    code = ("from transformers.quantizers import auto\n"
            "assert 'sparseq' not in auto.AUTO_QUANTIZER_MAPPING\n"
            "import sparseq\n"
            "print(auto.AUTO_QUANTIZER_MAPPING['sparseq'].__name__)\n"
            "from sparseq.integrations import transformers as hf\n"
            "hf.register(); hf.register()  # idempotent\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SparseqHfQuantizer"]


def test_config_json_carries_the_layer_specs_vllm_reads(saved):
    for path in saved.values():
        config = json.loads((path / "config.json").read_text())
        manifest = json.loads((path / "sparseq.json").read_text())
        qc = config["quantization_config"]
        assert qc["quant_method"] == "sparseq"
        assert parse_manifest(qc) == parse_manifest(manifest)  # what vLLM's SparseqConfig.from_config reads
        assert len(qc["layers"]) == 28


@pytest.mark.parametrize("name", list(RECIPES))
def test_from_pretrained_equals_sparseq_load(name, saved, tokenizer):
    path = saved[name]
    ref = sparseq.load(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    manifest = json.loads((path / "sparseq.json").read_text())
    for layer, spec in manifest["layers"].items():
        got = model.get_submodule(layer)
        assert isinstance(got, sparseq.nn.CompressedLinear) and got.FORMAT == spec["format"], layer
        assert got.options() == spec["options"], layer
        for buf, t in ref.get_submodule(layer).named_buffers():
            mine = getattr(got, buf)
            assert mine.dtype == t.dtype and torch.equal(mine, t), f"{layer}.{buf}"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(_logits(model, tokenizer), _logits(ref, tokenizer))
    assert torch.equal(_generate(model, tokenizer), _generate(ref, tokenizer))


def test_save_pretrained_round_trips_bit_identically(saved, tokenizer, tmp_path):
    path = saved["mixed"]
    model = AutoModelForCausalLM.from_pretrained(path)
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(path / "model.safetensors"))
    # sparseq.save also keeps non-persistent buffers (rotary inv_freq), which transformers recomputes
    assert set(mine) == {k for k in theirs if not k.startswith("__nonpersistent__.")}
    for key, t in mine.items():
        assert t.dtype == theirs[key].dtype and torch.equal(t, theirs[key]), key
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((path / "config.json").read_text())["quantization_config"]
    expected = _logits(sparseq.load(path), tokenizer)
    for reloaded in (sparseq.load(out), AutoModelForCausalLM.from_pretrained(out)):
        assert isinstance(reloaded.model.layers[0].self_attn.q_proj, sparseq.nn.CompressedLinear)
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        assert torch.equal(_logits(reloaded, tokenizer), expected)
    with pytest.raises(ValueError, match="save_pretrained"):
        sparseq.load(load_llama()[0], out)
    again = sparseq.save(model, tmp_path / "sparseq-again")  # sparseq.save of a from_pretrained model
    assert load_file(str(again / "model.safetensors")).keys() == theirs.keys()
    for key, t in load_file(str(again / "model.safetensors")).items():
        assert torch.equal(t, theirs[key]), key
    assert json.loads((again / "config.json").read_text())["quantization_config"] == \
        json.loads((path / "config.json").read_text())["quantization_config"]


def _edit_config(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda qc: qc["layers"]["model.layers.1.mlp.up_proj"].update(format="3:4"), "model.layers.1.mlp.up_proj"),
    (lambda qc: qc["layers"]["model.layers.0.self_attn.k_proj"].update(in_features=512),
     "model.layers.0.self_attn.k_proj"),
    (lambda qc: qc["layers"].update({"model.layers.0.nope": qc["layers"]["model.layers.0.mlp.up_proj"]}),
     "model.layers.0.nope"),
    (lambda qc: qc.update(sparseq_format_version=99), "format version 99"),
    (lambda qc: qc.update(group_size=128), "group_size"),
])
def test_bad_quantization_config_is_refused_naming_the_field(edit, match, saved, tmp_path):
    bad = _edit_config(saved["mixed"], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("change, match", [
    ("bad codes", r"model\.layers\.2\.mlp\.down_proj.*meta"),
    ("missing", r"model\.layers\.2\.mlp\.down_proj.*\['meta'\] missing"),
])
def test_bad_or_missing_buffer_is_refused_naming_the_layer(change, match, saved, tmp_path):
    from safetensors.torch import save_file

    bad = _edit_config(saved["2:4"], tmp_path / "bad", lambda qc: None)
    tensors = load_file(str(bad / "model.safetensors"))
    key = "model.layers.2.mlp.down_proj.meta"
    if change == "missing":  # transformers alone would leave it uninitialized, with a warning
        del tensors[key]
    else:
        tensors[key] = torch.full_like(tensors[key], 0xFF)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def test_without_import_sparseq_transformers_warns_and_loads_dense_random_layers(saved):
    """transformers 5.x has no hook for an unknown quant method: it logs a warning and loads the
    architecture dense, leaving the compressed layers' weights randomly initialized (documented
    in the README). This pins that behaviour, so a change in transformers shows up here."""
    code = ("import sys\n"
            "from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "assert 'sparseq' not in sys.modules\n"
            "print('LINEAR', type(m.model.layers[0].mlp.up_proj).__name__)\n")
    out = _run(code, str(saved["2:4"]))
    assert out.returncode == 0, out.stderr
    assert "LINEAR Linear" in out.stdout
    assert "Unknown quantization type, got sparseq" in out.stderr
    assert "MISSING" in out.stderr and "mlp.up_proj.weight" in out.stderr


_MEMORY = r"""
import sys, time, torch, sparseq
from sparseq.nn import CompressedLinear
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
import transformers.models.llama.modeling_llama  # imported before the baseline
path, mode = sys.argv[1], sys.argv[2]
if mode == "save":
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=3072, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path + "-dense")  # the control: the same model, not compressed
    sparseq.swap(model, {"lm_head": "dense", "*": "2:4+w8a8"}, prune="magnitude")
    sparseq.save(model, path)
    print("DENSE", dense)
else:
    def status(field):  # bytes of a /proc/self/status field (kB there)
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set: the imports' peak is gone
    before = status("VmRSS")
    assert status("VmHWM") < before + 2**20, "peak RSS not reset"
    t = time.perf_counter()
    if mode == "sparseq.load":
        model = sparseq.load(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path + ("-dense" if mode == "dense" else ""))
    seconds = time.perf_counter() - t
    tensors = list(model.parameters()) + list(model.buffers())
    for x in tensors:  # read every byte: tensors still backed by the mmapped file become resident
        if x.numel():
            x.detach().reshape(-1).view(torch.uint8).amax()  # no temporary copy of x
    peak = status("VmHWM") - before
    compressed = isinstance(model.model.layers[0].mlp.up_proj, CompressedLinear)
    assert compressed == (mode != "dense"), mode
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print("PEAK", peak, "HELD", held, "SECONDS", round(seconds, 2))
"""


def test_from_pretrained_peak_memory_stays_below_the_dense_model(tmp_path, report_line):
    """A random 6-layer Llama (hidden 768, ~0.23 GB dense fp32) saved in 2:4+W8A8: loading it
    with from_pretrained, then reading every tensor, raises the process's peak RSS (Linux VmHWM,
    reset just before the load) by less than half the dense model's size: no dense weight of a
    compressed layer is materialized. Control: the same model saved dense raises it by more
    than 0.9x its size, so the measure sees dense bytes."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    path = str(tmp_path / "big")
    saved = _run(_MEMORY, path, "save")
    assert saved.returncode == 0, saved.stderr
    dense = int(saved.stdout.split()[saved.stdout.split().index("DENSE") + 1])
    peaks = {}
    for mode in ("from_pretrained", "sparseq.load", "dense"):
        out = _run(_MEMORY, path, mode)
        assert out.returncode == 0, out.stderr
        words = out.stdout.split()
        peaks[mode], held = int(words[words.index("PEAK") + 1]), int(words[words.index("HELD") + 1])
        report_line(f"{mode}: peak RSS +{peaks[mode] / 2**20:.1f} MiB, model tensors {held / 2**20:.1f} MiB, "
                    f"dense model {dense / 2**20:.1f} MiB ({words[words.index('SECONDS') + 1]} s)")
        if mode != "dense":
            assert held < dense / 4, (mode, held, dense)
    assert peaks["dense"] > 0.9 * dense  # the control: the measure sees a dense model's bytes
    assert peaks["from_pretrained"] < dense / 2, peaks
    assert peaks["sparseq.load"] < dense / 2, peaks


def test_embeddings_and_tied_head_stay_dense_with_a_reason_and_tied(saved):
    """Issue 16 item 6 on the bundled Llama (tied embeddings): the report lists the embedding
    and the tied lm_head as dense with their reasons; after from_pretrained they are one tensor."""
    model, _ = load_llama()
    report = sparseq.swap(model, "2:4", prune="magnitude")
    rows = {r.name: r for r in report.rows}
    assert rows["model.embed_tokens"].format == "dense" and rows["model.embed_tokens"].kind == "embedding"
    assert "embedding lookup" in rows["model.embed_tokens"].note
    assert rows["lm_head"].format == "dense" and "tied to 'model.embed_tokens'" in rows["lm_head"].note
    assert model.lm_head.weight is model.model.embed_tokens.weight
    text = str(report)
    assert "28 of 29 Linear layers swapped" in text and "embedding lookup" in text
    assert report.bytes_before == sum(r.bytes_before for r in report.rows if r.kind == "linear")


def test_untied_odd_vocabulary_head_is_compressed_and_loads(tmp_path):
    """An lm_head with an odd vocabulary (4099) is no obstacle: its K (hidden) is what 2:4 and
    int8 constrain, so it swaps like any Linear and from_pretrained loads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4099, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    report = sparseq.swap(model, {"lm_head": "w8a8", "*": "2:4"}, prune="magnitude")
    assert {r.name: r.format for r in report.rows}["lm_head"] == "w8a8"
    sparseq.save(model, tmp_path / "odd")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "odd")
    assert isinstance(loaded.lm_head, sparseq.Int8Linear) and loaded.lm_head.out_features == 4099
    ids = torch.tensor([[1, 5, 4098, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_pretrained_dtype_casts_the_layers_as_to_does(saved, tokenizer):
    """``from_pretrained(dir, dtype=torch.bfloat16)`` of an fp32 save: every sparseq layer is cast
    as ``.to(torch.bfloat16)`` casts it (scales stay fp32), the logits those of
    ``sparseq.load(dir).to(torch.bfloat16)`` (with transformers' fp32 rotary tables)."""
    path = saved["mixed"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ref = sparseq.load(path)
    rotary = ref.model.rotary_emb
    kept = {n: b for n, b in rotary.named_buffers()}  # transformers keeps rotary tables fp32
    ref.to(torch.bfloat16)
    for n, b in kept.items():
        setattr(rotary, n, b)
    for name, layer in model.named_modules():
        if isinstance(layer, sparseq.nn.CompressedLinear):
            assert layer.dtype == torch.bfloat16, name
            assert getattr(layer, "w_scale", torch.ones(1)).dtype == torch.float32, name
            for buf, t in ref.get_submodule(name).named_buffers():
                assert torch.equal(getattr(layer, buf), t), f"{name}.{buf}"
    assert torch.equal(_logits(model, tokenizer), _logits(ref, tokenizer))


def test_a_model_with_nothing_compressed_gets_no_quantization_config(saved, tmp_path):
    """A dense save stays a plain transformers folder (vLLM / SGLang load it unquantized), also
    when the model came from a sparseq folder (its config held the sparseq entry)."""
    dense, _ = load_llama()
    sparseq.save(dense, tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    model = sparseq.load(saved["w8a8"])
    for name, layer in list(model.named_modules()):
        if isinstance(layer, sparseq.nn.CompressedLinear):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.data = layer.dense_weight()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    assert "quant_method" in str(model.config.quantization_config)
    sparseq.save(model, tmp_path / "undone")
    assert "quantization_config" not in json.loads((tmp_path / "undone" / "config.json").read_text())
