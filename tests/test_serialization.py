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
    monkeypatch.setattr(sparseq.nn.CompressedLinear, "dense_weight", lambda self: pytest.fail("dense weight built"))
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
    with pytest.raises(ValueError, match=r"missing tensors in the saved file: \['3.meta'\]"):
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
