"""Audit how the built CUDA extensions link, so that one build loads under many torch and Python
versions (no GPU needed).

``python -m sparseq.abi_audit [SO ...]`` reads each ``sparseq._C*`` library's dynamic symbols
(``nm -D``) and needed libraries (``readelf -d``) and fails, naming the symbol, when it:

- needs a symbol of libtorch/c10's C++ API (``at::``, ``c10::``, ``torch::``, pybind11): those
  change from one torch release to the next. Only PyTorch's stable C shim (``aoti_torch_*``,
  ``torch_*``, plain C) may be imported from torch;
- links libpython, or imports a CPython symbol outside the limited API functions sparseq uses
  (``PYTHON_LIMITED_API``), or a private ``_Py*`` one;
- is not named ``*.abi3.so`` (the file name CPython >= 3.10 loads a limited-API module by).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

TORCH_CXX_API = re.compile(r"\b(c10|at|torch|caffe2|pybind11)::")
"""A demangled symbol from libtorch/c10's C++ API (or pybind11, which torch_python exports)."""
TORCH_C_SHIM = re.compile(r"^(aoti_torch_|torch_)\w+$")
"""PyTorch's stable C shim (torch/csrc/stable/c/shim.h, aoti_torch/c/shim.h)."""
PYTHON_LIMITED_API = frozenset({"PyModule_Create2"})
"""The CPython functions the extensions call, all in the limited API (PyModule_Create under
Py_LIMITED_API). A new one must be checked against https://docs.python.org/3/c-api/stable.html
and added here."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (binutils): cannot audit the extensions' linkage")
    return path


def undefined_symbols(so: Path) -> List[str]:
    """Names of the dynamic symbols ``so`` imports (symbol versions stripped)."""
    out = subprocess.run([_tool("nm"), "-D", "--undefined-only", str(so)], capture_output=True, text=True,
                         check=True).stdout
    return sorted({line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()})


def needed_libraries(so: Path) -> List[str]:
    """The ``DT_NEEDED`` entries of ``so``."""
    out = subprocess.run([_tool("readelf"), "-d", str(so)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def problems(so: Path) -> List[str]:
    """One line per linkage problem of ``so``; empty when it is portable."""
    found = []
    if not so.name.endswith(".abi3.so"):
        found.append(f"{so.name}: not a limited-API module (expected a *.abi3.so file name)")
    for lib in needed_libraries(so):
        if lib.startswith("libpython"):
            found.append(f"{so.name}: links {lib} (limited-API modules take Python from the interpreter)")
        if lib.startswith("libtorch_python"):
            found.append(f"{so.name}: links {lib} (torch's Python bindings: not a stable ABI)")
    names = undefined_symbols(so)
    for raw, pretty in zip(names, demangle(names)):
        if TORCH_CXX_API.search(pretty):
            found.append(f"{so.name}: imports torch C++ API symbol {pretty[:200]}")
        elif raw.startswith("_Py"):
            found.append(f"{so.name}: imports private CPython symbol {raw}")
        elif raw.startswith("Py") and raw not in PYTHON_LIMITED_API:
            found.append(f"{so.name}: imports CPython symbol {raw}, not in PYTHON_LIMITED_API")
    return found


def torch_imports(so: Path) -> List[str]:
    """The stable C shim functions ``so`` imports from torch (for the report)."""
    return [n for n in undefined_symbols(so) if TORCH_C_SHIM.match(n)]


def defined_symbols(lib: Path) -> List[str]:
    """Names of the dynamic symbols ``lib`` exports."""
    out = subprocess.run([_tool("nm"), "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    return sorted({line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()})


def missing_shim_functions(so: Path, torch_lib_dir: Path) -> List[str]:
    """The stable C shim functions ``so`` imports that no library in ``torch_lib_dir`` (another
    torch's ``torch/lib``) exports: what would keep ``so`` from loading under that torch."""
    exported = set()
    for lib in sorted(torch_lib_dir.glob("lib*.so*")):
        exported.update(defined_symbols(lib))
    return [name for name in torch_imports(so) if name not in exported]


def main(argv: Optional[List[str]] = None) -> int:
    from .machine_code import extension_files

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", help="extension .so files (default: the installed sparseq._C*)")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths] or extension_files()
    if not paths:
        print("no extension built (sparseq/_C*.so): nothing to audit", file=sys.stderr)
        return 2
    bad = []
    for so in paths:
        bad += problems(so)
        print(f"abi_audit: {so.name}: needs {', '.join(needed_libraries(so))}; "
              f"{len(torch_imports(so))} torch C shim functions")
    for line in bad:
        print(f"abi_audit: FAILED {line}")
    print(f"abi_audit: {len(paths)} libraries, " + (f"{len(bad)} problems" if bad else "portable"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
