"""Audit the machine code (SASS) of the built CUTLASS extensions, no GPU needed.

``python -m sparseq.machine_code [SO ...]`` disassembles ``sparseq._C`` (sm80) and
``sparseq._C_sm90a`` (Hopper) with the ``cuobjdump`` Triton ships and checks every GEMM kernel:
on sm_90a a sparse warpgroup MMA (``HGMMA.*.SP`` / ``IGMMA.*.SP``) fed by TMA loads
(``UTMALDG``), on sm_80 a sparse tensor-core MMA (``HMMA.SP`` / ``IMMA.SP``) fed by ``cp.async``
(``LDGSTS``); no kernel uses local memory (``LDL`` / ``STL``: register spills). A regression
(a dense MMA, a SIMT loop, a spill) is named by kernel. The Triton kernels get the same audit in
``sparseq.kernels.aot``.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

RULES: Dict[str, Dict[str, str]] = {
    "sm_90a": {"sparse MMA": r"\b[HI]GMMA\.SP\.", "TMA load": r"\bUTMALDG\b"},
    "sm_80": {"sparse MMA": r"\b[HI]MMA\.SP\.", "cp.async load": r"\bLDGSTS\b"},
}
"""Per architecture: what every GEMM kernel's SASS must contain (name -> regex)."""
LOCAL_MEMORY = r"\b(LDL|STL)\b"
DENSE_MMA = r"\b(HGMMA|IGMMA|HMMA|IMMA)\.(?!SP\.)"


@dataclass
class Kernel:
    name: str
    arch: str
    sass: str = field(repr=False)

    @property
    def is_gemm(self) -> bool:
        return "gemm" in self.name.lower()

    def problems(self) -> List[str]:
        found = []
        if re.search(LOCAL_MEMORY, self.sass):
            found.append(f"local memory ({len(re.findall(LOCAL_MEMORY, self.sass))} LDL/STL: register spills)")
        if self.is_gemm:
            for what, pattern in RULES.get(self.arch, {}).items():
                if not re.search(pattern, self.sass):
                    found.append(f"no {what} ({pattern})")
            if re.search(DENSE_MMA, self.sass):
                found.append("a dense (non-sparse) MMA instruction")
        return found


def cuobjdump() -> Optional[str]:
    """Triton's bundled ``cuobjdump`` (or one on PATH)."""
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def kernels(so: Path, tool: str) -> List[Kernel]:
    """Every kernel function in ``so`` with its SASS and architecture."""
    text = subprocess.run([tool, "-sass", str(so)], capture_output=True, text=True, check=True).stdout
    found: List[Kernel] = []
    for block in re.split(r"\n(?=\s*code for sm_)", text):
        arch = re.search(r"code for (sm_\w+)", block)
        parts = re.split(r"\n\s*Function : (\S+)", block)
        for name, body in zip(parts[1::2], parts[2::2]):
            found.append(Kernel(name, arch.group(1) if arch else "?", body))
    for k, pretty in zip(found, _demangle([k.name for k in found])):
        k.name = pretty
    return found


def extension_files() -> List[Path]:
    """The built extension libraries next to the installed ``sparseq`` package (CUDA and CPU)."""
    root = Path(__file__).resolve().parent
    return sorted(p for p in root.glob("_C*.so") if p.is_file())


def cuda_extension_files() -> List[Path]:
    """The built CUDA extension libraries (``sparseq._C``, ``sparseq._C_sm90a``; not the CPU one)."""
    return [p for p in extension_files() if not p.name.startswith("_C_cpu")]


def audit(found: Dict[Path, List[Kernel]]) -> List[str]:
    """One line per problem, ``<file> <arch> <kernel>: <problem>``; empty when all is well."""
    problems = []
    for so, ks in found.items():
        if not any(k.is_gemm for k in ks):
            problems.append(f"{so.name}: no GEMM kernel found")
        for k in ks:
            problems += [f"{so.name} {k.arch} {k.name[:160]}: {p}" for p in k.problems()]
    return problems


def summary(found: Dict[Path, List[Kernel]]) -> List[str]:
    """A line per kernel: architecture, GEMM or not, the sparse MMA and load instructions found."""
    lines = []
    for so, ks in found.items():
        for k in ks:
            mma = sorted(set(re.findall(r"\b[HI]G?MMA\.SP\.[\w.]+", k.sass)))
            loads = sorted(set(re.findall(r"\b(UTMALDG|LDGSTS)\b", k.sass)))
            lines.append(f"{so.name} {k.arch} {'GEMM' if k.is_gemm else 'other'} {k.name[:90]} "
                         f"mma={','.join(mma) or '-'} loads={','.join(loads) or '-'}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", help="extension .so files (default: the installed sparseq._C*)")
    p.add_argument("--verbose", action="store_true", help="a line per kernel")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths] or cuda_extension_files()
    if not paths:
        print("no CUDA extension built (sparseq/_C.abi3.so, _C_sm90a): nothing to audit", file=sys.stderr)
        return 2
    tool = cuobjdump()
    if tool is None:
        print("cuobjdump not found (install triton, which ships it)", file=sys.stderr)
        return 2
    found = {p: kernels(p, tool) for p in paths}
    if args.verbose:
        print("\n".join(summary(found)))
    problems = audit(found)
    for line in problems:
        print(f"machine_code: FAILED {line}")
    total = sum(len(ks) for ks in found.values())
    print(f"machine_code: {len(paths)} libraries, {total} kernels, "
          + (f"{len(problems)} problems" if problems else "all as required"))
    return 1 if problems else 0

if __name__ == "__main__":
    sys.exit(main())
