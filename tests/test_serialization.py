"""save/load: safetensors + manifest, no pickle, meta-device construction, clear errors."""
import json

import pytest
import torch
from torch import nn

import sparseq
from sparseq import serialization


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 8))


def swapped():
    model = tiny_model()
    sparseq.swap(model, {"0": "2:4+w8a8", "2": "int8_weight_only", "3": "2:4"}, prune="magnitude")
    return model


def test_round_trip_plain_module(tmp_path):
    model = swapped()
    x = torch.randn(3, 64)
    sparseq.save(model, tmp_path)
    manifest = json.loads((tmp_path / "sparseq.json").read_text())
    assert manifest["sparseq_format_version"] == sparseq.FORMAT_VERSION
    assert manifest["layers"]["0"]["format"] == "2:4+w8a8"
    loaded = sparseq.load(tiny_model(), tmp_path)
    assert isinstance(loaded[0], sparseq.Sparse24Int8Linear)
    assert torch.equal(loaded(x), model(x))


def test_load_never_builds_dense_weights_of_compressed_layers(tmp_path, monkeypatch):
    sparseq.save(swapped(), tmp_path)
    built = []
    orig = serialization._empty_layer

    def spy(name, spec):
        layer = orig(name, spec)
        built.append([t.device.type for t in layer.buffers()])
        return layer

    monkeypatch.setattr(serialization, "_empty_layer", spy)
    monkeypatch.setattr(sparseq.nn.CompressedLinear, "dense_weight", lambda self, *a: pytest.fail("dense weight built"))
    loaded = sparseq.load(tiny_model(), tmp_path)
    assert len(built) == 3 and all(set(devs) == {"meta"} for devs in built)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory written by sparseq.save"):
        sparseq.load(tiny_model(), tmp_path)
    sparseq.save(swapped(), tmp_path)
    manifest = json.loads((tmp_path / "sparseq.json").read_text())

    bad = dict(manifest, sparseq_format_version=99)
    (tmp_path / "sparseq.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        sparseq.load(tiny_model(), tmp_path)

    (tmp_path / "sparseq.json").write_text(json.dumps(manifest))
    wrong = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 24), nn.Linear(24, 8))
    with pytest.raises(ValueError, match="layer '2': saved shape 16x32 does not match"):
        sparseq.load(wrong, tmp_path)

    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    target = tiny_model()
    before = target[0].weight.clone()
    with pytest.raises(ValueError, match="missing or corrupt"):
        sparseq.load(target, tmp_path)
    assert type(target[0]) is nn.Linear and torch.equal(target[0].weight, before)  # untouched


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    sparseq.save(swapped(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["3.meta"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing from the saved file: layer .3., tensor .meta."):
        sparseq.load(tiny_model(), tmp_path)


def test_no_pickle_files(tmp_path):
    sparseq.save(swapped(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "sparseq.json"]


@pytest.mark.slow
def test_transformers_minilm_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from sparseq.compress.data import load_model

    model, tokenizer = load_model()
    batch = tokenizer(["To be, or not to be", "All the world's a stage"], return_tensors="pt", padding=True)
    dense_out = model(**batch).last_hidden_state
    report = sparseq.swap(model, {"*attention*": "w8a8", "*": "2:4+w8a8"}, prune="magnitude")
    assert len(report.swapped) == 36
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    sparseq.save(model, tmp_path)
    assert (tmp_path / "config.json").exists()
    loaded = sparseq.load(tmp_path)
    with torch.no_grad():
        got = loaded(**batch).last_hidden_state
    assert torch.equal(got, expected)
    assert not torch.equal(got, dense_out)  # it really is the compressed model
    assert isinstance(loaded.encoder.layer[0].attention.self.query, sparseq.Int8Linear)


@pytest.mark.parametrize("text, match", [
    ("{not json", "is corrupt"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"sparseq_format_version": sparseq.FORMAT_VERSION, "model": {}}), "'layers' missing"),
])
def test_corrupt_manifest(tmp_path, text, match):
    sparseq.save(swapped(), tmp_path)
    (tmp_path / "sparseq.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        sparseq.load(tiny_model(), tmp_path)


def test_bad_layer_spec_and_tensor_shape_dtype_name_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    sparseq.save(swapped(), tmp_path)
    manifest_file, weights = tmp_path / "sparseq.json", tmp_path / "model.safetensors"
    good = json.loads(manifest_file.read_text())
    bad = json.loads(manifest_file.read_text())
    del bad["layers"]["2"]["dtype"]
    manifest_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"layer '2' lacks \['dtype'\]"):
        sparseq.load(tiny_model(), tmp_path)
    bad["layers"]["2"] = dict(good["layers"]["2"], format="3:8")
    manifest_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="layer '2': unknown format '3:8'"):
        sparseq.load(tiny_model(), tmp_path)
    manifest_file.write_text(json.dumps(good))

    tensors = load_file(str(weights))
    saved = dict(tensors)
    tensors["3.values"] = tensors["3.values"][:, :2].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"layer '3', tensor 'values': saved shape \(8, 2\) != expected \(8, 8\)"):
        sparseq.load(tiny_model(), tmp_path)
    tensors = dict(saved, **{"3.meta": saved["3.meta"].to(torch.int8)})
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="layer '3', tensor 'meta': saved dtype torch.int8"):
        sparseq.load(tiny_model(), tmp_path)


def test_tied_weights_and_meta_constructed_target(tmp_path):
    def build():
        emb = nn.Embedding(16, 32)
        head = nn.Linear(32, 16, bias=False)
        head.weight = emb.weight
        return nn.ModuleDict({"emb": emb, "fc": nn.Linear(32, 32), "head": head})

    model = build()
    sparseq.swap(model, "2:4", prune="magnitude")
    sparseq.save(model, tmp_path)
    assert json.loads((tmp_path / "sparseq.json").read_text())["aliases"] == {"head.weight": "emb.weight"}
    with torch.device("meta"):
        target = build()  # no dense weights allocated at all
    loaded = sparseq.load(target, tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    run = lambda m: m["head"](m["fc"](m["emb"](ids)))  # noqa: E731
    assert torch.equal(run(loaded), run(model))
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_transformers_task_model_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(config).eval()
    report = sparseq.swap(model, {"*.intermediate.dense": "2:4+w8a8", "*": "int8_weight_only"}, prune="magnitude")
    assert "tied" in {r.name: r.note for r in report.rows}["cls.predictions.decoder"]
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    sparseq.save(model, tmp_path, recipe="test")
    loaded = sparseq.load(tmp_path)
    assert type(loaded) is transformers.BertForMaskedLM
    assert isinstance(loaded.bert.encoder.layer[1].intermediate.dense, sparseq.Sparse24Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
