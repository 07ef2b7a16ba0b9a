"""One swapped model, many threads: single-thread results, each derived tensor built once,
no growth over many calls."""
import collections
import copy
import os
import threading

import pytest
import torch
from torch import nn

import sparseq
from sparseq.nn.base import CompressedLinear

BATCHES = (1, 3, 16, 17, 64, 130, 300)  # every M bucket, odd sizes included


def swapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 16),
                          nn.Linear(16, 16))
    sparseq.swap(model, {"0": "2:4+w8a8", "2": "int8_weight_only", "3": "2:4", "4": "w8a8",
                         "5": "2:4+int8_weight_only"}, prune="magnitude")
    return model


@pytest.fixture
def build_counts(monkeypatch):
    """Counts of every derived tensor built: ``{(layer id, name, device): builds}``."""
    counts = collections.Counter()
    lock = threading.Lock()
    original = CompressedLinear.derived

    def counting(self, name, device, build):
        def counted():
            with lock:
                counts[(id(self), name, str(device))] += 1
            return build()
        return original(self, name, device, counted)

    monkeypatch.setattr(CompressedLinear, "derived", counting)
    return counts


def test_8_threads_x_500_mixed_calls_equal_single_thread(race, build_counts):
    model = swapped()
    torch.manual_seed(1)
    inputs = [torch.randn(m, 64) for m in BATCHES]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    fresh = copy.deepcopy(model)  # caches empty: the threads race on every first resolution and build
    build_counts.clear()
    picks = collections.Counter()
    original_pick = CompressedLinear._pick

    def counting_pick(self, key):
        picks[(id(self), key)] += 1
        return original_pick(self, key)

    CompressedLinear._pick = counting_pick
    mismatches = []
    try:
        def work(t):
            with torch.no_grad():
                for i in range(500):
                    j = (i * 7 + t) % len(inputs)
                    if not torch.equal(fresh(inputs[j]), expected[j]):
                        mismatches.append((t, i, BATCHES[j]))

        errors = race(work, 8)
    finally:
        CompressedLinear._pick = original_pick
    assert not errors and not mismatches[:5]
    assert build_counts and max(build_counts.values()) == 1, [k for k, v in build_counts.items() if v > 1]
    assert picks and max(picks.values()) == 1
    layers = [m for m in fresh.modules() if isinstance(m, CompressedLinear)]
    assert {name for _, name, _ in build_counts} >= {"onednn_packed"} or not sparseq.kernels_available()["onednn"]
    assert len(picks) == sum(len(m.backends) for m in layers)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_no_growth_over_10000_calls(build_counts):
    model = swapped()
    inputs = [torch.randn(m, 64) for m in (1, 5, 17)]
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    with torch.no_grad():
        for i in range(300):  # warm: every bucket used resolved, allocator caches filled
            model(inputs[i % 3])
        state = [(len(m._impls), len(m._derived)) for m in layers]
        builds = sum(build_counts.values())
        before = _rss_bytes()
        for i in range(10_000):
            model(inputs[i % 3])
        grown = _rss_bytes() - before
    assert [(len(m._impls), len(m._derived)) for m in layers] == state
    assert sum(build_counts.values()) == builds  # nothing rebuilt per call
    assert grown < 16 * 2**20, f"resident memory grew {grown / 2**20:.1f} MiB over 10,000 calls"


def test_backward_from_8_threads_builds_each_dense_copy_once(race, build_counts):
    model = swapped()
    inputs = [torch.randn(m, 64) for m in BATCHES]
    grads = []
    for x in inputs:
        x = x.clone().requires_grad_()
        model(x).sum().backward()
        grads.append(x.grad)
    fresh = copy.deepcopy(model)
    build_counts.clear()
    mismatches = []

    def work(t):
        for i in range(20):
            j = (i + t) % len(inputs)
            x = inputs[j].clone().requires_grad_()
            fresh(x).sum().backward()  # backward builds the dense copy, outside any resolution
            if not torch.equal(x.grad, grads[j]):
                mismatches.append((t, i))

    assert not race(work, 8) and not mismatches
    dense = {k: v for k, v in build_counts.items() if k[1].startswith("dense:")}
    assert len(dense) == 5 and set(dense.values()) == {1}, build_counts
