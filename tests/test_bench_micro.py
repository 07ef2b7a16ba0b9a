"""pytest-benchmark micro-benchmarks of the CPU-runnable reference ops (small shapes, few rounds).

They track the cost of the pure-PyTorch reference (what a CPU user or a test pays), not kernel
speed; ``--benchmark-disable`` turns them into one plain call each.
"""
import pytest
import torch

import sparseq

N, K, M = 256, 512, 16
ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


@pytest.fixture
def weights():
    w = torch.randn(N, K, dtype=torch.float16)
    values, meta = sparseq.prune_and_compress_24(w)
    wq, w_scale = sparseq.quantize_per_channel(w)
    q24, meta24, s24 = sparseq.prune_and_compress_24(w, quantize=True)
    return dict(w=w, values=values, meta=meta, wq=wq, w_scale=w_scale, q24=q24, meta24=meta24, s24=s24)


@pytest.fixture
def x():
    return torch.randn(M, K, dtype=torch.float16)


def test_prune_and_compress_24(benchmark, weights):
    values, meta = benchmark.pedantic(sparseq.prune_and_compress_24, args=(weights["w"],), **ROUNDS)
    assert values.shape == (N, K // 2) and meta.shape == (N, K // 8)


def test_quantize_per_token(benchmark, x):
    q, s = benchmark.pedantic(sparseq.quantize_per_token, args=(x,), **ROUNDS)
    assert q.dtype == torch.int8 and s.shape == (M,)


def test_sparse24_mm(benchmark, weights, x):
    y = benchmark.pedantic(sparseq.sparse24_mm, args=(x, weights["values"], weights["meta"]), **ROUNDS)
    assert y.shape == (M, N)


def test_int8_mm(benchmark, weights, x):
    xq, x_scale = sparseq.quantize_per_token(x)
    args = (xq, weights["wq"], x_scale, weights["w_scale"], None, torch.float16)
    assert benchmark.pedantic(sparseq.int8_mm, args=args, **ROUNDS).shape == (M, N)


def test_int8_weight_only_mm(benchmark, weights, x):
    y = benchmark.pedantic(sparseq.int8_weight_only_mm, args=(x, weights["wq"], weights["w_scale"]), **ROUNDS)
    assert y.shape == (M, N)


def test_sparse24_int8_mm(benchmark, weights, x):
    xq, x_scale = sparseq.quantize_per_token(x)
    args = (xq, weights["q24"], weights["meta24"], weights["s24"], x_scale, None, torch.float16)
    assert benchmark.pedantic(sparseq.sparse24_int8_mm, args=args, **ROUNDS).shape == (M, N)
