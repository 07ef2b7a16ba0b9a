"""The CUTLASS extensions' machine code (no GPU needed): sparse MMAs fed by TMA / cp.async in
every GEMM, no local memory (sparseq.machine_code). The audit runs on the built libraries
wherever they exist (CI builds them; SPARSEQ_REQUIRE_CUDA_EXTENSIONS=1 makes their absence a
failure); the rules themselves are tested on SASS snippets everywhere."""
import os

import pytest

from sparseq import machine_code as mc


def _kernel(arch, body, name="cutlass::gemm::kernel::GemmUniversal<...>"):
    return mc.Kernel(name, arch, body)


SM90_OK = "HGMMA.SP.64x128x32.F32.BF16 gdesc[UR4], RZ\n UTMALDG.3D [UR8], [UR4]"
SM80_OK = "LDGSTS.E.BYPASS.LTC128B.128 [R1], [R2]\n HMMA.SP.16832.F32.BF16 R4, R8, R12, R4"


@pytest.mark.parametrize("arch, body, problem", [
    ("sm_90a", SM90_OK, None),
    ("sm_80", SM80_OK, None),
    ("sm_90a", SM90_OK.replace("HGMMA.SP.", "HGMMA."), "no sparse MMA"),
    ("sm_90a", SM90_OK + "\n HGMMA.64x128x16.F32 R0", "a dense (non-sparse) MMA"),
    ("sm_90a", SM90_OK.replace("UTMALDG", "LDG.E"), "no TMA load"),
    ("sm_80", SM80_OK.replace("LDGSTS", "LDG"), "no cp.async load"),
    ("sm_80", SM80_OK.replace("HMMA.SP.16832.F32.BF16", "FFMA"), "no sparse MMA"),
    ("sm_80", SM80_OK + "\n STL [R1+0x10], R2", "local memory"),
])
def test_rules(arch, body, problem):
    found = _kernel(arch, body).problems()
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


def test_non_gemm_kernels_only_need_no_spills():
    assert _kernel("sm_90a", "LDG.E R0, [R2]", name="permute_sm90<false>").problems() == []
    assert _kernel("sm_90a", "STL [R1], R0", name="permute_sm90<false>").problems()


def test_built_extensions_issue_sparse_mma_without_spills():
    files = mc.cuda_extension_files()
    if not files:
        if os.environ.get("SPARSEQ_REQUIRE_CUDA_EXTENSIONS") == "1":
            pytest.fail("SPARSEQ_REQUIRE_CUDA_EXTENSIONS=1 but no sparseq/_C*.so is built")
        pytest.skip("the CUDA extensions are not built here (SPARSEQ_BUILD_CUDA=0)")
    tool = mc.cuobjdump()
    assert tool is not None, "cuobjdump not found (triton ships it)"
    found = {p: mc.kernels(p, tool) for p in files}
    problems = mc.audit(found)
    assert not problems, "\n".join(problems)
    gemms = {p.name: sum(k.is_gemm for k in ks) for p, ks in found.items()}
    assert sum(gemms.values()) >= 20, gemms  # 8 sm80 + 12 sm90a instantiations
