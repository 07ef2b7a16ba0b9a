"""Edge inputs of layers on the CPU paths: a NaN/Inf row gives a non-finite output row (as
nn.Linear), never finite numbers; the other rows are unchanged; M = 0 works on every path."""
import pytest
import torch
from torch import nn

import sparseq
from sparseq.nn.swap import FORMATS

CPU = torch.device("cpu")


def _layer(fmt, static=False, smooth=False):
    torch.manual_seed(0)
    cls, fixed = FORMATS[fmt]
    kwargs = dict(fixed)
    if fmt.startswith("2:4"):
        kwargs["prune"] = "magnitude"
    if static:
        kwargs["act_amax"] = 3.0
    if smooth:
        kwargs["smooth"] = torch.rand(64) + 0.5
    return cls.from_linear(nn.Linear(64, 48), **kwargs)


def _backends(layer):
    names = ["dense"]
    if "w8a8" in layer.FORMAT and sparseq.kernels_available().get("onednn") is True:
        names.append("onednn")
    return names


def _impl(layer, backend, m):
    if backend == "dense":
        return layer._dense_impl(CPU, torch.float32)
    return layer.backend_impl(backend, m, torch.float32, CPU)


@pytest.mark.parametrize("fmt, static, smooth", [
    ("w8a8", False, False), ("w8a8", True, False), ("w8a8", True, True), ("2:4+w8a8", False, True),
    ("2:4+w8a8", True, False), ("2:4", False, False), ("int8_weight_only", False, False),
    ("2:4+int8_weight_only", False, False)])
def test_nonfinite_rows_stay_nonfinite(fmt, static, smooth):
    layer = _layer(fmt, static, smooth)
    x = torch.randn(6, 64)
    for backend in _backends(layer):
        clean = _impl(layer, backend, 6)(x)
        bad = x.clone()
        bad[1, 7] = float("nan")
        bad[4, 0] = float("inf")
        out = _impl(layer, backend, 6)(bad)
        finite = torch.isfinite(out).all(dim=1).tolist()
        assert finite == [True, False, True, True, False, True], (backend, finite)
        rows = [0, 2, 3, 5]
        assert torch.equal(out[rows], clean[rows]), backend


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("static", [False, True])
def test_empty_batch_on_every_cpu_path(fmt, static):
    if static and "w8a8" not in fmt:
        pytest.skip("static activation scales are a W8A8 option")
    layer = _layer(fmt, static)
    x = torch.empty(0, 64)
    for backend in _backends(layer) + ["reference"]:
        out = _impl(layer, backend, 1)(x)
        assert out.shape == (0, 48) and out.dtype == torch.float32, backend
    assert layer(torch.empty(2, 0, 64)).shape == (2, 0, 48)
