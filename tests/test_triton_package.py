"""sparseq.kernels: import-light, registers every sparseq::*_triton op with its reference's schema;
benchmarks/bench_triton.py runs end to end in its CPU smoke mode (interpreter)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_import_is_light():
    code = ("import sys, sparseq.kernels as k; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not [m for m in sys.modules if m.startswith('sparseq.kernels.')], 'kernel module imported'; "
            "print(sorted(k.TRITON_OPS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "int8_mm_triton" in out.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_register_every_op_with_the_reference_schema():
    import sparseq.kernels as k
    from sparseq import ops

    names = k.register()
    assert names == sorted(k.TRITON_OPS)
    for name in names:
        base = name[: -len("_triton")]
        assert base in ops.REFERENCE_OPS
        mine = getattr(torch.ops.sparseq, name).default._schema
        theirs = getattr(torch.ops.sparseq, base).default._schema
        assert str(mine).replace(name, base, 1) == str(theirs), (mine, theirs)
    assert k.module_for("int8_mm_triton") == "sparseq.kernels.int8_mm"
    with pytest.raises(ValueError, match="no Triton op 'int4_mm_triton'"):
        k.module_for("int4_mm_triton")
    with pytest.raises(KeyError):  # what sparseq.dispatch.triton_op catches
        k.module_for("decompress_24_triton")
    k.register()  # a second registration is a no-op


def test_configs_cover_every_bucket():
    from sparseq.kernels import configs

    for family, table in configs.CONFIGS.items():
        assert set(table) == set(configs.M_BUCKETS) | {0}, family
        for m in (1, 2, 16, 17, 64, 65, 256, 1024, 1025, 16384):
            cfg = configs.pick(family, m, 4096, 4096)
            assert cfg.SPLIT_K == 1 or m <= 64
    assert configs.pick("int8_weight_only", 1, 1024, 4096).SPLIT_K > 1  # decode, narrow layer: too few tiles
    assert configs.pick("int8_weight_only", 1, 4096, 4096).SPLIT_K == 1  # 128 tiles: one wave already
    assert configs.pick("int8", 4096, 4096, 4096).SPLIT_K == 1
    with pytest.raises(ValueError, match="unknown kernel family"):
        configs.pick("int4", 1, 16, 16)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_bench_triton_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_triton.py"), "--smoke", "--out", str(tmp_path),
           "--shape", "64x128", "--m", "1,5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from sparseq import benchmarks as bm

    rows = bm.rows_from_csv(tmp_path / "triton.csv")
    assert not [r for r in rows if r.error]
    formats = {r.format for r in rows}
    assert {"dense", "int8_weight_only", "w8a8", "2:4", "2:4+int8_weight_only", "2:4+w8a8"} <= formats
    md = (tmp_path / "triton.md").read_text()
    assert "not a speed claim" in md and "Goals of issue 4" in md


def _has_ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(list(spec.submodule_search_locations)[0])
    return (root / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _has_ptxas(), reason="triton without its bundled CUDA ptxas")
def test_kernels_compile_for_hopper_and_ampere_without_spills():
    """What the interpreter cannot check: every kernel compiles to sm_90 and sm_80 code (tensor-core
    dot shapes, layouts, shared memory) at the decode and large-M configs, with no local memory,
    and the GEMMs' main loops run on the tensor cores. (.ci/check_triton_versions.sh runs every
    config under the oldest and the newest supported Triton.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "sparseq.kernels.aot", "--arch", "90", "--arch", "80", "--quick"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("sm")]
    assert len(lines) >= 30, out.stdout
    spilled = [ln for ln in lines if "stack 0 B  ldl/stl 0 " not in ln]
    assert not spilled, "\n".join(spilled)
    gemms = [ln for ln in lines if ln.split()[1] in ("int8_mm", "int8_weight_only_mm", "sparse24_mm", "sparse24_int8_mm")]
    assert len(gemms) >= 16 and not [ln for ln in gemms if ln.endswith("loop mma -")], "\n".join(gemms)


def test_sass_facts_find_tensor_cores_in_loops_and_local_memory():
    from sparseq.kernels.aot import Compiled, sass_facts

    def listing(*code):
        return "\n".join(f"        /*{addr:04x}*/   {ins} ;   /* 0x0000 */" for addr, ins in code)

    loop = listing((0x10, "IMMA.16832.S8.S8.SAT R4, R8, R12, R4"), (0x20, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),
                   (0x30, "STL [R1], R2"), (0x40, "@!P0 BRA 0x10"), (0x50, "HMMA.16816.F32.BF16 R4, R8, R12, R4"),
                   (0x60, "LDL.64 R2, [R1]"), (0x70, "BRA 0x70"))
    assert sass_facts(loop) == (("HGMMA.64x128x16", "IMMA.16832"), 2)  # the HMMA after the loop does not count
    assert sass_facts(listing((0x10, "HMMA.16816.F32 R4, R8, R12, R4"), (0x20, "@P0 BRA 0x40"))) == ((), 0)
    ok = Compiled("x", 80, 0, 128, 0, ("IMMA.16832",), 0)
    assert ok.problems(gemm=True) == []
    assert Compiled("x", 80, 0, 255, 24, (), 3).problems(gemm=True) == [
        "local memory: stack 24 B, 3 LDL/STL", "no tensor-core instruction (HMMA/IMMA/HGMMA/IGMMA) in the main loop"]
    assert Compiled("x", 80, 0, 64, 0, (), 0).problems(gemm=False) == []
    assert "no SASS" in Compiled("x", 80, 0, None, None).problems(gemm=False)[0]


def test_a_checkout_on_sys_path_leaves_hugging_faces_kernels_package_alone():
    """Run from this checkout's root (``python -m pytest``, PYTHONPATH=<checkout>), its ``kernels/``
    folder must not stand in for Hugging Face's ``kernels`` package, which transformers >= 5.25
    imports at ``import transformers``; ``sparseq.kernels`` stays this folder."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed here")
    code = ("import kernels, sparseq.kernels as ours\n"
            "print(kernels.__file__)\nprint(ours.__file__)\nprint(hasattr(kernels, 'get_kernel'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    theirs, ours, api = out.stdout.split()
    assert Path(ours).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert Path(theirs).resolve() != Path(ours).resolve() and api == "True"
