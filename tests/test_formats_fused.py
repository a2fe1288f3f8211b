"""Fused kernels (int4_qat.formats.fused) are bit-identical to the eager oracle.

Hypothesis fuzzes every format, rule and served rule over shapes, dtypes (bf16, fp16, fp32),
group sizes and value regimes (typical, 60 decades wide, exact ties, subnormal, near the dtype's
max, ±0, all-zero groups, NaN/Inf) on every CPU variant this machine runs, with atol=0 (bit
patterns compared, sign of zero included), for fake quant and for quantize+pack. A kernel built
with value-changing flags (-ffast-math) is shown to fail the same checks, and the flag list is
pinned, so a compiler or flag change that breaks exactness fails this file.
"""
import importlib.util
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import test_formats_fp4 as TF
import test_formats_int4 as T4
from int4_qat.formats import finite_check, fused, get_format, nvfp4, raise_if_nonfinite

VARIANTS = fused.cpu_variants()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
REGIMES = ["normal", "wide", "ties", "tiny", "huge", "nonfinite"]
# (format, group size, rule kwargs)
CASES = ([("int4", g, {"scale_rule": r, "served": s}) for g in (8, 32, 64, 128, 6)
          for r in ("amax/7", "amax/7.5") for s in ("bf16", "exact")]
         + [("mxfp4", 32, {}), ("nvfp4", 16, {}), ("nvfp4", 16, {"global_amax": 1.5})])

needs_kernels = pytest.mark.skipif(not VARIANTS, reason="fused CPU kernels unavailable here")


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float8_e4m3fn, torch.uint8):
        return t.view(torch.uint8)
    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float16: torch.int16,
                                torch.float32: torch.int32}.get(t.dtype, t.dtype))


def make(seed: int, shape, dtype, regime: str, fmt: str, group: int) -> torch.Tensor:
    """The format tests' weight generators (ties placed on that format's grid), brought into
    ``dtype``'s range: "huge" spans the dtype's max, "tiny" its subnormals."""
    if regime == "nonfinite":
        w = TF.make_weight(seed, shape, dtype, "normal", group)
        w.view(-1)[seed % w.numel()] = [float("nan"), float("inf"), -float("inf")][seed % 3]
        return w
    gen = T4.make_weight if fmt == "int4" else TF.make_weight
    if regime == "huge":
        return gen(seed, shape, dtype, regime, group)
    w = gen(seed, shape, torch.float64, regime, group)
    if regime == "tiny":  # 1e-39 scale: fp32/bf16 subnormals; fp16's are around 1e-6
        w = w * (torch.finfo(dtype).tiny / torch.finfo(torch.float32).tiny)
    fmax = torch.finfo(dtype).max
    return w.clamp(-fmax, fmax).to(dtype)


def _rule(rule: dict, w: torch.Tensor) -> dict:
    rule = dict(rule)
    if "global_amax" in rule:  # a shared global amax above the matrix's own (fused gate/up)
        rule["global_amax"] = nvfp4.matrix_amax(w).nan_to_num(0, 0, 0) * rule["global_amax"]
    return rule


def _run(fn):
    try:
        return fn()
    except ValueError as exc:
        return exc


def assert_same(got, want) -> None:
    if isinstance(want, Exception):
        assert isinstance(got, ValueError) and str(got) == str(want)
        return
    assert not isinstance(got, Exception), got
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            assert torch.equal(bits(got[k]), bits(want[k])), k
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


def check_case(variant, fmt, group, rule, w) -> None:
    f = get_format(fmt)
    rule = _rule(rule, w)
    qrule = {k: v for k, v in rule.items() if k != "served"}
    with _variant(variant):
        assert_same(_run(lambda: fused.fake_quantize(fmt, w, group, name="w", **rule)),
                    _run(lambda: f.fake_quantize(w, group, name="w", **rule)))
        if w.shape[-1] % (8 if fmt == "int4" else 2) == 0:
            assert_same(_run(lambda: fused.quantize_pack(fmt, w, group, name="w", **rule)),
                        _run(lambda: f.pack(f.quantize(w, group, name="w", **qrule))))


class _variant:
    """Force one CPU variant (the best one is used otherwise)."""

    def __init__(self, name):
        self.lib, self.name = fused._load(), name

    def __enter__(self):
        self.prev, self.lib.best = self.lib.best, self.name

    def __exit__(self, *exc):
        self.lib.best = self.prev


# ------------------------------------------------------------------------------- fuzzing ---
@needs_kernels
@settings(max_examples=400, deadline=None)
@given(variant=st.sampled_from(VARIANTS or ["none"]), case=st.sampled_from(CASES),
       seed=st.integers(0, 2**31 - 1), lead=st.sampled_from([(), (1,), (3,)]),
       n=st.integers(1, 5), ngroups=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       regime=st.sampled_from(REGIMES))
@example(variant=(VARIANTS or ["none"])[-1], case=CASES[0], seed=1, lead=(3,), n=2, ngroups=2,
         dtype=torch.float16, regime="huge")
@example(variant=(VARIANTS or ["none"])[0], case=CASES[-3], seed=5, lead=(), n=3, ngroups=4,
         dtype=torch.bfloat16, regime="ties")
def test_fused_is_bit_identical_to_the_oracle(variant, case, seed, lead, n, ngroups, dtype, regime):
    fmt, group, rule = case
    w = make(seed, (*lead, n, ngroups * group), dtype, regime, fmt, group)
    check_case(variant, fmt, group, rule, w)


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 32), ("mxfp4", 32), ("nvfp4", 16)])
def test_edges_on_every_variant(variant, fmt, group):
    """Values chosen to break wrong arithmetic: exact ties of the INT4 and E2M1 grids (and their
    neighbours one ulp away), -0.0, all-zero and all -0.0 groups, subnormals, dtype max."""
    for dtype in DTYPES:
        for w in edge_weights(dtype, group):
            for rule in ([{"scale_rule": "amax/7"}, {"scale_rule": "amax/7.5", "served": "exact"}]
                         if fmt == "int4" else [{}]):
                check_case(variant, fmt, group, rule, w)


def edge_weights(dtype, group):
    fmax, tiny = torch.finfo(dtype).max, torch.finfo(dtype).tiny
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.5, 6.5, 4.5], dtype=torch.float64)
    rows = []
    for scale in (1.0, 2.0 ** -8, 3.0, 1 / 7, 1 / 7.5, 1e-3):
        for lead in (7.0, 7.5, 6.0):
            r = (torch.cat([torch.tensor([lead], dtype=torch.float64), ties, -ties])
                 .repeat(group)[:group] * scale).float()
            rows += [r, torch.nextafter(r, torch.full_like(r, 1e9)),
                     torch.nextafter(r, torch.full_like(r, -1e9))]
    rows.append(torch.zeros(group))
    rows.append(torch.full((group,), -0.0))
    lin = torch.linspace(-1, 1, group, dtype=torch.float64)
    rows += [lin * tiny * 3, lin * fmax, lin * fmax / 7,                     # subnormal, max
             torch.full((group,), fmax, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(group // 2)]
    w = torch.stack([r.double() for r in rows]).clamp(-fmax, fmax).to(dtype)   # 60 rows
    assert torch.isfinite(w).all()
    neg = w.clone()
    neg[::2] = -neg[::2]
    return [w, neg, w.reshape(2, 30, group), neg.reshape(-1, 2 * group)]


@needs_kernels
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("mxfp4", 32), ("nvfp4", 16)])
def test_multithreaded_chunks_equal_the_oracle(fmt, group):
    """Large enough to run on several threads (3 here: chunk edges inside matrices)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        w = TF.make_weight(11, (3, 96, 1024), torch.float64, "wide", group).to(torch.bfloat16)
        check_case(VARIANTS[0], fmt, group, {}, w)
    finally:
        torch.set_num_threads(prev)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_amax_equals_the_oracle(dtype):
    for regime in ("normal", "wide", "tiny", "huge", "nonfinite"):
        w = make(4, (3, 5, 48), dtype, regime, "nvfp4", 16)
        assert torch.equal(fused.matrix_amax(w).view(torch.int32), nvfp4.matrix_amax(w).view(torch.int32)) \
            or regime == "nonfinite" and torch.equal(fused.matrix_amax(w).isnan(), nvfp4.matrix_amax(w).isnan())


# ------------------------------------------------------------------- contract around it ---
@needs_kernels
def test_straight_through_and_nothing_saved():
    w = torch.nn.Parameter(torch.randn(8, 128))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fused.fake_quantize("nvfp4", w, 16)
    assert saved == [] and out.requires_grad
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(w.grad, g)


@needs_kernels
def test_defer_mode_flags_without_raising_and_names_the_tensor():
    w = torch.randn(4, 64)
    w[2, 3] = float("nan")
    with finite_check("defer"):
        for fmt, g in (("int4", 32), ("mxfp4", 32), ("nvfp4", 16)):
            out = fused.fake_quantize(fmt, w, g, name=f"{fmt}.experts.0.up_proj.weight")
            assert out[2, :g].isnan().all() and out[0].isfinite().all()   # the bad group: NaN
    with pytest.raises(ValueError, match=r"3 quantized weight\(s\).*int4\.experts\.0\.up_proj"):
        raise_if_nonfinite()


def test_errors_match_the_oracle():
    for fn in (fused.fake_quantize, fused.quantize_pack):
        with pytest.raises(ValueError, match=r"down_proj: last dim .*\(4, 100\).*group_size 128"):
            fn("int4", torch.zeros(4, 100), 128, name="down_proj")
        with pytest.raises(ValueError, match="group_size 32 not supported by this format"):
            fn("nvfp4", torch.zeros(4, 64), 32)
        with pytest.raises(ValueError, match="unknown quant format 'int3'"):
            fn("int3", torch.zeros(4, 64), 32)
        with pytest.raises(TypeError, match=r"mxfp4: unexpected keyword\(s\) \['scale_rule'\]"):
            fn("mxfp4", torch.zeros(4, 64), 32, scale_rule="amax/7")
    with pytest.raises(ValueError, match="unknown INT4 served rule 'fp8'"):
        fused.fake_quantize("int4", torch.zeros(4, 64), 32, served="fp8")


def test_build_flags_are_pinned():
    """Exactness depends on these flags (see _cpu_kernels.c): changing them must be deliberate."""
    assert "-ffp-contract=off" in fused.CFLAGS and "-fsigned-zeros" in fused.CFLAGS
    for bad in ("-ffast-math", "-Ofast", "-funsafe-math-optimizations", "-freciprocal-math",
                "-ffinite-math-only", "-fno-signed-zeros", "-ffp-contract=fast", "-mfma"):
        assert bad not in fused.CFLAGS
    flat = " ".join(f for _, flags in fused._variants() for f in flags)
    assert "fma" not in flat and "fast" not in flat


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_kernels_build_where_a_compiler_exists():
    assert VARIANTS, "a C compiler is present but the fused kernels did not build"


@needs_kernels
def test_value_changing_flags_are_caught(tmp_path, monkeypatch):
    """The same source built with -ffast-math differs from the oracle on the edge weights:
    the checks above are able to fail."""
    monkeypatch.setattr(fused, "CFLAGS", fused.CFLAGS + ("-ffast-math",))
    monkeypatch.setattr(fused, "_variants", lambda: (("generic", ()),))
    path = tmp_path / "fast.so"
    fused._build(fused._compiler(), path)
    lib = fused._CpuLib(path)
    monkeypatch.setattr(fused, "_lib", lib)
    failures = 0
    for fmt, group in (("int4", 32), ("mxfp4", 32), ("nvfp4", 16)):
        for w in edge_weights(torch.bfloat16, group):
            try:
                check_case("generic", fmt, group, {}, w)
            except AssertionError:
                failures += 1
    assert failures > 0


def test_fallback_to_the_oracle_is_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("INT4_QAT_FUSED", "0")
    monkeypatch.setattr(fused, "_logged", set())
    w = torch.randn(4, 64)
    with caplog.at_level(logging.INFO, logger="int4_qat.formats"):
        a = fused.fake_quantize("int4", w, 32)
        fused.fake_quantize("int4", w, 32)
    assert fused.implementation("cpu") == "oracle"
    assert [r.message for r in caplog.records].count(
        "int4_qat fused kernels disabled (INT4_QAT_FUSED=0): using the eager oracle") == 1
    assert torch.equal(a, get_format("int4").fake_quantize(w, 32))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_unwritable_cache_builds_in_a_temp_dir(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: make the cache path a file instead
        ro = tmp_path / "file"
        ro.write_text("")
    monkeypatch.setenv("INT4_QAT_KERNEL_CACHE", str(ro / "sub"))
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_variants", lambda: (("generic", ()),))
    assert fused.implementation("cpu") == "cpu-generic"
    assert not str(fused._lib.path).startswith(str(ro))


def test_no_compiler_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_logged", set())
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger="int4_qat.formats"):
        assert fused.implementation("cpu") == "oracle"
        w = torch.randn(4, 64)
        assert torch.equal(fused.fake_quantize("mxfp4", w, 32), get_format("mxfp4").fake_quantize(w, 32))
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "no C compiler" in warn[0].message


# ------------------------------------------------------------------------------------ GPU ---
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_in_the_interpreter():
    """The Triton kernels' logic, bit for bit against the oracle, in Triton's CPU interpreter
    (a child process: TRITON_INTERPRET must be set before triton is imported)."""
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "_triton_interpreted.py")],
                       capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "bit-identical to the oracle" in r.stdout



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["normal", "wide", "ties", "tiny", "huge"])
def test_cuda_fused_equals_cpu_bitwise(dtype, regime):
    """Training fake-quantizes on GPUs (Triton), export on CPUs (C): the same bits."""
    assert fused.implementation("cuda") == "triton"
    for fmt, group, rule in CASES:
        for seed in range(3):
            w = make(seed, (3, 64, 4 * group), dtype, regime, fmt, group)
            r = _rule(rule, w)
            want = get_format(fmt).fake_quantize(w, group, **r)
            rc = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
            got = fused.fake_quantize(fmt, w.cuda(), group, **rc).cpu()
            assert torch.equal(bits(got), bits(want)), (fmt, group, rule, seed)
            assert torch.equal(bits(got), bits(fused.fake_quantize(fmt, w, group, **r)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_defer_mode_does_not_sync():
    w = torch.randn(64, 256, device="cuda")
    w[3, 7] = float("nan")
    torch.cuda.synchronize()
    with finite_check("defer"):
        torch.cuda.set_sync_debug_mode("error")   # any device->host sync raises
        try:
            for fmt, g in (("int4", 128), ("mxfp4", 32), ("nvfp4", 16)):
                fused.fake_quantize(fmt, w, g, name=f"{fmt}.w")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match=r"3 quantized weight\(s\)"):
        raise_if_nonfinite()
