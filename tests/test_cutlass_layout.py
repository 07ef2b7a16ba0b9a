"""CPU tests of the CUTLASS metadata layouts (sparseq.cutlass_layout) against CUTLASS's own code.

The fingerprints below were printed by csrc/tools/dump_meta_layouts.cu, which evaluates
CUTLASS 4.2's ``Sm90GemmSparseConfig::fill_layoutE`` (recast to bytes as the sm90 compressor
does) and ``cutlass::reorder_meta`` + ``ColumnMajorInterleaved<2>`` on the host. The slow test
recompiles that tool and compares every index.
"""
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from sparseq import cutlass_layout as cl
from sparseq import reference as ref

# name -> (arch, bits, rows, k, sha256[:32] of the int64 offsets, first 20 offsets)
CUTLASS_LAYOUTS = {
    "sm90_16bit": (90, 16, 128, 256, "51d822ec6355f419b86e71aea2c3f35a",
                   [0, 1, 128, 129, 4, 5, 132, 133, 8, 9, 136, 137, 12, 13, 140, 141, 2048, 2049, 2176, 2177]),
    "sm90_8bit": (90, 8, 128, 256, "922691db68a7c432baa386b88c429de4",
                  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 2048, 2049, 2050, 2051]),
    "sm80_16bit": (80, 16, 64, 256, "975d259eb04bbfb926f2c1b77eaf6a0d",
                   [0, 2, 128, 130, 256, 258, 384, 386, 512, 514, 640, 642, 768, 770, 896, 898, 8, 10, 136, 138]),
    "sm80_8bit": (80, 8, 64, 512, "4ad3f3bbedf76d5fd14b60763e3675a3",
                  [0, 2, 128, 130, 256, 258, 384, 386, 512, 514, 640, 642, 768, 770, 896, 898, 4, 6, 132, 134]),
}


def _offsets(arch, bits, n, k):
    fn = cl.sm90_meta_offsets if arch == 90 else cl.sm80_meta_offsets
    return fn(n, k, bits).reshape(-1)


def _random_meta(n, k, gen=None):
    """Canonical metadata with random valid codes (i0 < i1)."""
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    choice = torch.randint(0, 6, (n, k // 4), generator=gen)
    codes = (pairs[choice, 0] | (pairs[choice, 1] << 2)).to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


@pytest.mark.parametrize("name", sorted(CUTLASS_LAYOUTS))
def test_offsets_match_cutlass_fingerprint(name):
    arch, bits, n, k, digest, head = CUTLASS_LAYOUTS[name]
    off = _offsets(arch, bits, n, k)
    assert off[:20].tolist() == head
    assert hashlib.sha256(off.numpy().tobytes()).hexdigest()[:32] == digest


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("n,k", [(64, 128), (128, 256), (192, 384), (256, 1024)])
def test_offsets_are_a_permutation(arch, bits, n, k):
    off = _offsets(arch, bits, n, k)
    assert torch.equal(torch.sort(off).values, torch.arange(off.numel()))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("n,k", [(64, 128), (128, 512), (320, 640)])
def test_round_trip(arch, dtype, n, k):
    meta = _random_meta(n, k)
    bits = cl.element_bits(dtype)
    prepared = cl.meta_to_cutlass(meta, bits, arch)
    shape, mdtype = cl.cutlass_meta_shape(n, k, bits, arch)
    assert tuple(prepared.shape) == shape and prepared.dtype == mdtype
    assert cl.cutlass_meta_arch(prepared) == arch
    assert torch.equal(cl.meta_from_cutlass(prepared, bits, arch), meta)


def test_sm90_16bit_atom_facts():
    # Facts readable from TensorEAtom_16bit: 16 consecutive K (two bytes) are contiguous, the
    # next 16 K of the same row sit 128 bytes further, rows 0-7 are 16 bytes apart, row 8 is
    # 2 bytes in, and the second 128-wide K atom starts after all row atoms.
    off = cl.sm90_meta_offsets(128, 256, 16)
    assert off[0, 0] == 0 and off[0, 1] == 1
    assert off[0, 2] == 128 and off[0, 4] == 4
    assert off[1, 0] == 16 and off[8, 0] == 2 and off[16, 0] == 256
    assert off[64, 0] == 1024 and off[0, 16] == 2048


def test_sm90_8bit_atom_is_row_major():
    off = cl.sm90_meta_offsets(128, 256, 8)
    atom = off[:64, :16]
    assert torch.equal(atom.reshape(-1), torch.arange(1024))


def test_prepare_reference_keeps_values_and_codes():
    w = torch.randn(128, 256)
    values, meta = ref.prune_and_compress_24(w)
    for arch in (80, 90):
        prepared = cl.prepare_reference(values.to(torch.bfloat16), meta, arch)
        shape, dtype = cl.cutlass_meta_shape(128, 256, 16, arch)
        assert tuple(prepared.shape) == shape
        n, k, got_arch = cl.check_prepared(values.to(torch.bfloat16), prepared)
        assert (n, k, got_arch) == (128, 256, arch)
        back = cl.meta_from_cutlass(prepared, 16, arch)
        assert torch.equal(ref.decompress_24(values, back), ref.decompress_24(values, meta))


@pytest.mark.parametrize("n,k", [(32, 128), (64, 64), (64, 200)])
def test_bad_shapes_raise(n, k):
    with pytest.raises(ValueError, match="multiple of"):
        cl.check_cutlass_shape(n, k)


def test_bad_prepared_meta_raise():
    values = torch.zeros(64, 64, dtype=torch.bfloat16)
    canonical = torch.zeros(64, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="prepare_sparse24_cutlass"):
        cl.check_prepared(values, canonical)
    wrong_bits = cl.meta_to_cutlass(canonical, 8, 80)  # int32 words, but values are 16-bit
    with pytest.raises(ValueError, match="does not match"):
        cl.check_prepared(values, wrong_bits)
    with pytest.raises(TypeError, match="bfloat16, float16 or int8"):
        cl.element_bits(torch.float32)


def _cutlass_include():
    try:
        import cutlass_library
    except ImportError:
        return None
    src = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    return [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]


@pytest.mark.slow
def test_offsets_match_cutlass_compiled(tmp_path):
    """Compile csrc/tools/dump_meta_layouts.cu (host only) and compare every index."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0")
    nvcc = os.path.join(home, "bin", "nvcc")
    includes = _cutlass_include()
    if not os.path.exists(nvcc) or includes is None or shutil.which("g++") is None:
        pytest.skip("needs nvcc (CUDA_HOME) and the nvidia-cutlass headers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / "dump_meta_layouts"
    cmd = [nvcc, "-std=c++17", "-w", *[f"-I{p}" for p in includes],
           os.path.join(root, "csrc", "tools", "dump_meta_layouts.cu"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    for line in out.strip().splitlines():
        fields = line.split()
        name, n, k = fields[0], int(fields[1]), int(fields[2])
        arch, bits = CUTLASS_LAYOUTS[name][:2]
        expected = torch.tensor([int(v) for v in fields[3:]], dtype=torch.int64)
        assert torch.equal(_offsets(arch, bits, n, k), expected), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("n,k", [(64, 128), (128, 256), (192, 512)])
def test_sm80_layout_matches_pytorch_converter(dtype, n, k):
    """A second, independent source: PyTorch's own CUTLASS 2.x converter (CPU-runnable) must
    produce the same compressed values and the same metadata bytes as our sm80 layout."""
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    gen = torch.Generator().manual_seed(n + k)
    dense = torch.randn(n, k, generator=gen)
    w = dense * ref.prune_24(dense)  # real pruned weights (prune_24 returns the mask)
    if dtype == torch.int8:
        q = (w * 40).round().clamp(-127, 127)
        w = torch.where((w != 0) & (q == 0), torch.sign(w), q)  # kept weights stay nonzero
    w = w.to(dtype)
    assert ref.is_24_sparse(w)
    # every group keeps two non-zero, varied values, so the values check below can fail
    assert int((w != 0).sum()) == n * k // 2 and w.unique().numel() > 100
    values, meta = ref.compress_24(w)
    torch_values, torch_meta = conv.sparse_semi_structured_from_dense_cutlass(w)
    ours = cl.meta_to_cutlass_sm80(meta, cl.element_bits(dtype))
    assert torch.equal(torch_values, values)
    assert ours.dtype == torch_meta.dtype
    assert torch.equal(ours.reshape(-1), torch_meta.reshape(-1))
