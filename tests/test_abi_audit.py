"""How the built CUDA extensions link (sparseq.abi_audit): only PyTorch's stable C shim from
torch, no libpython, only limited-API CPython symbols, abi3 file names. The rules are tested on
small libraries compiled here; the audit runs on the built extensions wherever they exist (CI
builds them; SPARSEQ_REQUIRE_CUDA_EXTENSIONS=1 makes their absence a failure)."""
import os
import shutil
import subprocess

import pytest

from sparseq import abi_audit
from sparseq import machine_code

needs_toolchain = pytest.mark.skipif(not (shutil.which("g++") and shutil.which("nm") and shutil.which("readelf")),
                                     reason="g++/binutils not installed")

CLEAN = """
extern "C" void* PyModule_Create2(void*, int);
extern "C" int aoti_torch_get_current_cuda_stream(int, void**);
extern "C" void* entry(void* d) { void* s; aoti_torch_get_current_cuda_stream(0, &s); return PyModule_Create2(d, 3); }
"""
CXX_API = CLEAN + """
namespace c10 { struct Error { Error(const char*); }; }
extern "C" void boom() { c10::Error e("x"); }
"""
PRIVATE_PY = CLEAN + 'extern "C" void _Py_Dealloc(void*);\nextern "C" void f(void* o) { _Py_Dealloc(o); }\n'
OTHER_PY = CLEAN + 'extern "C" void* PyUnicode_AsUTF8(void*);\nextern "C" void* g(void* o) { return PyUnicode_AsUTF8(o); }\n'


def _library(tmp_path, source, name="_C.abi3.so"):
    src = tmp_path / "lib.cpp"
    src.write_text(source)
    so = tmp_path / name
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    return so


@needs_toolchain
def test_a_library_of_stable_c_symbols_passes(tmp_path):
    so = _library(tmp_path, CLEAN)
    assert abi_audit.problems(so) == []
    assert abi_audit.torch_imports(so) == ["aoti_torch_get_current_cuda_stream"]


@needs_toolchain
@pytest.mark.parametrize("source, name, expected", [
    (CXX_API, "_C.abi3.so", "imports torch C++ API symbol c10::Error::Error(char const*)"),
    (PRIVATE_PY, "_C.abi3.so", "imports private CPython symbol _Py_Dealloc"),
    (OTHER_PY, "_C.abi3.so", "imports CPython symbol PyUnicode_AsUTF8, not in PYTHON_LIMITED_API"),
    (CLEAN, "_C.cpython-311-x86_64-linux-gnu.so", "not a limited-API module"),
])
def test_each_rule_names_the_offender(tmp_path, source, name, expected):
    found = abi_audit.problems(_library(tmp_path, source, name))
    assert any(expected in line for line in found), found


@needs_toolchain
def test_a_libpython_link_fails(tmp_path):
    lib = tmp_path / "libpython3.99.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-Wl,-soname,libpython3.99.so", "-o", str(lib), "-x", "c++", "-"],
                   input=b"extern \"C\" int Py_Dummy() { return 0; }", check=True)
    src = tmp_path / "m.cpp"
    src.write_text(CLEAN)
    so = tmp_path / "_C.abi3.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(so), str(src), f"-L{tmp_path}", "-Wl,--no-as-needed", "-lpython3.99"], check=True)
    assert any("links libpython3.99.so" in line for line in abi_audit.problems(so))


def test_built_extensions_use_only_the_stable_abis():
    files, cuda = machine_code.extension_files(), machine_code.cuda_extension_files()
    if not cuda and os.environ.get("SPARSEQ_REQUIRE_CUDA_EXTENSIONS") == "1":
        pytest.fail("SPARSEQ_REQUIRE_CUDA_EXTENSIONS=1 but no sparseq/_C.abi3.so is built")
    if not files:
        pytest.skip("no extension is built here (SPARSEQ_SKIP_CPU_BUILD=1 and SPARSEQ_BUILD_CUDA=0)")
    problems = [line for so in files for line in abi_audit.problems(so)]
    assert not problems, "\n".join(problems)
    if cuda:
        assert {so.name for so in cuda} == {"_C.abi3.so", "_C_sm90a.abi3.so"}
    for so in cuda:  # the CUDA stream comes from torch's C shim, so the shim is really used
        assert "aoti_torch_get_current_cuda_stream" in abi_audit.torch_imports(so), so.name
    for so in set(files) - set(cuda):  # sparseq._C_cpu: threads through torch's stable parallel_for
        assert so.name == "_C_cpu.abi3.so"
        assert "torch_parallel_for" in abi_audit.torch_imports(so), so.name


@needs_toolchain
def test_missing_shim_functions_names_what_another_torch_lacks(tmp_path):
    so = _library(tmp_path, CLEAN)
    libs = tmp_path / "lib"
    libs.mkdir()
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(libs / "libtorch_cpu.so"), "-x", "c++", "-"],
                   input=b'extern "C" int aoti_torch_other() { return 0; }', check=True)
    assert abi_audit.missing_shim_functions(so, libs) == ["aoti_torch_get_current_cuda_stream"]
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(libs / "libtorch_cuda.so"), "-x", "c++", "-"],
                   input=b'extern "C" int aoti_torch_get_current_cuda_stream(int, void**) { return 0; }', check=True)
    assert abi_audit.missing_shim_functions(so, libs) == []
