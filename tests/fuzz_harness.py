"""Fuzz sparseq's loaders, public ops and layers within a time budget.

    python tests/fuzz_harness.py --target load|ops|layers [--seconds 60] [--seed 0] [--mem-cap-gib 4]

Each case is generated from ``(seed, case number)``, so a failure is replayed with
``--replay N``. The only acceptable outcomes are a correct result or a clear ``ValueError`` /
``TypeError``: any other exception, a wrong result, or memory beyond the cap (an address-space
limit set after start-up, so an oversized allocation fails inside the case) is a problem. A
crash or hang ends the process; the caller (tests/test_fuzz.py) sees the exit status or its
own timeout, and the last case started is printed before it runs (``--verbose``).

What "correct" means:
- load: the load raises, or every compressed layer of the loaded model computes what the
  reference formats define for its loaded buffers (``sparseq.testing.check_layer_close``).
- ops: the public op (the reference on CPU) raises, or returns what it returns on contiguous
  copies of the same inputs; the Triton op (under ``TRITON_INTERPRET=1``) agrees with it
  within the reference's tolerance, or raises a clear error where the reference does; inputs
  poisoned with invalid values (NaN, bad codes, scales <= 0) must be rejected by the reference.
- layers: forward raises, or matches ``check_layer_close`` row for row; a row of the input
  holding NaN/Inf gives a non-finite output row (as ``nn.Linear``), never finite numbers.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import sparseq
from sparseq import reference as ref
from sparseq.testing import check_layer_close, check_matmul_close

CLEAR = (ValueError, TypeError)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_DTYPES = (torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64)


class Problem(Exception):
    """A fuzz case ended in something other than a correct result or a clear error."""


# ----------------------------------------------------------------------------- load


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 16), nn.Linear(16, 8),
                         nn.Linear(8, 8), nn.Linear(8, 8))


def _saved_model(root: Path) -> Path:
    from sparseq.nn.layers import Sparse24Int8Linear

    model = _tiny_model()
    model[0] = Sparse24Int8Linear.from_linear(model[0], prune="magnitude", smooth=torch.rand(64) + 0.5,
                                              act_amax=3.0)
    sparseq.swap(model, {"2": "int8_weight_only", "3": "2:4", "4": "w8a8", "5": "2:4+int8_weight_only"},
                 prune="magnitude")
    path = root / "good"
    sparseq.save(model, path)
    return path


def _mutate_json(rng: random.Random, value, depth: int = 0):
    """A random change somewhere inside a JSON value."""
    junk = [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, -2 ** 40, 1.5, float("nan"), "", "float32", "2:4",
            "cuda", [], {}, [1, 2], {"device": "cuda"}, "x" * 1000]
    if isinstance(value, dict) and value and rng.random() < 0.85:
        key = rng.choice(list(value))
        action = rng.random()
        if action < 0.15:
            value.pop(key)
        elif action < 0.25:
            value[rng.choice(["device", "dtype", "bogus", "mode", "smooth", "in_features"])] = rng.choice(junk)
        else:
            value[key] = _mutate_json(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        value[i] = _mutate_json(rng, value[i], depth + 1)
        return value
    if isinstance(value, bool):
        return rng.choice([not value] + junk)
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, 0, -value, value * 8, value // 2] + junk)
    return rng.choice(junk)


def _mutate_bytes(rng: random.Random, data: bytearray) -> bytearray:
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    try:
        header = json.loads(bytes(data[8:8 + header_len])) if 8 + header_len <= len(data) else None
    except ValueError:
        header = None
    action = rng.random()
    if header is None or len(data) < 16:  # an earlier mutation broke the layout: random bytes
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        return data
    if action < 0.3 and len(data) > 8 + header_len:  # flip bytes in the data section (values, codes, scales)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(8 + header_len, len(data))
            data[i] = rng.randrange(256)
    elif action < 0.55:  # edit the JSON header: dtypes, shapes, offsets
        header = _mutate_json(rng, header)
        text = json.dumps(header).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        data = bytearray(len(text).to_bytes(8, "little")) + text + data[8 + header_len:]
    elif action < 0.7:  # flip bytes in the header text
        i = rng.randrange(8, 8 + header_len)
        data[i] = rng.randrange(32, 127)
    elif action < 0.8:  # the length prefix
        data[:8] = rng.choice([0, 1, max(0, header_len - 1), header_len + 8, 2 ** 40, len(data)]).to_bytes(8, "little")
    elif action < 0.9:
        data = data[:rng.randrange(1, len(data))]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return data


def _check_loaded(model: nn.Module, rng: random.Random) -> None:
    x = torch.randn(rng.choice([1, 3, 17]), 64)
    with torch.no_grad():
        model(x)  # the whole model runs
    for name, layer in model.named_modules():
        if isinstance(layer, sparseq.nn.CompressedLinear):
            xi = torch.randn(5, layer.in_features)
            try:
                problem = check_layer_close(layer, xi, dense_fallback=True)
            except CLEAR as e:  # the reference rejects the loaded buffers: load should have
                raise Problem(f"layer {name!r} loaded, but its buffers break the format: {e}") from e
            if problem:
                raise Problem(f"layer {name!r} computes wrong results after load: {problem}")


def load_case(rng: random.Random, work: Path, good: Path) -> str:
    case = work / "case"
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(good, case)
    what = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            file = case / "sparseq.json"
            data = file.read_bytes()
            try:
                manifest = json.loads(data)
            except ValueError:
                manifest = None
            if manifest is not None and rng.random() < 0.85:
                file.write_text(json.dumps(_mutate_json(rng, manifest)))
            elif data:
                i = rng.randrange(len(data))
                file.write_bytes(data[:i] + rng.choice([b"", b"}", b"\x00", b"[", b'"', b"\xbd"]) + data[i + 1:])
            what.append("manifest")
        else:
            file = case / "model.safetensors"
            file.write_bytes(bytes(_mutate_bytes(rng, bytearray(file.read_bytes()))))
            what.append("weights")
    try:
        model = sparseq.load(_tiny_model(), case)
    except CLEAR as e:
        return type(e).__name__
    _check_loaded(model, rng)
    return "loaded"


# ------------------------------------------------------------------------------ ops


def _randn(rng: random.Random, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    return torch.randn(*shape, generator=g) * rng.choice([1e-3, 1.0, 50.0])


def _shape(rng: random.Random) -> Tuple[int, int, int]:
    m = rng.choice([0, 1, 2, 3, 5, 16, 17, 33, 64, 100])
    n = rng.choice([1, 2, 7, 8, 16, 24, 40, 64])
    k = 8 * rng.choice([1, 2, 3, 5, 8, 16, 31, 64, 128, 512, 2048])
    if k > 1024:
        m = min(m, 9)
    return m, n, k


def _valid_args(op: str, rng: random.Random) -> Tuple[list, Dict[str, str]]:
    """Valid arguments of ``op`` and the role of each tensor (for the mutators)."""
    m, n, k = _shape(rng)
    dt = rng.choice(FLOAT_DTYPES)
    x = _randn(rng, m, k).to(dt)
    w = _randn(rng, n, k).to(dt)
    smooth = torch.rand(k) + 0.5 if rng.random() < 0.5 else None
    bias = _randn(rng, n).to(dt) if rng.random() < 0.6 else None
    if op in ("prune_24", "prune_and_compress_24", "prune_and_compress_24_int8"):
        return [w, w.abs() if rng.random() < 0.5 else None], {"0": "checked", "1": "checked"}
    if op in ("compress_24", "quantize_per_channel"):
        w = torch.where(ref.prune_24(w), w, torch.zeros_like(w)) if op == "compress_24" else w
        return [w], {"0": "checked"}
    if op == "decompress_24":
        v, meta = ref.prune_and_compress_24(w)
        return [v, meta], {"0": "value", "1": "meta"}
    if op == "quantize_per_token":
        return [x, smooth], {"0": "checked", "1": "scale"}
    if op == "quantize_per_tensor":
        return [x, torch.tensor([rng.choice([1e-3, 0.1, 2.0])]), smooth], {"0": "checked", "1": "scale", "2": "scale"}
    if op == "int8_mm":
        xq, xs = ref.quantize_per_token(x)
        wq, ws = ref.quantize_per_channel(w)
        return [xq, wq, xs, ws, bias, rng.choice(FLOAT_DTYPES)], {"0": "int8", "1": "int8", "2": "scale",
                                                                   "3": "scale", "4": "value"}
    if op == "int8_weight_only_mm":
        wq, ws = ref.quantize_per_channel(w)
        return [x, wq, ws, bias], {"0": "value", "1": "int8", "2": "scale", "3": "value"}
    if op == "sparse24_mm":
        v, meta = ref.prune_and_compress_24(w)
        return [x, v, meta, bias], {"0": "value", "1": "value", "2": "meta", "3": "value"}
    if op == "sparse24_int8_mm":
        v, meta, ws = ref.prune_and_compress_24(w, quantize=True)
        if rng.random() < 0.5:
            xq, xs = ref.quantize_per_token(x)
            return [xq, v, meta, ws, xs, bias, rng.choice(FLOAT_DTYPES)], {
                "0": "int8", "1": "int8", "2": "meta", "3": "scale", "4": "scale", "5": "value"}
        return [x, v, meta, ws, None, bias, None], {"0": "value", "1": "int8", "2": "meta", "3": "scale",
                                                    "5": "value"}
    raise KeyError(op)


def _strided(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
    if t.dim() == 2 and rng.random() < 0.5:
        return t.t().contiguous().t()  # column-major
    if t.dim() >= 1 and t.numel():
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _mutate_args(rng: random.Random, args: list, roles: Dict[str, str]) -> Tuple[list, int, bool, str]:
    """``(args, index, poisoned, what)``: argument ``index`` changed; poisoned = it now holds
    values the reference must reject."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if not tensors:
        return args, -1, False, "no tensor left"
    action = rng.random()
    i = rng.choice(tensors)
    t, role = args[i], roles.get(str(i), "")
    args = list(args)
    if action < 0.2:
        args[i] = _strided(rng, t)
        return args, i, False, f"strided arg {i}"
    if action < 0.35 and t.numel():
        if role in ("checked", "scale") and t.is_floating_point():
            v = rng.choice([float("nan"), float("inf"), -float("inf")] + ([0.0, -1.0] if role == "scale" else []))
            t = t.clone(memory_format=torch.contiguous_format)
            t.view(-1)[rng.randrange(t.numel())] = v
            args[i] = t
            return args, i, True, f"arg {i} ({role}) holds {v}"
        if role == "meta":
            t = t.clone(memory_format=torch.contiguous_format)
            t.view(-1)[rng.randrange(t.numel())] = rng.choice([0x00, 0x55, 0xFF, 0x33, 0xF4, 0x4F])
            return args[:i] + [t] + args[i + 1:], i, True, f"arg {i} (meta) holds a bad code"
        if role == "int8":
            t = t.clone(memory_format=torch.contiguous_format)
            t.view(-1)[rng.randrange(t.numel())] = -128
            return args[:i] + [t] + args[i + 1:], i, False, f"arg {i} holds -128"
    if action < 0.5:
        args[i] = t.to(rng.choice(ODD_DTYPES + FLOAT_DTYPES))
        return args, i, False, f"arg {i} as {args[i].dtype}"
    if action < 0.65:
        shape = list(t.shape)
        choice = rng.random()
        if choice < 0.3 and shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 8, -8])
        elif choice < 0.5:
            shape = shape[1:] if shape else [3]
        elif choice < 0.7:
            shape = shape + [2]
        else:
            shape = [0] * len(shape)
        shape = [max(0, s) for s in shape]
        args[i] = torch.zeros(shape, dtype=t.dtype)
        return args, i, False, f"arg {i} reshaped to {shape}"
    if action < 0.75:
        args[i] = t.expand(3, *t.shape)[0] if t.dim() else t  # a stride-0 view of the same values
        if t.dim() == 2 and t.shape[0] > 0:
            args[i] = t[:1].expand(t.shape[0], t.shape[1])  # stride 0 along rows
        return args, i, False, f"arg {i} expanded"
    if action < 0.85:
        args[i] = rng.choice([None, 3, [1.0, 2.0], "x"])
        return args, i, False, f"arg {i} replaced by {args[i]!r}"
    return args, -1, False, "valid"


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _shape_error(op: str, args: list) -> bool:
    """True where the reference rejects ``args`` without looking at values (its checks on
    meta tensors fail), i.e. for their shapes, dtypes or layout."""
    from sparseq.ops import REFERENCE_FUNCTIONS, fake_from_reference

    try:
        fake_from_reference(REFERENCE_FUNCTIONS[op])(*args)
    except CLEAR:
        return True
    except Exception:  # noqa: BLE001
        return True
    return False


def _has_bf16(args: list) -> bool:
    return any(a is torch.bfloat16 or (isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16) for a in args)


def _contiguous(args: list) -> list:
    return [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]


def _agree(op: str, out, expected, args: list) -> Optional[str]:
    """None where the Triton output matches the reference within the stated tolerance."""
    if op in ("int8_mm", "int8_weight_only_mm", "sparse24_mm", "sparse24_int8_mm"):
        x = args[0]
        if op == "int8_mm":
            w, xs, ws, bias = args[1], args[2], args[3], args[4]
        elif op == "int8_weight_only_mm":
            w, xs, ws, bias = args[1], None, args[2], args[3]
        elif op == "sparse24_mm":
            w, xs, ws, bias = ref.decompress_24(args[1], args[2]), None, None, args[3]
        else:
            w, xs, ws, bias = ref.decompress_24(args[1], args[2]), args[4], args[3], args[5]
        return check_matmul_close(out, expected, x.contiguous(), w, xs, ws, bias)
    return None if _same(out, expected) else "not bit-identical to the reference"


OPS = ("prune_24", "compress_24", "decompress_24", "prune_and_compress_24", "prune_and_compress_24_int8",
       "quantize_per_channel", "quantize_per_token", "quantize_per_tensor", "int8_mm", "int8_weight_only_mm",
       "sparse24_mm", "sparse24_int8_mm")


def _triton_ops() -> Dict[str, Callable]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return {}
    from sparseq import dispatch

    found = {}
    for op in OPS:
        try:
            handle = dispatch.triton_op(op)
        except Exception:  # noqa: BLE001
            handle = None
        if handle is not None:
            found[op] = handle
    return found


def ops_case(rng: random.Random, triton: Dict[str, Callable]) -> str:
    op = rng.choice(OPS)
    args, roles = _valid_args(op, rng)
    poisoned_args, changes = set(), []
    for _ in range(rng.choice([0, 1, 1, 2])):
        args, i, poison, what = _mutate_args(rng, args, roles)
        poisoned_args.discard(i)
        if poison:
            poisoned_args.add(i)
        changes.append(what)
    poisoned, what = bool(poisoned_args), "; ".join(changes) or "valid"
    public = sparseq.api._public(op)
    try:
        out = public(*args)
    except CLEAR as e:
        out, error = None, e
    else:
        error = None
    if poisoned and error is None:
        raise Problem(f"{op} ({what}): the reference accepted invalid values")
    if error is None and any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args):
        expected = public(*_contiguous(args))
        problem = _agree(op, out, expected, _contiguous(args))  # float matmuls: summation order may differ
        if problem:
            raise Problem(f"{op} ({what}): a non-contiguous input changed the result: {problem}")
    kernel = triton.get(op)
    if kernel is not None and not poisoned and not _has_bf16(args):  # the interpreter has no bf16
        try:
            got = kernel(*args)
        except CLEAR:
            got = None
        except Exception:  # noqa: BLE001  torch's schema parser on the pinned op: fine where the reference rejects too
            if error is None:
                raise
            got = None
        if got is not None and error is not None and _shape_error(op, args):
            # (a kernel trusts values, as documented: only shape/dtype rejections must match)
            raise Problem(f"{op} ({what}): the Triton op accepted what the reference rejects ({error})")
        if got is not None and error is None:
            problem = _agree(op, got, out, args)
            if problem:
                raise Problem(f"{op} ({what}): Triton differs from the reference: {problem}")
    return f"{op}:{'ok' if error is None else type(error).__name__}"


# --------------------------------------------------------------------------- layers

_LAYER_FORMATS = ("2:4", "w8a8", "int8_weight_only", "2:4+w8a8", "2:4+int8_weight_only")


def layers_case(rng: random.Random) -> str:
    from sparseq.nn.swap import FORMATS

    fmt = rng.choice(_LAYER_FORMATS)
    _, n, k = _shape(rng)
    dtype = rng.choice(FLOAT_DTYPES)
    linear = nn.Linear(k, n, bias=rng.random() < 0.6).to(dtype)
    cls, fixed = FORMATS[fmt]
    kwargs = dict(fixed)
    if "w8a8" in fmt:
        if rng.random() < 0.3:
            kwargs["smooth"] = torch.rand(k) + 0.5
        if rng.random() < 0.3:
            kwargs["act_amax"] = 4.0
    if fmt.startswith("2:4"):
        kwargs["prune"] = "magnitude"
    layer = cls.from_linear(linear, **kwargs)
    if rng.random() < 0.2:
        layer.dense_fallback = False
        layer.reset()
    m = rng.choice([0, 1, 2, 3, 5, 16, 17, 33, 64, 100, 257])
    shape = [m, k] if rng.random() < 0.7 else [2, m, k]
    x = _randn(rng, *shape).to(dtype)
    poisoned = False
    action = rng.random()
    if action < 0.15 and x.numel():
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        poisoned = True
    elif action < 0.25:
        x = _strided(rng, x)
    elif action < 0.35:
        x = x.to(rng.choice(ODD_DTYPES + FLOAT_DTYPES))
    elif action < 0.4:
        x = torch.zeros(m, k + rng.choice([-8, 1, 8]), dtype=dtype)
    try:
        with torch.no_grad():
            out = layer(x)
    except CLEAR as e:
        return f"{fmt}:{type(e).__name__}"
    x2 = x.reshape(-1, x.shape[-1])
    out2 = out.reshape(-1, out.shape[-1])
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != n:
        raise Problem(f"{fmt}: output shape {tuple(out.shape)} for input {tuple(x.shape)}")
    bad_rows = ~torch.isfinite(x2.float()).all(dim=1)
    if poisoned:
        finite_rows = torch.isfinite(out2.float()).all(dim=1)
        if bool((bad_rows & finite_rows).any()):
            raise Problem(f"{fmt} {dtype} M={m}: a NaN/Inf input row gave a finite output row")
        x2, out2 = x2[~bad_rows], out2[~bad_rows]
    if x2.dtype != layer.dtype:  # the layer cast the input (autocast-free: only matching dtypes run)
        x2 = x2.to(out2.dtype)
    # the one implementation this case resolved: a "fast" CPU path that rounds activations otherwise?
    approximate = any(getattr(impl, "approximate", False) for impl in layer._impls.values())
    problem = check_layer_close(layer, x2.contiguous(), out2, dense_fallback=True, approximate=approximate)
    if problem:
        raise Problem(f"{fmt} {dtype} N={n} K={k} M={m} ({tuple(x.shape)}, {x.dtype}): {problem}")
    return f"{fmt}:ok"


# ---------------------------------------------------------------------------- driver


def _cap_memory(gib: float) -> None:
    """Limit the address space to what start-up used plus ``gib``: a case that tries to
    allocate more fails with an allocation error (reported as a problem), not an OOM kill."""
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + int(gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run(target: str, seconds: float, seed: int, mem_cap_gib: float, replay: Optional[int], verbose: bool) -> int:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="sparseq-fuzz-"))
    try:
        good = _saved_model(work) if target == "load" else None
        triton = _triton_ops() if target == "ops" else {}
        if target == "ops" and triton:  # compile the interpreter paths once, outside the cap
            ops_case(random.Random(0), {})
        if os.path.exists("/proc/self/statm"):
            _cap_memory(mem_cap_gib)
        outcomes: Dict[str, int] = collections.Counter()
        problems: List[str] = []
        start, i = time.monotonic(), 0
        cases = [replay] if replay is not None else None
        while (cases is not None and i < len(cases)) or (cases is None and time.monotonic() - start < seconds):
            number = cases[i] if cases is not None else i
            rng = random.Random(f"{seed}:{number}")
            if verbose:
                print(f"case {number}", flush=True)
            try:
                if target == "load":
                    outcome = load_case(rng, work, good)
                elif target == "ops":
                    outcome = ops_case(rng, triton)
                else:
                    outcome = layers_case(rng)
            except Problem as e:
                outcome = "PROBLEM"
                problems.append(f"case {number}: {e}")
            except Exception as e:  # noqa: BLE001  (an unclear error is a problem too)
                outcome = "PROBLEM"
                problems.append(f"case {number}: unclear error {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            outcomes[outcome.split(":")[-1] if target != "ops" else outcome.split(":")[-1]] += 1
            i += 1
        elapsed = time.monotonic() - start
        print(f"fuzz {target}: {i} cases in {elapsed:.0f} s (seed {seed}, triton ops: {len(triton)}), "
              f"outcomes {dict(sorted(outcomes.items()))}")
        for p in problems[:20]:
            print(f"  {p}")
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20} more")
        return 1 if problems else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=("load", "ops", "layers"), required=True)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-cap-gib", type=float, default=4.0)
    p.add_argument("--replay", type=int, help="run only case N of the seed")
    p.add_argument("--verbose", action="store_true", help="print each case number before it runs")
    a = p.parse_args(argv)
    return run(a.target, a.seconds, a.seed, a.mem_cap_gib, a.replay, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
