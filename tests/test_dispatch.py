"""Dispatch: M buckets, table lookup (defaults and tuned cache), CPU -> reference, tune CLI."""
import json
import subprocess
import sys

import pytest
import torch

from sparseq import cpu_fbgemm, cpu_kernels, dispatch, testing


@pytest.mark.parametrize("m, bucket", [(1, 0), (2, 1), (16, 1), (17, 2), (64, 2), (65, 3), (256, 3),
                                       (257, 4), (1024, 4), (1025, 5), (100000, 5)])
def test_buckets(m, bucket):
    assert dispatch.bucket_of(m) == bucket
    assert len(dispatch.BUCKET_NAMES) == len(dispatch.BUCKET_BOUNDS) + 1


def test_cpu_preferences(exact_cpu_numerics):
    """x86 has no sparse instructions: 2:4 and weight-only run dense; W8A8 oneDNN (and fbgemm's
    exact form where the fast section runs fbgemm); the reference only for dense_fallback=False;
    other devices the reference."""
    cpu = torch.device("cpu")
    for op in ("sparse24_mm", "int8_weight_only_mm", "sparse24_int8_weight_only_mm"):
        for m in dispatch.BUCKET_M:
            # int8 weight-only at M = 1: torch's kernel (bf16; layers decline it otherwise); sparseq's
            # cpu_woq only from N*K = 2**16 at M = 1, larger from M = 2 (test_cpu_woq)
            fast = ["int8pack"] if m == 1 and op != "sparse24_mm" else []
            assert dispatch.preferences(op, 64, 64, torch.float32, cpu, m) == fast + ["dense", "reference"]
    for op in ("int8_mm", "sparse24_int8_mm"):
        for m in dispatch.BUCKET_M[1:]:
            assert dispatch.preferences(op, 64, 64, torch.float32, cpu, m) == ["onednn", "dense", "reference"]
        # M = 1: small layers measured faster in the dense bucket, large ones in oneDNN
        assert dispatch.preferences(op, 384, 384, torch.float32, cpu, 1) == ["dense", "reference"]
        assert dispatch.preferences(op, 2048, 2048, torch.float32, cpu, 1) == ["fbgemm", "onednn", "dense", "reference"]
    assert dispatch.preferences("int8_mm", 64, 64, torch.float32, torch.device("meta"), 1) == ["reference"]


def _cpu_pref(op):
    return lambda n, k, m, dtype=torch.float32, one_thread=False: dispatch.preferences(  # noqa: E731
        op, n, k, dtype, torch.device("cpu"), m, one_thread)


needs_packed_gemm = pytest.mark.skipif(bool(cpu_fbgemm.packed_gemm_unavailable_reason()),
                                       reason=cpu_fbgemm.packed_gemm_unavailable_reason() or "ok")


@needs_packed_gemm
def test_cpu_preferences_fast_numerics(xeon_tables):
    """The default "fast" numerics with sparseq._C_cpu and fbgemm's packed GEMM: fbgemm at M = 1-3
    from mid-size layers and at M = 4-16 from small ones (with two threads; up to 2**22 / 2**20
    N*K at M = 8-9 / 10-16), the exact
    oneDNN path beyond and from M = 17, dense where no int8 path wins; bf16 by its own section;
    thresholds lower with one intra-op thread (benchmarks/results/cpu-*/cpu_kernels.csv)."""
    import sparseq

    with sparseq.cpu_numerics("fast"):
        for op in ("int8_mm", "sparse24_int8_mm"):
            pref = _cpu_pref(op)
            assert pref(384, 384, 1) == ["dense", "reference"]
            assert pref(1536, 384, 1) == ["fbgemm", "dense", "reference"]
            assert pref(1536, 384, 1, one_thread=True) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(2048, 1024, 1) == pref(2048, 1024, 7) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(1536, 384, 3) == ["dense", "reference"]
            assert pref(1536, 384, 3, one_thread=True) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(1536, 384, 4) == pref(1536, 384, 7) == ["fbgemm", "dense", "reference"]
            assert pref(1536, 384, 7, one_thread=True) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(384, 384, 4) == ["fbgemm", "dense", "reference"]
            assert pref(384, 384, 4, one_thread=True) == pref(384, 384, 3) == ["dense", "reference"]
            assert pref(1536, 384, 8) == pref(1536, 384, 16) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(384, 384, 7, one_thread=True) == pref(64, 64, 16) == ["dense", "reference"]
            assert pref(384, 384, 9) == ["fbgemm", "dense", "reference"]
            assert pref(384, 384, 10) == pref(384, 384, 16) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(2048, 2048, 9) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(2048, 2048, 10) == pref(4096, 4096, 8) == ["onednn", "dense", "reference"]
            assert pref(384, 384, 17) == pref(384, 384, 64) == ["onednn", "dense", "reference"]
            assert pref(64, 64, 64) == ["dense", "reference"]
            assert pref(64, 64, 256) == pref(4096, 4096, 4096) == ["onednn", "dense", "reference"]
            assert pref(384, 384, 1, torch.bfloat16) == pref(384, 384, 4, torch.bfloat16) \
                == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(384, 384, 16, torch.bfloat16) == ["dense", "reference"]
            assert pref(384, 384, 16, torch.bfloat16, True) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(1024, 1024, 16, torch.bfloat16) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(2048, 2048, 16, torch.bfloat16) == ["onednn", "dense", "reference"]
            assert pref(1024, 1024, 64, torch.bfloat16) == ["onednn", "dense", "reference"]
            assert pref(1024, 1024, 256, torch.bfloat16) == ["dense", "reference"]
            assert pref(2048, 2048, 256, torch.bfloat16) == ["onednn", "dense", "reference"]
        # other ops keep the "cpu" section
        assert dispatch.preferences("sparse24_mm", 64, 64, torch.float32, torch.device("cpu"), 1) == ["dense", "reference"]


@needs_packed_gemm
def test_cpu_preferences_on_amd(monkeypatch):
    """AMD's section (measured on a Zen 4 EPYC, where dense GEMMs are slower next to the int8
    ones): fbgemm to M = 64 from N*K = 2**17 (M = 1 with two threads from 2**18), at M = 17-64
    up to 2**22 (bf16: one thread only, to 2**21); oneDNN beyond and from M = 65; dense for small layers; int8
    weight-only by its own thresholds (below); other ops and the exact numerics keep the shared
    sections."""
    import sparseq

    monkeypatch.setattr(dispatch, "cpu_vendor", lambda: "AuthenticAMD")
    with sparseq.cpu_numerics("fast"):
        for op in ("int8_mm", "sparse24_int8_mm"):
            pref = _cpu_pref(op)
            both = ["fbgemm", "onednn", "dense", "reference"]
            assert pref(384, 384, 1) == ["dense", "reference"] and pref(384, 384, 1, one_thread=True) == both
            exact = ["onednn", "dense", "reference"]
            assert pref(1536, 384, 1) == pref(384, 384, 2) == pref(384, 384, 16) == pref(2048, 2048, 16) == both
            assert pref(384, 384, 64, one_thread=True) == pref(1024, 1024, 17, one_thread=True) == both
            assert pref(384, 384, 64) == pref(1024, 1024, 17) == pref(384, 384, 64, torch.bfloat16, True) == both
            assert pref(384, 384, 64, torch.bfloat16) == exact
            assert pref(2048, 2048, 17) == pref(2048, 2048, 64, one_thread=True) == both
            assert pref(4096, 4096, 17, one_thread=True) == pref(4096, 4096, 64) == pref(384, 384, 65) == exact
            assert pref(2048, 2048, 17, torch.bfloat16) == exact
            assert pref(64, 64, 1) == pref(64, 64, 16) == pref(64, 64, 64, torch.bfloat16) == ["dense", "reference"]
            assert pref(384, 384, 16, torch.bfloat16) == pref(384, 384, 1, torch.bfloat16) == both
            assert pref(1536, 384, 64, torch.bfloat16, True) == both
            assert pref(384, 384, 256, torch.bfloat16) == pref(2048, 2048, 4096, torch.bfloat16) \
                == ["onednn", "dense", "reference"]
    # int8 weight-only: fp32 cpu_woq to M = 64 from 2**17 at either thread count, bf16 to M = 6
    # (the bucket 2-16 split at 7 too here), fp16 as on the Xeon
    assert dispatch.cpu_parts("2-16") == [(2, 3), (4, 6), (7, 7), (8, 9), (10, 16)]
    for op in ("int8_weight_only_mm", "sparse24_int8_weight_only_mm"):
        pref = _cpu_pref(op)
        woq = ["cpu_woq", "dense", "reference"]
        for m in (2, 7, 16, 64):
            assert pref(384, 384, m) == pref(384, 384, m, one_thread=True) == pref(4096, 4096, m) == woq
            assert pref(64, 64, m) == ["dense", "reference"]
        assert pref(384, 384, 65) == ["dense", "reference"]
        assert pref(384, 384, 2, torch.bfloat16) == pref(4096, 4096, 6, torch.bfloat16, True) == woq
        assert pref(384, 384, 7, torch.bfloat16) == pref(1536, 384, 16, torch.bfloat16) == ["dense", "reference"]
        assert pref(1536, 384, 8, torch.float16) == woq and pref(1536, 384, 17, torch.float16) == ["dense", "reference"]
    with sparseq.cpu_numerics("exact"):  # the shared section, with the fast section's fbgemm (exact too)
        assert dispatch.preferences("int8_mm", 384, 384, torch.float32, torch.device("cpu"), 16) == \
            ["fbgemm", "onednn", "dense", "reference"]
        assert dispatch.preferences("int8_mm", 384, 384, torch.float32, torch.device("cpu"), 65) == \
            ["onednn", "dense", "reference"]
        assert dispatch.preferences("int8_mm", 64, 64, torch.float32, torch.device("cpu"), 16) == \
            ["onednn", "dense", "reference"]
    assert dispatch.preferences("sparse24_mm", 2048, 2048, torch.float32, torch.device("cpu"), 16) == \
        ["dense", "reference"]


def test_cpu_vendor_is_read_from_cpuinfo():
    vendor = dispatch.cpu_vendor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith("vendor_id")]
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert lines and vendor == lines[0].split(":", 1)[1].strip() and vendor


@pytest.mark.skipif(not cpu_kernels.available(), reason=cpu_kernels.unavailable_reason() or "ok")
def test_cpu_preferences_with_fbgemms_linear_dynamic_form(monkeypatch):
    """Where fbgemm runs linear_dynamic (no VNNI, or a torch without the packed GEMM), the
    cpu_linear_dynamic table: fbgemm only at M = 1 and below M = 8 on mid-size layers, the
    exact path from M = 8 (small layers from M = 10)."""
    import sparseq

    monkeypatch.setattr(cpu_fbgemm, "default_form", lambda: "linear_dynamic")
    with sparseq.cpu_numerics("fast"):
        for op in ("int8_mm", "sparse24_int8_mm"):
            pref = _cpu_pref(op)
            assert pref(384, 384, 1) == pref(1536, 384, 1) == ["dense", "reference"]
            assert pref(1536, 384, 1, one_thread=True) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(2048, 1024, 1) == pref(2048, 1024, 7) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(1536, 384, 7) == ["dense", "reference"]
            assert pref(1536, 384, 8) == pref(1536, 384, 16) == ["onednn", "fbgemm", "dense", "reference"]
            assert pref(384, 384, 9) == pref(64, 64, 16) == ["dense", "reference"]
            assert pref(384, 384, 10) == pref(384, 384, 16) == ["onednn", "dense", "reference"]
            assert pref(384, 384, 4, torch.bfloat16) == ["onednn", "dense", "reference"]
            assert pref(384, 384, 16, torch.bfloat16) == ["dense", "reference"]


def test_cpu_preferences_without_the_cpu_extension(monkeypatch):
    """Where sparseq._C_cpu is not built, the cpu_torch_ops table: fbgemm to M = 64, no M split."""
    import sparseq

    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert dispatch.cpu_splits("2-16") == () and dispatch.cpu_part("2-16", 3) == "2-16"
    with sparseq.cpu_numerics("fast"):
        for op in ("int8_mm", "sparse24_int8_mm"):
            pref = _cpu_pref(op)
            assert pref(384, 384, 1) == pref(1536, 384, 1) == ["dense", "reference"]
            assert pref(2048, 1024, 1) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(384, 384, 16) == ["dense", "reference"]
            assert pref(1536, 384, 16) == ["fbgemm", "onednn", "dense", "reference"]
            assert pref(1536, 384, 64) == ["fbgemm", "dense", "reference"]
            assert pref(2048, 2048, 64) == ["onednn", "fbgemm", "dense", "reference"]
            assert pref(64, 64, 256) == pref(4096, 4096, 4096) == ["onednn", "dense", "reference"]
            assert pref(1024, 1024, 1, torch.bfloat16) == ["fbgemm", "dense", "reference"]
            assert pref(4096, 4096, 64, torch.bfloat16) == ["dense", "reference"]


def _part_keys(splits: dict):
    """(keys a CPU list may use: each bucket, or each run of consecutive parts of a split one;
    the parts of every bucket)."""
    allowed, parts = set(), []
    for b in dispatch.BUCKET_NAMES:
        lo, _, hi = b.partition("-")
        cuts = splits.get(b)
        if cuts is None or not hi:
            allowed.add(b)
            parts.append((b, b))
            continue
        bounds = [int(lo), *sorted(cuts if isinstance(cuts, list) else [cuts]), int(hi) + 1]
        spans = list(zip(bounds, bounds[1:]))
        parts += [(b, f"{a}-{c - 1}") for a, c in spans]
        allowed |= {f"{spans[i][0]}-{spans[j][1] - 1}" for i in range(len(spans)) for j in range(i, len(spans))}
    return allowed, parts


def test_cpu_tables_cover_every_part_of_every_bucket():
    """Each CPU list is keyed by a bucket or by runs of consecutive parts of a split bucket (never
    by a range that cuts a part), and every part of every bucket finds a list."""
    table = dispatch._load("default")
    variants = [table, {**table, **table["cpu_torch_ops"]}, {**table, **table["cpu_linear_dynamic"]}]
    variants += [dispatch._with_vendor(table, section) for section in table["cpu_vendor"].values()]
    for variant in variants:
        allowed, parts = _part_keys(variant.get("cpu_split", {}))
        for dtype, section in variant["cpu_fast"].items():
            for op, lists in section["ops"].items():
                assert set(lists) <= allowed, (dtype, op)
                for bucket, part in parts:
                    assert dispatch.by_part(lists, bucket, part, None) is not None, (dtype, op, part)
            for rule in ("min_nk", "min_nk_one_thread", "max_nk"):
                for backend, by_key in section.get(rule, {}).items():
                    assert set(by_key) <= allowed, (dtype, rule, backend)


def test_cpu_parts_and_their_lookup(xeon_tables):
    """A list keyed by a run of parts serves each of them; a narrower key wins; unsplit buckets
    and '>1024' are their own part."""
    assert dispatch.cpu_parts("2-16") == [(2, 3), (4, 7), (8, 9), (10, 16)]
    assert [dispatch.cpu_part("2-16", m) for m in (2, 3, 4, 7, 8, 9, 10, 16)] == \
        ["2-3", "2-3", "4-7", "4-7", "8-9", "8-9", "10-16", "10-16"]
    assert dispatch.cpu_part("17-64", 20) == "17-64" and dispatch.cpu_part(">1024", 5000) == ">1024"
    d = {"2-7": "a", "8-16": "b", "10-16": "c", "17-64": "d", ">1024": "e"}
    assert [dispatch.by_part(d, "2-16", p, None) for p in ("2-3", "4-7", "8-9", "10-16")] == ["a", "a", "b", "c"]
    assert dispatch.by_part({**d, "4-7": "f"}, "2-16", "4-7", None) == "f"
    assert dispatch.by_part(d, "17-64", "17-64", None) == "d" and dispatch.by_part(d, ">1024", ">1024", None) == "e"
    assert dispatch.by_part({"2-16": "x"}, "2-16", "8-9", None) == "x" and dispatch.by_part({}, "2-16", "8-9", 0) == 0


@needs_packed_gemm
def test_w8a8_layers_switch_on_parts_of_the_small_bucket(xeon_tables):
    """fp32 W8A8 in the M bucket 2-16: 384x384 runs dense below M = 4 (a GEMV of this size beats
    fbgemm's fixed cost: 0.51-0.64x at M = 2), at M = 4-7 dense with one intra-op thread (0.91x)
    and fbgemm with two (1.18x), fbgemm from M = 8 (1.16-1.90x dense at 1 and 2 threads);
    2048x2048 fbgemm below M = 10 and the exact oneDNN path from there (measured 9.34 vs 8.95x
    dense at M = 10, 1 thread)."""
    import sparseq
    from sparseq.testing import check_layer_close, runs_dense_bucket

    small = sparseq.Int8Linear.from_linear(torch.nn.Linear(384, 384))
    big = sparseq.Int8Linear.from_linear(torch.nn.Linear(2048, 2048))
    with sparseq.cpu_numerics("fast"):
        assert small.prepare(torch.device("cpu"))["2-16"] == "M<4: dense; M=4-7: dense (1 thread) / fbgemm; M>=8: fbgemm"
        assert big.prepare(torch.device("cpu"))["2-16"] == "M<10: fbgemm; M>=10: onednn"
        with torch.inference_mode():
            one_thread = torch.get_num_threads() == 1
            for m in (2, 3, 4, 7, 8, 9, 10, 16):
                x = torch.randn(m, 384)
                dense = m < 4 or (m < 8 and one_thread)
                assert runs_dense_bucket(small, x) == dense
                assert testing.is_approximate(small, x) == dense  # the fast dense bucket rounds; fbgemm is exact
                assert check_layer_close(small, x) is None
                xb = torch.randn(m, 2048)
                assert not testing.is_approximate(big, xb)  # fbgemm's packed form and oneDNN's path are exact
                assert check_layer_close(big, xb) is None


def test_default_table_covers_every_op_and_bucket():
    table = dispatch._load("default")["default"]
    for op in ("quantize_per_token", "int8_mm", "int8_weight_only_mm", "sparse24_mm", "sparse24_int8_mm",
               "sparse24_int8_weight_only_mm"):
        assert set(table[op]) == set(dispatch.BUCKET_NAMES)


def test_tuned_table_overrides_defaults(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    assert dispatch.tuned_table_path() == path
    key = dispatch.tuned_key("sparse24_mm", 128, 256, torch.bfloat16, (9, 0))
    path.write_text(json.dumps({key: {"2-16": "dense"}}))
    dispatch.reload_tables()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    prefs = dispatch.preferences("sparse24_mm", 128, 256, torch.bfloat16, torch.device("cuda"), 8)
    assert prefs[0] == "dense"
    prefs = dispatch.preferences("sparse24_mm", 128, 256, torch.bfloat16, torch.device("cuda"), 1)
    assert prefs[0] == "triton"  # untuned bucket: shipped default
    dispatch.reload_tables()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_without_gpu_fails_cleanly():
    proc = subprocess.run([sys.executable, "-m", "sparseq", "tune"], capture_output=True, text=True)
    assert proc.returncode == 1 and "no CUDA GPU" in proc.stderr


def test_corrupt_tuned_table_warns_and_uses_defaults(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    path.write_text("{half a table")
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    dispatch.reload_tables()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.warns(UserWarning, match="ignoring the tuned dispatch table"):
        prefs = dispatch.preferences("sparse24_mm", 128, 256, torch.bfloat16, torch.device("cuda"), 1)
    assert prefs == ["triton", "dense"]
    dispatch.reload_tables()


def test_gpu_preferences_end_with_dense_never_the_reference(monkeypatch):
    """The reference syncs the host (value checks) and rebuilds the weight every call: no GPU
    path may pick it, for any op, bucket, or capability (sm80, sm90, an unknown sm120)."""
    monkeypatch.setenv(dispatch.CACHE_ENV, "/nonexistent/tuned.json")
    dispatch.reload_tables()
    ops = ("sparse24_mm", "sparse24_int8_mm", "sparse24_int8_weight_only_mm", "int8_mm", "int8_weight_only_mm")
    for cap in ((8, 0), (9, 0), (12, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        for op in ops:
            for m in dispatch.BUCKET_M:
                prefs = dispatch.preferences(op, 4096, 4096, torch.bfloat16, torch.device("cuda"), m)
                assert prefs[-1] == "dense" and "reference" not in prefs, (cap, op, m, prefs)
                assert len(prefs) == len(set(prefs))
    dispatch.reload_tables()


def test_m_buckets_have_one_definition():
    from sparseq.kernels import configs

    assert configs.M_BUCKETS is dispatch.BUCKET_BOUNDS
    assert [configs.m_bucket(m) for m in dispatch.BUCKET_M] == [1, 16, 64, 256, 1024, 0]
    assert [dispatch.bucket_of(m) for m in dispatch.BUCKET_M] == list(range(len(dispatch.BUCKET_NAMES)))


def test_layers_use_their_table_op(monkeypatch):
    from torch import nn

    import sparseq.nn

    seen = []
    monkeypatch.setattr(dispatch, "preferences", lambda op, *a: seen.append(op) or ["reference"])
    lin = nn.Linear(32, 16)
    for fmt in ("2:4+w8a8", "2:4+int8_weight_only", "w8a8"):
        sparseq.nn.make_layer(lin, fmt, **({"prune": "magnitude"} if "2:4" in fmt else {}))(torch.randn(2, 32))
    # (a CPU layer asks twice: for one intra-op thread and for more)
    assert list(dict.fromkeys(seen)) == ["sparse24_int8_mm", "sparse24_int8_weight_only_mm", "int8_mm"]
