"""Loads never trust the file: bad codes, scales and options are named, nothing half-loaded."""
import json

import pytest
import torch
from torch import nn

import sparseq
from sparseq.nn.layers import Int8Linear, Sparse24Int8Linear, Sparse24Linear


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 8), nn.Linear(8, 8))


def swapped():
    model = tiny_model()
    smooth = torch.rand(64) + 0.5
    model[0] = Sparse24Int8Linear.from_linear(model[0], prune="magnitude", smooth=smooth, act_amax=3.0)
    sparseq.swap(model, {"2": "int8_weight_only", "3": "2:4", "4": "w8a8"}, prune="magnitude")
    return model


def _edit_tensor(path, key, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    tensors[key] = edit(tensors[key].clone())
    save_file(tensors, str(path / "model.safetensors"))


def _expect_load_error(path, match, error=ValueError):
    target = tiny_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(error, match=match):
        sparseq.load(target, path)
    after = target.state_dict()  # nothing half-loaded: the given model is untouched
    assert type(target[0]) is nn.Linear and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _set_byte(value):
    def edit(meta):
        meta[1, 0] = value
        return meta
    return edit


@pytest.mark.parametrize("key, edit, match", [
    ("3.meta", _set_byte(0xFF), r"layer '3' \(Sparse24Linear\): meta is corrupt: row 1, group 0 .* code 0xf"),
    ("3.meta", _set_byte(0x55), r"layer '3' \(Sparse24Linear\): meta is corrupt: row 1, group 0 .* code 0x5"),
    ("0.meta", _set_byte(0xF4), r"layer '0' \(Sparse24Int8Linear\): meta is corrupt: row 1, group 1"),
    ("0.w_scale", lambda s: s.index_fill_(0, torch.tensor([3]), float("nan")),
     r"layer '0' .*w_scale contains NaN or Inf \(first at index 3\)"),
    ("2.w_scale", lambda s: s.index_fill_(0, torch.tensor([5]), 0.0), r"layer '2' .*w_scale must be > 0.*index 5"),
    ("4.w_scale", lambda s: -s, r"layer '4' .*w_scale must be > 0.*index 0"),
    ("0.smooth", lambda s: s.index_fill_(0, torch.tensor([7]), float("inf")), r"layer '0' .*smooth contains NaN"),
    ("0.smooth", lambda s: s.index_fill_(0, torch.tensor([2]), -1.0), r"layer '0' .*smooth must be > 0.*index 2"),
    ("0.x_scale", lambda s: s * 0, r"layer '0' .*x_scale must be > 0"),
    ("2.weight_q", lambda q: q.float(), r"layer '2', tensor 'weight_q': saved dtype torch.float32 != expected torch.int8"),
    ("3.values", lambda v: v.index_fill_(0, torch.tensor([2]), float("nan")), r"layer '3' .*values contains NaN"),
    ("3.bias", lambda b: b.index_fill_(0, torch.tensor([1]), float("-inf")), r"layer '3' .*bias contains NaN"),
])
def test_bad_values_are_named_and_nothing_is_loaded(tmp_path, key, edit, match):
    sparseq.save(swapped(), tmp_path)
    _edit_tensor(tmp_path, key, edit)
    _expect_load_error(tmp_path, match)


def _edit_layer(path, name, **changes):
    file = path / "sparseq.json"
    manifest = json.loads(file.read_text())
    spec = manifest["layers"][name]
    for key, value in changes.items():
        if key == "options":
            spec["options"] = value
        else:
            spec[key] = value
    file.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, changes, match", [
    ("3", {"options": {"device": "cuda"}}, r"layer '3': option 'device' is reserved"),
    ("3", {"options": {"dtype": "float16"}}, r"layer '3': option 'dtype' is reserved"),
    ("4", {"options": {"smoooth": True}}, r"layer '4': unknown option 'smoooth' for Int8Linear \(known: "),
    ("4", {"options": {"smooth": "yes"}}, r"layer '4': option 'smooth' must be a bool, got 'yes'"),
    ("0", {"options": {"mode": "weight_only", "smooth": True, "static": True}},
     r"layer '0': option mode='weight_only' contradicts format '2:4\+w8a8'"),
    ("3", {"options": [1]}, r"layer '3': options must be a JSON object"),
    ("3", {"dtype": "int8"}, r"layer '3': dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'"),
    ("3", {"dtype": "device"}, r"layer '3': dtype must be one of"),
    ("3", {"in_features": -16}, r"layer '3': in_features must be a positive integer, got -16"),
    ("3", {"out_features": 2 ** 62}, r"layer '3': saved shape 4611686018427387904x16 does not match"),
    ("3", {"in_features": 12.0}, r"layer '3': in_features must be a positive integer"),
    ("3", {"in_features": 12}, r"layer '3': saved shape 8x12 does not match the model's 8x16"),
    ("3", {"options": {"dense_fallback": 0}}, r"layer '3': option 'dense_fallback' must be a bool, got 0"),
    ("3", {"bias": "no"}, r"layer '3': bias must be true or false"),
])
def test_bad_specs_and_options_are_named(tmp_path, name, changes, match):
    sparseq.save(swapped(), tmp_path)
    _edit_layer(tmp_path, name, **changes)
    _expect_load_error(tmp_path, match)


def test_valid_files_still_load_bit_identically(tmp_path):
    model = swapped()
    x = torch.randn(5, 64)
    sparseq.save(model, tmp_path)
    manifest = json.loads((tmp_path / "sparseq.json").read_text())
    assert manifest["layers"]["0"]["options"] == {"mode": "w8a8", "smooth": True, "static": True}
    loaded = sparseq.load(tiny_model(), tmp_path)
    assert torch.equal(loaded(x), model(x))


def test_load_state_dict_checks_before_copying():
    layer = Sparse24Linear.from_linear(nn.Linear(16, 4), prune="magnitude")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    before = layer.meta.clone()
    bad = dict(state, meta=torch.full_like(state["meta"], 0xFF))
    with pytest.raises(ValueError, match=r"layer '' \(Sparse24Linear\): meta is corrupt: row 0, group 0"):
        layer.load_state_dict(bad)
    assert torch.equal(layer.meta, before)
    with pytest.raises(TypeError, match=r"meta: dtype torch.int8 where the format stores torch.uint8"):
        layer.load_state_dict(dict(state, meta=state["meta"].to(torch.int8)))
    q = Int8Linear.from_linear(nn.Linear(16, 4))
    qstate = q.state_dict()
    with pytest.raises(ValueError, match=r"w_scale must be > 0"):
        q.load_state_dict(dict(qstate, w_scale=torch.zeros(4)))
    layer.load_state_dict(state)  # a good state still loads


def test_reference_decompress_names_the_bad_code():
    values = torch.zeros(2, 4)
    sparseq.decompress_24(values, torch.tensor([[0x84], [0x9E]], dtype=torch.uint8))  # all six kinds valid
    with pytest.raises(ValueError, match=r"meta is corrupt: row 1, group 1 \(columns 4..7\) has code 0x6 "
                                         r"\(positions 2, 1\)"):
        sparseq.decompress_24(values, torch.tensor([[0x84], [0x64]], dtype=torch.uint8))
