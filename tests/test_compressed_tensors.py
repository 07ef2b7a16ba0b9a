"""Import of llm-compressor / compressed-tensors checkpoints into sparseq layers, and export back:
the fixtures are the bundled Shakespeare Llama written by compressed-tensors 0.14.0.1 itself
(tests/fixtures/compressed_tensors/make_fixtures.py), with what compressed-tensors decompresses
from them recorded in each folder's reference.json."""
import functools
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import sparseq
from sparseq.testing import assert_layer_close
from sparseq.integrations import compressed_tensors as ct

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "compressed_tensors"
EXPECTED = {"sparse24_bf16": "2:4", "sparse24_w8a8": "2:4+w8a8", "w8a8": "w8a8", "w8a16": "int8_weight_only"}


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, sparseq.nn.CompressedLinear)}


def _digest(t: torch.Tensor) -> dict:
    """dtype, shape and SHA-256 of the bytes, as make_fixtures.py records compressed-tensors' tensors."""
    t = t.detach().contiguous()
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "sha256": hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()}


def _as_compressed_tensors_decompresses(layer) -> torch.Tensor:
    """The weight of a sparseq layer in the form compressed-tensors' ``from_pretrained`` gives it:
    the int8 values of a dense int8 layer, ``q * s`` in the model dtype for 2:4 + int8 (its
    decompressor dequantizes), the dense weight of a 2:4 layer."""
    if layer.FORMAT in ("w8a8", "int8_weight_only"):
        return layer.weight_q
    if "w_scale" in layer._buffers:
        q = sparseq.decompress_24(layer.values, layer.meta)
        return (q.float() * layer.w_scale[:, None]).to(layer.dtype)
    return layer.dense_weight()


@functools.lru_cache(maxsize=None)
def _loaded(name):
    """The fixture loaded once per test run, for tests that only read it."""
    return sparseq.load(FIXTURES / name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_import_is_bit_exact(name):
    """Every layer of the bundled Llama as compressed-tensors 0.14.0.1 wrote it loads into the
    sparseq layer whose weight (and scale) is bit for bit what compressed-tensors decompresses."""
    model = _loaded(name)
    reference = json.loads((FIXTURES / name / "reference.json").read_text())
    layers = _layers(model)
    assert sorted(layers) == sorted(reference["layers"]) and len(layers) == 28
    assert {m.FORMAT for m in layers.values()} == {EXPECTED[name]}
    assert type(model.lm_head) is torch.nn.Linear  # not in the checkpoint's targets: stays dense
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the bundled Llama
    for layer_name, layer in layers.items():
        want = reference["layers"][layer_name]
        assert _digest(_as_compressed_tensors_decompresses(layer)) == want["weight"], layer_name
        if "weight_scale" in want:  # stored in bf16 [N, 1]; sparseq keeps it exactly, in fp32 [N]
            scale = layer.w_scale.to(getattr(torch, want["weight_scale"]["dtype"]))
            assert torch.equal(scale.float(), layer.w_scale), layer_name
            assert _digest(scale.reshape(want["weight_scale"]["shape"])) == want["weight_scale"], layer_name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_imported_model_generates_compressed_tensors_tokens(name):
    """Greedy tokens of the imported model equal those compressed-tensors' own model generated
    (transformers 4.57, torch 2.13). Same arithmetic for 2:4 and weight-only; for W8A8
    compressed-tensors fake-quantizes activations on a 255-level grid, sparseq on 254 levels,
    so equal tokens there say the difference stays below the greedy margins of this prompt.
    One forward over prompt + tokens: greedy decoding makes those tokens exactly when each
    position's argmax is the next token."""
    reference = json.loads((FIXTURES / name / "reference.json").read_text())
    prompt, want = reference["prompt"], reference["greedy_tokens"]
    with torch.no_grad():
        logits = _loaded(name)(torch.tensor([prompt + want[:-1]])).logits[0]
    assert logits[len(prompt) - 1:].argmax(dim=-1).tolist() == want


def test_imported_model_runs_and_round_trips(tmp_path):
    model = _loaded("sparse24_w8a8")
    ids = torch.tensor([[1, 408, 307, 14, 501]])
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 9) and torch.isfinite(logits).all()
    for layer in _layers(model).values():
        assert_layer_close(layer, torch.randn(3, layer.in_features, dtype=layer.dtype),
                                           dense_fallback=True)
    sparseq.save(model, tmp_path)
    assert not ct.is_checkpoint(tmp_path) and (tmp_path / "sparseq.json").is_file()  # sparseq's own format
    again = sparseq.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def _copy(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _edit_config(path, edit):
    file = path / "config.json"
    config = json.loads(file.read_text())
    edit(config["quantization_config"])
    file.write_text(json.dumps(config))


def _group(qc):
    return qc["config_groups"]["group_0"]


@pytest.mark.parametrize("name, edit, match", [
    ("sparse24_bf16", lambda qc: qc["sparsity_config"].update(format="sparse-bitmask"),
     r"sparsity_config.format = 'sparse-bitmask' is not supported"),
    ("sparse24_bf16", lambda qc: qc["sparsity_config"].update(sparsity_structure="unstructured"),
     r"sparsity_config.sparsity_structure = 'unstructured'"),
    ("w8a8", lambda qc: _group(qc)["weights"].update(strategy="group", group_size=32),
     r"config_groups.group_0.weights.strategy = 'group' is not supported"),
    ("w8a8", lambda qc: _group(qc)["weights"].update(symmetric=False),
     r"config_groups.group_0.weights.symmetric = False"),
    ("w8a8", lambda qc: _group(qc)["weights"].update(num_bits=4), r"weights.num_bits = 4"),
    ("w8a8", lambda qc: _group(qc)["input_activations"].update(symmetric=False),
     r"input_activations.symmetric = False"),
    ("w8a8", lambda qc: qc.update(format="pack-quantized"), r"quantization_config.format = 'pack-quantized'"),
    ("w8a8", lambda qc: _group(qc)["input_activations"].update(strategy="tensor"),
     r"input_activations.dynamic = True is not supported"),
])
def test_unsupported_configs_name_the_field(tmp_path, name, edit, match):
    path = _copy(tmp_path, name)
    _edit_config(path, edit)
    with pytest.raises(ValueError, match=match):
        sparseq.load(path)


def test_bad_bitmask_names_the_layer(tmp_path):
    path = _copy(tmp_path, "sparse24_bf16")
    tensors = load_file(str(path / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.bitmask"
    tensors[key] = tensors[key].clone()
    tensors[key][3, 0] = 0x07  # three columns of group 0 kept, one of group 1
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.up_proj': bitmask row 3 keeps"):
        sparseq.load(path)
    tensors[key][3, 0] = 0x77  # three in both groups: the count per row still adds up
    tensors[key][3, 1] = 0x11
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.*not 2:4 sparse: row 3, group 0"):
        sparseq.load(path)


def test_load_with_a_model_is_refused_and_plain_dirs_are_not_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="load it with sparseq.load\\(path\\)"):
        sparseq.load(torch.nn.Linear(2, 2), FIXTURES / "w8a8")
    assert not ct.is_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not ct.is_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", ["w8a8", "w8a16"])
def test_export_writes_what_compressed_tensors_wrote(tmp_path, name):
    """compressed-tensors -> sparseq -> compressed-tensors gives back the same tensors, bit for bit."""
    model = _loaded(name)
    sparseq.save(model, tmp_path, format="compressed-tensors")
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    written = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for key, t in original.items():
        assert written[key].dtype == t.dtype and torch.equal(written[key], t), key
    want = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    got = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "format", "quantization_status", "ignore"):
        assert got[key] == want[key], key
    for part in ("weights", "input_activations"):
        a, b = got["config_groups"]["group_0"][part], want["config_groups"]["group_0"][part]
        assert (a is None) == (b is None)
        if a is not None:
            assert {k: a[k] for k in a if k != "observer"} == {k: b[k] for k in b if k != "observer"}
    again = sparseq.load(tmp_path)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_export_of_a_sparseq_quantized_model_keeps_fp32_scales(tmp_path):
    model = sparseq.load(FIXTURES / "sparse24_bf16")  # a bf16 model with 2:4 layers
    with pytest.raises(ValueError, match="format '2:4' has no compressed-tensors export"):
        sparseq.save(model, tmp_path, format="compressed-tensors")
    for name, layer in list(model.named_modules()):
        if isinstance(layer, sparseq.nn.CompressedLinear):
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=torch.bfloat16)
            dense.weight.data = layer.dense_weight()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    sparseq.swap(model, {"lm_head": "dense", "*": "int8_weight_only"})
    sparseq.save(model, tmp_path, format="compressed-tensors")
    written = load_file(str(tmp_path / "model.safetensors"))
    scales = [t for k, t in written.items() if k.endswith("weight_scale")]
    assert len(scales) == 28 and {t.dtype for t in scales} == {torch.float32}  # not exact in bf16
    again = sparseq.load(tmp_path)
    ids = torch.tensor([[2, 7, 1, 8]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="format must be 'sparseq' or 'compressed-tensors'"):
        sparseq.save(model, tmp_path, format="gguf")
