"""MXFP4 and NVFP4 numerics: E2M1 rounding, independent numpy references of the documented scale
rules and served weights, exact round trips through the packed layouts, edges (ties, -0.0,
all-zero blocks, subnormals, bf16/fp32 max), the STE, and error messages."""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from int4_qat.formats import QuantFormat, mxfp4, nvfp4
from int4_qat.formats._common import E2M1_VALUES, e2m1_decode, e2m1_encode, e2m1_round

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
F32 = np.float32


# ------------------------------------------------------------------- references (numpy) ----
def bf16_round(x) -> np.ndarray:
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def ref_e2m1(x, max_mag: float = 6.0):
    """Nearest E2M1 value, ties to the even code, magnitude capped at max_mag -> (codes, values)."""
    x = np.asarray(x, dtype=np.float64)
    d = np.abs(np.minimum(np.abs(x), 6.0)[..., None] - E2M1)
    best = d == d.min(-1, keepdims=True)
    even = best & (np.arange(8) % 2 == 0)
    idx = np.where(even.any(-1), even.argmax(-1), best.argmax(-1))
    idx = np.minimum(idx, int(np.searchsorted(E2M1, max_mag)))
    neg = x < 0
    return (idx + 8 * neg).astype(np.uint8), np.where(neg, -E2M1[idx], E2M1[idx])


def ref_e4m3(s: float) -> float:
    """Round a non-negative float to float8_e4m3fn (nearest even; caller clamps to 448)."""
    if s == 0:
        return 0.0
    e = max(math.floor(math.log2(s)), -6)
    if 2.0 ** (e + 1) <= s:
        e += 1
    quantum = 2.0 ** (e - 3)
    return float(np.round(s / quantum)) * quantum


def ref_mxfp4(w: torch.Tensor):
    rows = w.float().numpy().reshape(-1, 32)
    codes, served, scales = [], [], []
    for x in rows:
        amax = float(np.abs(x).max())
        if amax == 0:
            e = -127
        else:
            e = math.ceil(math.log2(amax / 6))
            while math.ldexp(6, e) < amax:
                e += 1
            while math.ldexp(6, e - 1) >= amax:
                e -= 1
            e = min(max(e, -127), 127)
        cap = 3.0 if e == 126 else (1.5 if e == 127 else 6.0)
        c, v = ref_e2m1(x / F32(2.0 ** e), cap)            # float32 division (may underflow)
        codes.append(c)
        scales.append(e + 127)
        served.append(v * 2.0 ** e)
    shape = tuple(w.shape)
    return (np.array(codes).reshape(shape), np.array(scales, np.uint8).reshape(*shape[:-1], -1),
            bf16_round(np.array(served, np.float32)).reshape(shape))


def ref_nvfp4(w: torch.Tensor):
    mats = w.float().numpy().reshape(-1, *w.shape[-2:])
    codes, served, scales, gs = [], [], [], []
    with np.errstate(over="ignore", divide="ignore"):
        for m in mats:
            amax = np.abs(m).max()
            a = min(max(amax, np.finfo(np.float32).tiny), F32(BF16_MAX))
            g = (F32(1) / F32(a)) * F32(2688)               # compressed-tensors' op order
            g = g if np.isfinite(g) else F32(1.0)
            gs.append(g)
            for x in m.reshape(-1, 16):
                s = (np.abs(x).max() / F32(6)) * g
                s = F32(ref_e4m3(float(min(s, F32(448))))) or F32(0.125)
                s_eff = s / g
                c, v = ref_e2m1(x / s_eff)
                codes.append(c)
                scales.append(s)
                served.append(v.astype(np.float32) * s_eff)
    shape = tuple(w.shape)
    return (np.array(codes).reshape(shape), np.array(scales).reshape(*shape[:-1], -1),
            np.array(gs, np.float32).reshape(*shape[:-2], 1),
            bf16_round(np.array(served, np.float32)).reshape(shape))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float32: torch.int32}[t.dtype])


def make_weight(seed: int, shape, dtype, regime: str, group_size: int) -> torch.Tensor:
    """Weights for fuzzing: typical, wide-range, exact E2M1 ties, subnormal, near-max, zeros."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if regime == "normal":
        w = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    elif regime == "wide":
        w = torch.randn(n, generator=g, dtype=torch.float64)
        w *= 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 60 - 30)
    elif regime == "ties":  # E2M1 midpoints times 2^p, block amax = 6 * 2^p
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 3.0], dtype=torch.float64)
        ng = n // group_size
        k = ties[torch.randint(0, len(ties), (ng, group_size), generator=g)]
        k *= torch.where(torch.rand(ng, group_size, generator=g) < 0.5, -1.0, 1.0)
        k[:, 0] = 6.0
        w = (k * torch.exp2(torch.randint(-20, 10, (ng, 1), generator=g).double())).reshape(-1)
    elif regime == "tiny":
        w = torch.randn(n, generator=g, dtype=torch.float64) * 1e-39
    else:  # "huge"
        w = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * torch.finfo(dtype).max
    w = w.to(dtype)
    special = torch.rand(n, generator=g) < 0.05
    w[special] = torch.tensor([0.0, -0.0], dtype=dtype)[torch.randint(0, 2, (int(special.sum()),),
                                                                     generator=g)]
    w = w.reshape(shape)
    if torch.rand(1, generator=g).item() < 0.3:
        w[..., 0, :group_size] = -0.0
    return w


REGIMES = ["normal", "wide", "ties", "tiny", "huge"]
FUZZ = dict(seed=st.integers(0, 2**31 - 1), lead=st.sampled_from([(), (1,), (2,)]),
            n=st.integers(1, 4), ngroups=st.integers(1, 3),
            dtype=st.sampled_from([torch.bfloat16, torch.float32]), regime=st.sampled_from(REGIMES))


# ---------------------------------------------------------------------------------- E2M1 ---
def test_e2m1_rounding_ties_to_even_and_saturates():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.tensor(mids + [0.0, -0.0, 0.1, -0.1, 6.0, 7.0, 1e30, 5.0 + 2 ** -20, -2.5])
    x = torch.cat([x, torch.nextafter(x, torch.full_like(x, 10.0)),
                   torch.nextafter(x, torch.full_like(x, -10.0)),
                   torch.linspace(-8, 8, 4001)])
    codes = e2m1_encode(x)
    ref_codes, ref_vals = ref_e2m1(x.numpy())
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    np.testing.assert_array_equal(e2m1_decode(codes).numpy(), ref_vals.astype(np.float32))
    # the fake-quant path rounds to values directly; it must agree with encode -> decode bitwise
    assert torch.equal(e2m1_round(x).view(torch.int32), e2m1_decode(codes).view(torch.int32))
    for cap in (3.0, 1.5):
        capped = e2m1_encode(x, torch.tensor(cap))
        assert e2m1_decode(capped).abs().max().item() == cap
        assert torch.equal(e2m1_round(x, cap).view(torch.int32),
                           e2m1_decode(capped).view(torch.int32))
    assert e2m1_encode(torch.tensor(mids)).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert e2m1_encode(torch.tensor([-0.0, -0.1, 0.0])).tolist() == [0, 8, 0]   # w < 0 -> sign


def test_e2m1_table():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    assert vals.tolist() == list(E2M1_VALUES) and torch.signbit(vals[8])
    assert torch.equal(e2m1_encode(vals[:8]), codes[:8])


# --------------------------------------------------------------------------------- MXFP4 ---
@settings(max_examples=50, deadline=None)
@given(**FUZZ)
@example(seed=1, lead=(2,), n=2, ngroups=2, dtype=torch.bfloat16, regime="ties")
@example(seed=2, lead=(), n=2, ngroups=3, dtype=torch.bfloat16, regime="huge")
@example(seed=3, lead=(), n=3, ngroups=1, dtype=torch.float32, regime="huge")
@example(seed=4, lead=(1,), n=2, ngroups=2, dtype=torch.float32, regime="tiny")
def test_mxfp4_matches_reference_and_round_trips(seed, lead, n, ngroups, dtype, regime):
    w = make_weight(seed, (*lead, n, 32 * ngroups), dtype, regime, 32)
    codes, scales, served = ref_mxfp4(w)
    q = mxfp4.quantize(w, name="w")
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.uint8
    np.testing.assert_array_equal(q.scale.numpy(), scales)
    np.testing.assert_array_equal(q.codes.numpy(), codes)
    ref = torch.from_numpy(served).to(torch.bfloat16)
    assert torch.equal(bits(mxfp4.dequantize(q)), bits(ref))
    fq = mxfp4.fake_quantize(w)
    assert fq.dtype == w.dtype and torch.isfinite(fq).all()
    assert torch.equal(bits(fq), bits(mxfp4.dequantize(mxfp4.unpack(mxfp4.pack(q)), w.dtype)))
    assert torch.equal(bits(fq), bits(mxfp4.dequantize(mxfp4.unpack_gpt_oss(
        *mxfp4.pack_gpt_oss(q)), w.dtype)))
    assert torch.equal(bits(fq), bits(ref.to(dtype)))


def test_mxfp4_scale_rule_is_smallest_power_of_two_that_does_not_clip():
    amax = torch.tensor([6.0, 6.0 * (1 + 2 ** -23), 3.0, 5.9, 1.0, 0.0, 2.0 ** -140, 1e-3])
    w = torch.zeros(len(amax), 32)
    w[:, 3] = -amax
    e = mxfp4.quantize(w).scale[:, 0].int() - 127
    assert e.tolist() == [0, 1, -1, 0, -2, -127, -127, -12]
    for a, ei in zip(amax.tolist(), e.tolist(), strict=True):
        assert a <= 6 * 2.0 ** ei and (ei == -127 or a > 6 * 2.0 ** (ei - 1))


def test_mxfp4_near_bf16_max_saturates_instead_of_overflowing():
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.full((1, 32), torch.finfo(dtype).max, dtype=dtype)
        w[0, 1::2] *= -1
        q = mxfp4.quantize(w)
        assert q.scale.unique().tolist() == [126 + 127]
        assert (q.codes & 7).max().item() == 5                           # 3 * 2^126, not 4 * 2^126
        out = mxfp4.fake_quantize(w)
        assert torch.isfinite(out).all() and out[0, 0].item() == 3 * 2.0 ** 126


def test_mxfp4_layouts():
    codes = torch.tensor([[1, 2, 15, 8] * 8], dtype=torch.uint8)
    q = mxfp4.quantize(torch.zeros(1, 32))
    q = type(q)(codes, torch.tensor([[130]], dtype=torch.uint8), None, 32, QuantFormat.MXFP4)
    t = mxfp4.pack(q)
    assert set(t) == {"weight_packed", "weight_scale"}
    assert t["weight_packed"].tolist() == [[0x21, 0x8F] * 8]           # low nibble = even column
    blocks, scales = mxfp4.pack_gpt_oss(q)
    assert blocks.shape == (1, 1, 16) and torch.equal(blocks.reshape(1, 16), t["weight_packed"])
    assert torch.equal(scales, t["weight_scale"])
    assert mxfp4.dequantize(q, torch.float32)[0, :4].tolist() == [4.0, 8.0, -48.0, -0.0]


def test_mxfp4_error_bound():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    q = mxfp4.quantize(w)
    err = (mxfp4.fake_quantize(w) - w).abs()
    step = torch.exp2(q.scale.float() - 127).repeat_interleave(32, -1)     # E2M1 spacing <= 2 * 2^e
    assert (err <= step * 1.0 + w.abs() * 2 ** -8).all()
    assert 0.05 < (err.pow(2).mean() / w.pow(2).mean()).sqrt().item() < 0.2


# --------------------------------------------------------------------------------- NVFP4 ---
@settings(max_examples=40, deadline=None)
@given(**FUZZ)
@example(seed=1, lead=(2,), n=2, ngroups=2, dtype=torch.bfloat16, regime="ties")
@example(seed=2, lead=(), n=2, ngroups=3, dtype=torch.bfloat16, regime="huge")
@example(seed=3, lead=(), n=3, ngroups=1, dtype=torch.float32, regime="huge")
@example(seed=4, lead=(1,), n=2, ngroups=2, dtype=torch.float32, regime="tiny")
def test_nvfp4_matches_reference_and_round_trips(seed, lead, n, ngroups, dtype, regime):
    w = make_weight(seed, (*lead, n, 16 * ngroups), dtype, regime, 16)
    codes, scales, gs, served = ref_nvfp4(w)
    q = nvfp4.quantize(w, name="w")
    assert q.scale.dtype == torch.float8_e4m3fn and q.global_scale.dtype == torch.float32
    np.testing.assert_array_equal(q.global_scale.numpy(), gs)
    np.testing.assert_array_equal(q.scale.float().numpy(), scales)
    np.testing.assert_array_equal(q.codes.numpy(), codes)
    ref = torch.from_numpy(served).to(torch.bfloat16)
    assert torch.equal(bits(nvfp4.dequantize(q)), bits(ref))
    fq = nvfp4.fake_quantize(w)
    assert fq.dtype == w.dtype and torch.isfinite(fq).all()
    assert torch.equal(bits(fq), bits(nvfp4.dequantize(nvfp4.unpack(nvfp4.pack(q)), w.dtype)))
    assert torch.equal(bits(fq), bits(ref.to(dtype)))


def test_nvfp4_global_scale_is_per_matrix():
    w = torch.randn(3, 8, 64) * torch.tensor([1.0, 100.0, 1e-3]).view(3, 1, 1)
    q = nvfp4.quantize(w)
    assert q.global_scale.shape == (3, 1)
    for e in range(3):
        qe = nvfp4.quantize(w[e])
        assert qe.global_scale.shape == (1,)
        assert torch.equal(q.expert(e).global_scale, qe.global_scale)
        assert torch.equal(q.expert(e).codes, qe.codes)
        assert torch.equal(nvfp4.dequantize(q.expert(e)), nvfp4.dequantize(qe))
    assert torch.allclose(q.global_scale[:, 0] * w.abs().amax((1, 2)), torch.tensor(2688.0))


def test_nvfp4_shared_global_scale_for_fused_and_sharded_matrices():
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen) * 3
    fused = nvfp4.quantize(torch.cat([gate, up]))           # Megatron linear_fc1 [gate; up]
    shared = torch.maximum(nvfp4.matrix_amax(gate), nvfp4.matrix_amax(up))
    for part, rows in ((gate, (0, 8)), (up, (8, 16))):
        alone = nvfp4.quantize(part, global_amax=shared)
        half = fused.rows(*rows)
        assert torch.equal(half.global_scale, fused.global_scale)
        assert torch.equal(half.codes, alone.codes) and torch.equal(half.global_scale,
                                                                   alone.global_scale)
        assert torch.equal(nvfp4.dequantize(half), nvfp4.fake_quantize(part, global_amax=shared))
    assert not torch.equal(nvfp4.quantize(gate).global_scale, fused.global_scale)
    # tensor-parallel shards (column- and row-parallel) with the max-reduced amax == unsharded
    w = torch.randn(16, 128, generator=gen)
    for dim in (0, 1):
        shards = w.chunk(2, dim=dim)
        amax = torch.stack([nvfp4.matrix_amax(p) for p in shards]).amax(0)
        out = torch.cat([nvfp4.fake_quantize(p, global_amax=amax) for p in shards], dim=dim)
        assert torch.equal(out, nvfp4.fake_quantize(w))


def test_nvfp4_global_amax_validation():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"fc1: global_amax must be finite and >= the matrix"):
        nvfp4.quantize(w, name="fc1", global_amax=nvfp4.matrix_amax(w) / 2)
    with pytest.raises(ValueError, match=r"fc1: global_amax must be a tensor of shape \(1,\)"):
        nvfp4.fake_quantize(w, name="fc1", global_amax=torch.ones(2))
    with pytest.raises(ValueError, match=r"rows\(2, 9\) out of range for 4 rows"):
        nvfp4.quantize(w).rows(2, 9)


def test_nvfp4_zero_and_tiny_matrices():
    q = nvfp4.quantize(torch.zeros(2, 32))
    assert q.global_scale.tolist() == [1.0] and (q.scale.float() == 0.125).all()
    assert (nvfp4.dequantize(q) == 0).all()
    w = torch.full((2, 32), 1e-37)                                    # 2688 / amax overflows
    q = nvfp4.quantize(w)
    assert q.global_scale.tolist() == [1.0] and (nvfp4.fake_quantize(w) == 0).all()


def test_nvfp4_near_max_stays_finite():
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(4, 64).to(dtype)
        w[0, 0] = torch.finfo(dtype).max
        w[1, 3] = -torch.finfo(dtype).max
        out = nvfp4.fake_quantize(w)
        assert torch.isfinite(out).all() and out[0, 0].item() >= 0.99 * BF16_MAX


def test_nvfp4_error_bound():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    q = nvfp4.quantize(w)
    err = (nvfp4.fake_quantize(w) - w).abs()
    s_eff = (q.scale.float() / q.global_scale).repeat_interleave(16, -1)
    assert (err <= s_eff * 1.0 + w.abs() * 2 ** -8).all()
    assert 0.04 < (err.pow(2).mean() / w.pow(2).mean()).sqrt().item() < 0.15


def test_nvfp4_layout():
    t = nvfp4.pack(nvfp4.quantize(torch.randn(2, 3, 32)))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "weight_packed": (torch.uint8, (2, 3, 16)),
        "weight_scale": (torch.float8_e4m3fn, (2, 3, 2)),
        "weight_global_scale": (torch.float32, (2, 1))}


# ------------------------------------------------------------------------ STE and errors ---
@pytest.mark.parametrize("fmt", [mxfp4, nvfp4])
def test_straight_through_estimator_saves_nothing(fmt):
    w = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fmt.fake_quantize(w)
    assert saved == [] and out.requires_grad and out.dtype == torch.bfloat16
    g = torch.randn_like(out)
    (out * g.detach()).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("fmt,g", [(mxfp4, 32), (nvfp4, 16)])
def test_errors_name_the_tensor(fmt, g):
    w = torch.zeros(2, 4 * g)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj: weight contains NaN or Inf"):
        fmt.fake_quantize(w, name="experts.0.gate_proj")
    with pytest.raises(ValueError, match=rf"fc1: last dim .*\(2, {g + 2}\).*group_size {g}"):
        fmt.quantize(torch.zeros(2, g + 2), name="fc1")
    with pytest.raises(ValueError, match=rf"fc1: group_size 64 not supported .*\[{g}\]"):
        fmt.quantize(torch.zeros(2, 128), 64, name="fc1")


def test_unpack_validates():
    t = mxfp4.pack(mxfp4.quantize(torch.randn(4, 64)))
    with pytest.raises(ValueError, match="MXFP4 unpack: missing key 'weight_scale'"):
        mxfp4.unpack({"weight_packed": t["weight_packed"]})
    with pytest.raises(ValueError, match="E8M0 byte 255"):
        mxfp4.unpack({**t, "weight_scale": torch.full_like(t["weight_scale"], 255)})
    with pytest.raises(ValueError, match=r"weight_scale shape \(4, 1\) does not match"):
        mxfp4.unpack({**t, "weight_scale": t["weight_scale"][:, :1]})
    blocks, scales = mxfp4.pack_gpt_oss(mxfp4.quantize(torch.randn(4, 64)))
    with pytest.raises(ValueError, match=r"blocks must be uint8 \[\.\.\., N, K/32, 16\]"):
        mxfp4.unpack_gpt_oss(blocks.reshape(4, 4, 8), scales)
    t = nvfp4.pack(nvfp4.quantize(torch.randn(4, 64)))
    with pytest.raises(ValueError, match="weight_global_scale must be finite and positive"):
        nvfp4.unpack({**t, "weight_global_scale": -t["weight_global_scale"]})
    with pytest.raises(ValueError, match=r"weight_global_scale shape \(2,\)"):
        nvfp4.unpack({**t, "weight_global_scale": t["weight_global_scale"].repeat(2)})
    with pytest.raises(ValueError, match="weight_scale must be float8_e4m3fn"):
        nvfp4.unpack({**t, "weight_scale": t["weight_scale"].float()})
    with pytest.raises(ValueError, match="expected an NVFP4 QuantizedTensor"):
        nvfp4.pack(mxfp4.quantize(torch.zeros(2, 32)))
