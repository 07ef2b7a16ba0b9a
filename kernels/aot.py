"""Compile the Triton kernels ahead of time for a GPU architecture, with no GPU present.

``python -m sparseq.kernels.aot [--arch 90] [--quick]`` compiles every kernel for every M-bucket
config of :mod:`sparseq.kernels.configs` (bf16 and fp16 activations) with Triton's bundled
``ptxas``, and prints the shared memory, registers and stack of each, and from its SASS
(Triton's bundled ``cuobjdump``) the tensor-core instructions inside its loops and its
local-memory accesses. A CPU-only CI catches with it what the interpreter cannot: layouts,
tensor-core dot shapes, shared-memory overflow and register spills of the real GPU code.
It exits non-zero, naming the config, when a kernel fails to compile, uses local memory
(stack or LDL/STL: spills), or is a GEMM without tensor-core instructions in its main loop.
Run it without ``TRITON_INTERPRET=1``; ``PYTHONPATH=<folder>`` checks another Triton.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

Signature = Dict[str, str]


@dataclass
class Compiled:
    name: str
    arch: int
    shared: int
    registers: Optional[int]
    spills: Optional[int]  # stack bytes
    loop_mma: Optional[Tuple[str, ...]] = None  # tensor-core instructions inside a loop, e.g. ("HMMA.16816",)
    local_accesses: Optional[int] = None  # LDL/STL instructions

    def problems(self, gemm: bool) -> List[str]:
        """What makes this compile unacceptable (empty when it is fine)."""
        if self.registers is None or self.loop_mma is None:
            return ["no SASS to check (Triton without its bundled cuobjdump)"]
        found = []
        if self.spills or self.local_accesses:
            found.append(f"local memory: stack {self.spills} B, {self.local_accesses} LDL/STL")
        if gemm and not self.loop_mma:
            found.append("no tensor-core instruction (HMMA/IMMA/HGMMA/IGMMA) in the main loop")
        return found


GEMM_OPS = ("int8_mm", "int8_weight_only_mm", "sparse24_mm", "sparse24_int8_mm")
"""Job labels starting with one of these are GEMMs: their main loop must run on the tensor cores."""


UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_xk", "stride_on")
"""Integer arguments that are 1 in a real launch (contiguous K / N): Triton's JIT makes them constants."""


def _spec(fn, types: Signature, constexprs: dict):
    """What the JIT would compile for typical shapes: unit strides constant, pointers and the
    other integers (except M) 16-divisible, so loads vectorize and the pipeliner can use async copies."""
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    for n in UNIT_STRIDES:
        if n in fn.arg_names and n not in constexprs:
            constexprs[n] = 1
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and (types[n].startswith("*") or (n != "M" and types[n] == "i32"))}
    return ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                     attrs=attrs)


def _cuobjdump(cubin: bytes) -> Optional[str]:
    """``cuobjdump -res-usage -sass`` of ``cubin`` with the running Triton's bundled tool (None if absent)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-res-usage", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_MMA = re.compile(r"\b([HI]G?MMA)((?:\.\w+)?)")  # HMMA/IMMA (mma.sync), HGMMA/IGMMA (wgmma)
_LOCAL = re.compile(r"\b(?:LDL|STL)\b")


def sass_facts(sass: str) -> Tuple[Tuple[str, ...], int]:
    """(tensor-core instructions between a backward branch and its target, i.e. in a loop, with
    their shape; number of local-memory loads/stores) of a ``cuobjdump -sass`` listing."""
    code = [(int(a, 16), ins.strip()) for a, ins in _SASS_LINE.findall(sass)]
    loops = []
    for addr, ins in code:
        if re.search(r"\bBRA\b", ins):
            target = re.findall(r"0x([0-9a-f]+)", ins)
            if target and int(target[-1], 16) <= addr:
                loops.append((int(target[-1], 16), addr))
    mma = {m.group(1) + m.group(2) for addr, ins in code for m in [_MMA.search(ins)]
           if m and any(lo <= addr <= hi for lo, hi in loops)}
    return tuple(sorted(mma)), sum(1 for _, ins in code if _LOCAL.search(ins))


def _resources(cubin: bytes) -> Tuple[Optional[int], Optional[int], Optional[Tuple[str, ...]], Optional[int]]:
    """(registers, stack bytes, tensor-core instructions in loops, LDL/STL count); None where unavailable."""
    out = _cuobjdump(cubin)
    if out is None:
        return None, None, None, None
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)  # register spills land in the stack frame
    mma, local = sass_facts(out)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None), mma, local


def compile_one(fn, types: Signature, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                label: str) -> Compiled:
    """Compile ``fn`` for ``sm_<arch>``; raises on any compiler error."""
    import triton
    from triton.backends.compiler import GPUTarget

    k = triton.compile(_spec(fn, types, constexprs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    return Compiled(label, arch, k.metadata.shared, *_resources(k.asm["cubin"]))


def _gemm_types(a: str, b: str, out: str, acc: str, extra: Signature) -> Signature:
    t = dict(out_ptr=f"*{out}", acc_ptr=f"*{acc}", w_scale_ptr="*fp32", bias_ptr=f"*{out}",
             M="i32", N="i32", K="i32", stride_om="i32", stride_on="i32")
    t.update(extra)
    return t


def jobs(quick: bool = False, arch: int = 90) -> Iterator[Tuple[str, object, Signature, dict, int, int]]:
    """(label, kernel, types, constexprs, num_warps, num_stages) of everything to compile for ``sm_<arch>``."""
    from . import configs, int8_mm, int8_weight_only_mm, prune_compress, quantize, sparse24_mm
    from ._common import _splitk_epilogue_kernel

    buckets = (1, 0) if quick else tuple(configs.CONFIGS["int8"])
    dtypes = ("bf16",) if quick else ("bf16", "fp16")

    def meta(cfg, split=1):
        return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=split, EVEN_K=True,
                    GROUP_M=cfg.GROUP_M)

    for b in buckets:
        split = 2 if b in (1, 16) else 1
        cfg = configs.table("int8", arch)[b]
        for out in dtypes:
            types = _gemm_types("i8", "i8", out, "i32", dict(
                a_ptr="*i8", b_ptr="*i8", x_scale_ptr="*fp32", stride_am="i32", stride_ak="i32",
                stride_bn="i32", stride_bk="i32"))
            yield (f"int8_mm m<={b or 'inf'} {out}", int8_mm._int8_mm_kernel, types,
                   dict(X_SCALE_PER_TOKEN=True, HAS_BIAS=True, **meta(cfg, split)), cfg.num_warps, cfg.num_stages)
        cfg = configs.table("int8_weight_only", arch)[b]
        for act in dtypes:
            types = _gemm_types(act, "i8", act, "fp32", dict(
                a_ptr=f"*{act}", b_ptr="*i8", stride_am="i32", stride_ak="i32", stride_bn="i32", stride_bk="i32"))
            yield (f"int8_weight_only_mm m<={b or 'inf'} {act}", int8_weight_only_mm._int8_weight_only_mm_kernel,
                   types, dict(HAS_BIAS=True, IEEE_FP32=False, **meta(cfg, split)), cfg.num_warps, cfg.num_stages)
        for family, values in (("sparse24", None), ("sparse24_int8", "i8")):
            cfg = configs.table(family, arch)[b]
            for act in (dtypes + ("i8",) if values else dtypes):
                out = "bf16" if act == "i8" else act
                types = _gemm_types(act, values or act, out, "i32" if act == "i8" else "fp32", dict(
                    x_ptr=f"*{act}", v_ptr=f"*{values or act}", meta_ptr="*u8", x_scale_ptr="*fp32",
                    stride_xm="i32", stride_xk="i32", stride_vn="i32", stride_mn="i32"))
                yield (f"{family}_mm m<={b or 'inf'} x={act}", sparse24_mm._sparse24_mm_kernel, types,
                       dict(INT_DOT=act == "i8", IEEE_FP32=False, HAS_X_SCALE=act == "i8", X_SCALE_PER_TOKEN=True,
                            HAS_W_SCALE=values is not None, HAS_BIAS=True,
                            **dict(meta(cfg, split), EVEN_K=arch >= 90)),  # as sparse24_mm._launch
                       cfg.num_warps, cfg.num_stages)
    for act in dtypes:
        for block_k, single in ((4096, True), (16384, True), (4096, False)):
            block_m = max(1, min(16, 4096 // block_k))
            yield (f"quantize_per_token BLOCK_K={block_k} single={single} {act}", quantize._quantize_per_token_kernel,
                   dict(x_ptr=f"*{act}", smooth_ptr="*fp32", q_ptr="*i8", scale_ptr="*fp32", M="i32", K="i32",
                        stride_xm="i32", stride_qm="i32"),
                   dict(HAS_SMOOTH=True, BLOCK_M=block_m, BLOCK_K=block_k, SINGLE_PASS=single),
                   4 if block_k <= 4096 else 16, 3)
        for quant in (False, True):
            yield (f"prune_and_compress_24 quantize={quant} {act}", prune_compress._prune_and_compress_24_kernel,
                   dict(w_ptr=f"*{act}", s_ptr=f"*{act}", v_ptr="*i8" if quant else f"*{act}", meta_ptr="*u8",
                        scale_ptr="*fp32", N="i32", K="i32", stride_wn="i32", stride_sn="i32"),
                   dict(HAS_SCORE=False, QUANTIZE=quant, BLOCK_N=16, BLOCK_K=256), 4, 3)
    yield ("quantize_per_tensor bf16", quantize._quantize_per_tensor_kernel,
           dict(x_ptr="*bf16", smooth_ptr="*fp32", scale_ptr="*fp32", q_ptr="*i8", M="i32", K="i32",
                stride_xm="i32", stride_qm="i32"), dict(HAS_SMOOTH=False, BLOCK_M=4, BLOCK_K=1024), 4, 3)
    yield ("splitk_epilogue i32->bf16", _splitk_epilogue_kernel,
           dict(acc_ptr="*i32", out_ptr="*bf16", x_scale_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*bf16",
                M="i32", N="i32", stride_om="i32", stride_on="i32"),
           dict(HAS_X_SCALE=True, X_SCALE_PER_TOKEN=True, HAS_W_SCALE=True, HAS_BIAS=True, SPLIT_K=4, BLOCK_M=32,
                BLOCK_N=128),
           4, 3)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90 and 80)")
    p.add_argument("--quick", action="store_true", help="the decode and large-M configs, bf16 only")
    p.add_argument("--filter", default="", help="only labels containing this text")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}")
    failed, count = [], 0
    for arch in args.arch or [90, 80]:
        for label, fn, types, constexprs, warps, stages in jobs(args.quick, arch):
            if args.filter not in label:
                continue
            count += 1
            try:
                c = compile_one(fn, types, constexprs, warps, stages, arch, label)
            except Exception as e:  # noqa: BLE001
                problems = [f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"]
                print(f"sm{arch} {label:<55} FAILED: {problems[0]}")
            else:
                problems = c.problems(gemm=label.split()[0] in GEMM_OPS)
                mma = ",".join(c.loop_mma) if c.loop_mma else "-"
                print(f"sm{arch} {label:<55} smem {c.shared:>7} B  regs {c.registers}  stack {c.spills} B  "
                      f"ldl/stl {c.local_accesses}  loop mma {mma}" + (f"  FAILED: {'; '.join(problems)}" if problems else ""))
            if problems:
                failed.append(f"sm{arch} {label}: {'; '.join(problems)}")
    print(f"aot: triton {triton.__version__}: {count} configs, {len(failed)} failed", file=sys.stderr)
    for line in failed:
        print(f"aot: FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
