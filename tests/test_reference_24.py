"""The canonical 2:4 format: pruning, compression, round trips, adversarial weights."""
import pytest
import torch

import sparseq
from sparseq import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def random_weight(n, k, dtype):
    if dtype == torch.int8:
        return torch.randint(-128, 128, (n, k), dtype=torch.int8)
    return torch.randn(n, k).to(dtype)


def pruned(n, k, dtype):
    w = random_weight(n, k, dtype)
    return torch.where(sparseq.prune_24(w), w, torch.zeros_like(w))


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32 if t.element_size() == 4 else torch.int8)


def canonical_zeros(w):
    """``w`` with every zero as +0.0: what decompress(compress(w)) must return bit for bit."""
    return torch.where(w == 0, torch.zeros_like(w), w)


def assert_bit_exact_round_trip(w):
    values, meta = sparseq.compress_24(w)
    back = sparseq.decompress_24(values, meta)
    assert back.dtype == w.dtype and back.shape == w.shape
    assert torch.equal(bits(back), bits(canonical_zeros(w)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 24), (64, 64), (128, 4096)])
def test_round_trip_random(dtype, shape):
    assert_bit_exact_round_trip(pruned(*shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_of_known_groups(dtype):
    # groups: kept (1,3), kept (0,2), one non-zero at 3 -> (0,3), all zero -> (0,1)
    w = torch.tensor([[0, 5, 0, 7, 1, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0]]).to(dtype)
    values, meta = sparseq.compress_24(w)
    assert values.tolist() == [[5, 7, 1, 2, 0, 3, 0, 0]]
    codes = [1 | 3 << 2, 0 | 2 << 2, 0 | 3 << 2, 0 | 1 << 2]
    assert meta.dtype == torch.uint8
    assert meta.tolist() == [[codes[0] | codes[1] << 4, codes[2] | codes[3] << 4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_negative_zero_counts_as_zero(dtype):
    w = torch.tensor([[-0.0, -0.0, -0.0, 1.0, -0.0, 2.0, -0.0, 3.0]], dtype=dtype)
    assert sparseq.is_24_sparse(w)
    values, meta = sparseq.compress_24(w)
    # fillers are stored as +0.0, never -0.0
    assert not torch.any(torch.signbit(values) & (values == 0))
    assert_bit_exact_round_trip(w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_and_single_nonzero_groups(dtype):
    w = torch.zeros(4, 16, dtype=dtype)
    assert_bit_exact_round_trip(w)
    for pos in range(4):
        w = torch.zeros(2, 8, dtype=dtype)
        w[:, pos] = 3
        w[:, 4 + pos] = -2
        assert_bit_exact_round_trip(w)


def test_compressed_form_is_deterministic_for_equal_weights():
    a = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[-0.0, 1.0, -0.0, 0.0, 0.0, -0.0, 0.0, -0.0]])
    va, ma = sparseq.compress_24(a)
    vb, mb = sparseq.compress_24(b)
    assert torch.equal(bits(va), bits(vb)) and torch.equal(ma, mb)


def test_not_24_names_row_and_group():
    w = pruned(4, 16, torch.float32)
    w[2, 9:12] = 1.0
    w[2, 8] = 1.0
    with pytest.raises(ValueError, match=r"row 2, group 2 .*4 non-zeros"):
        sparseq.compress_24(w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_rejected(bad):
    w = torch.zeros(2, 8)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        sparseq.compress_24(w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparseq.prune_24(w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_keeps_two_largest(dtype):
    w = random_weight(32, 64, dtype)
    mask = sparseq.prune_24(w)
    assert mask.dtype == torch.bool
    g = mask.reshape(32, 16, 4)
    assert (g.sum(-1) == 2).all()
    mag = w.to(torch.float32).abs().reshape(32, 16, 4)
    kept_min = torch.where(g, mag, torch.full_like(mag, float("inf"))).amin(-1)
    dropped_max = torch.where(~g, mag, torch.full_like(mag, -1)).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert sparseq.is_24_sparse(torch.where(mask, w, torch.zeros_like(w)))


def test_prune_ties_go_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, -2.0, 2.0, 1.0]])
    assert sparseq.prune_24(w).tolist() == [[True, True, False, False, True, True, False, False]]


def test_prune_by_score():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    score = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    assert sparseq.prune_24(w, score).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="score must have shape"):
        sparseq.prune_24(w, torch.ones(1, 8))


def test_is_24_sparse():
    assert sparseq.is_24_sparse(torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 0]]))
    assert not sparseq.is_24_sparse(torch.tensor([[1.0, 1, 0, 1, 0, 0, 0, 0]]))
    assert not sparseq.is_24_sparse(torch.ones(2, 6))  # K not a multiple of 4


def test_prune_and_compress_matches_steps():
    w = torch.randn(16, 64)
    values, meta = sparseq.prune_and_compress_24(w)
    expected = sparseq.compress_24(torch.where(sparseq.prune_24(w), w, torch.zeros_like(w)))
    assert torch.equal(values, expected[0]) and torch.equal(meta, expected[1])
    q, meta_q, scale = sparseq.prune_and_compress_24(w, quantize=True)
    assert q.dtype == torch.int8 and torch.equal(meta_q, meta)
    eq, es = sparseq.quantize_per_channel(values)
    assert torch.equal(q, eq) and torch.equal(scale, es)


@pytest.mark.parametrize(
    "values, meta, err, match",
    [
        (torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.uint8), ValueError, r"meta must have shape \(2, 1\)"),
        (torch.zeros(2, 6), torch.zeros(2, 1, dtype=torch.uint8), ValueError, "K/2 .* multiple of 4"),
        (torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int8), TypeError, "meta must have dtype"),
        (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.uint8), TypeError, "values must have dtype"),
        (torch.zeros(8), torch.zeros(2, 1, dtype=torch.uint8), ValueError, "values must be 2-D"),
        (torch.zeros(4, 2).T, torch.zeros(2, 1, dtype=torch.uint8), ValueError, "values must be contiguous"),
        (torch.zeros(2, 4), torch.full((2, 1), 0x33, dtype=torch.uint8), ValueError, "meta is corrupt: row 0, group 0"),
    ],
)
def test_decompress_bad_input(values, meta, err, match):
    with pytest.raises(err, match=match):
        sparseq.decompress_24(values, meta)


def test_compress_bad_input():
    with pytest.raises(ValueError, match="K \\(dim 1\\) must be a positive multiple of 8"):
        sparseq.compress_24(torch.zeros(2, 12))
    with pytest.raises(TypeError, match="w must have dtype"):
        sparseq.compress_24(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="w must be 2-D"):
        sparseq.compress_24(torch.zeros(2, 2, 8))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        sparseq.compress_24([[0.0] * 8])


def test_unpack_meta_matches_pack():
    w = pruned(8, 32, torch.float32)
    _, meta = ref.compress_24(w)
    i0, i1 = ref.unpack_meta_24(meta)
    assert (i0 < i1).all() and (i1 <= 3).all()
    nz = (w != 0).reshape(8, 8, 4)
    kept = torch.zeros_like(nz)
    kept.scatter_(-1, torch.stack((i0, i1), -1), True)
    assert (kept | ~nz).all()  # every non-zero is kept
