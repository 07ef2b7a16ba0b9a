"""Shared test setup: GPU-marked tests skip cleanly without CUDA; fixed seeds."""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
