"""INT4 W4A16 numerics: an independent numpy reference of the documented rule, exact round trips
through the packed layout, edge cases (ties, -0.0, all-zero groups, subnormals, bf16/fp32 max),
the STE, and error messages."""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from int4_qat.formats import QuantFormat, get_format, int4

RULES = {"amax/7": (7.0, -7, 7), "amax/7.5": (7.5, -8, 7)}


# ---------------------------------------------------------------- reference (numpy, float32) --
def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bfloat16, returned as float32 (overflow -> inf)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def _smax(qext: int) -> np.float32:
    bits = np.array([0x7F7F0000], dtype=np.uint32)  # bf16 max
    while True:
        s = bits.view(np.float32)
        with np.errstate(over="ignore"):
            finite = np.isfinite(bf16_round(s * np.float32(qext)))[0]
        if finite:
            return s[0]
        bits -= 0x10000


SMAX = {r: _smax(max(-lo, hi)) for r, (_, lo, hi) in RULES.items()}


def ref_int4(w: torch.Tensor, group_size: int, rule: str):
    """Group-by-group reference of the documented rule -> (codes, scales, served) numpy."""
    div, qmin, qmax = RULES[rule]
    rows = w.float().numpy().reshape(-1, w.shape[-1])
    ng = w.shape[-1] // group_size
    codes = np.zeros(rows.shape, np.int8)
    scales = np.zeros((rows.shape[0], ng), np.float32)
    served = np.zeros(rows.shape, np.float32)
    with np.errstate(over="ignore"):
        for r, row in enumerate(rows):
            for g in range(ng):
                x = row[g * group_size:(g + 1) * group_size]
                s = np.float32(np.abs(x).max()) / np.float32(div)
                if rule == "amax/7":
                    s = max(s, np.float32(1e-5))
                s = bf16_round(s)[()]
                if rule == "amax/7.5" and s == 0:
                    s = np.float32(2.0 ** -7)
                s = min(s, SMAX[rule])
                q = np.clip(np.round(x / s), qmin, qmax)
                codes[r, g * group_size:(g + 1) * group_size] = q
                scales[r, g] = s
                served[r, g * group_size:(g + 1) * group_size] = bf16_round(q * s) + np.float32(0)
    shape = tuple(w.shape)
    return codes.reshape(shape), scales.reshape(*shape[:-1], ng), served.reshape(shape)


def ref_served_of(codes: np.ndarray, scales: np.ndarray, group_size: int, served: str,
               dtype: torch.dtype) -> torch.Tensor:
    """The served weight from codes and scales, in float64 (exact), then rounded as ``served``
    says: "bf16" rounds to bf16 first, "exact" goes straight to ``dtype``."""
    exact = codes.astype(np.float64) * np.repeat(scales.astype(np.float64), group_size, -1)
    t = torch.from_numpy(exact + 0.0)                          # + 0.0: a zero code serves +0.0
    return (t.to(torch.bfloat16) if served == "bf16" else t).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float16: torch.int16,
                                torch.float32: torch.int32}[t.dtype])


def make_weight(seed: int, shape, dtype, regime: str, group_size: int) -> torch.Tensor:
    """Weights for fuzzing: typical, wide-range, exact ties, subnormal, near-max, with zeros."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if regime == "normal":
        w = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    elif regime == "wide":
        w = torch.randn(n, generator=g, dtype=torch.float64)
        w *= 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 60 - 30)
    elif regime == "ties":  # half-integers times 2^p with amax = 7 * 2^p or 7.5 * 2^p
        ng = n // group_size
        p = torch.randint(-16, 10, (ng, 1), generator=g).double()
        k = torch.randint(-15, 16, (ng, group_size), generator=g).double() / 2
        k[:, 0] = torch.where(torch.rand(ng, generator=g) < 0.5, 7.0, -7.5)
        w = (k * torch.exp2(p)).reshape(-1)
    elif regime == "tiny":
        w = torch.randn(n, generator=g, dtype=torch.float64) * 1e-39
    else:  # "huge"
        fmax = torch.finfo(dtype).max
        w = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * fmax
    w = w.to(dtype)
    special = torch.rand(n, generator=g) < 0.05
    w[special] = torch.tensor([0.0, -0.0], dtype=dtype)[torch.randint(0, 2, (int(special.sum()),),
                                                                     generator=g)]
    w = w.reshape(shape)
    if torch.rand(1, generator=g).item() < 0.3:  # an all-zero (or all -0.0) group
        w[..., 0, :group_size] = -0.0 if torch.rand(1, generator=g).item() < 0.5 else 0.0
    return w


REGIMES = ["normal", "wide", "ties", "tiny", "huge"]


# ------------------------------------------------------------------------------- fuzzing ---
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lead=st.sampled_from([(), (1,), (2,)]),
       n=st.integers(1, 4), ngroups=st.integers(1, 3), group_size=st.sampled_from([8, 32, 64, 128]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       rule=st.sampled_from(list(RULES)), regime=st.sampled_from(REGIMES))
@example(seed=1, lead=(2,), n=3, ngroups=2, group_size=32, dtype=torch.bfloat16, rule="amax/7",
         regime="ties")
@example(seed=2, lead=(), n=2, ngroups=1, group_size=128, dtype=torch.float32, rule="amax/7.5",
         regime="huge")
@example(seed=3, lead=(), n=2, ngroups=2, group_size=64, dtype=torch.bfloat16, rule="amax/7.5",
         regime="tiny")
def test_matches_reference_and_round_trips_exactly(seed, lead, n, ngroups, group_size, dtype,
                                                   rule, regime):
    w = make_weight(seed, (*lead, n, ngroups * group_size), dtype, regime, group_size)
    codes, scales, served = ref_int4(w, group_size, rule)

    q = int4.quantize(w, group_size, name="w", scale_rule=rule)
    assert q.codes.dtype == torch.int8 and q.scale.dtype == torch.bfloat16
    np.testing.assert_array_equal(q.codes.numpy(), codes)
    np.testing.assert_array_equal(q.scale.float().numpy(), scales)
    ref_served = torch.from_numpy(served).to(torch.bfloat16)
    assert torch.equal(bits(int4.dequantize(q)), bits(ref_served))

    fq = int4.fake_quantize(w, group_size, name="w", scale_rule=rule)
    rt = int4.dequantize(int4.unpack(int4.pack(q), group_size, scale_rule=rule), w.dtype)
    assert fq.dtype == w.dtype and fq.shape == w.shape
    assert torch.equal(bits(fq), bits(rt))                       # atol=0, rtol=0, sign of zero
    assert torch.equal(bits(fq), bits(ref_served.to(w.dtype)))
    assert torch.isfinite(fq).all()
    for served in int4.SERVED_RULES:                             # the served-weight rule
        want = bits(ref_served_of(codes, scales, group_size, served, w.dtype))
        assert torch.equal(bits(int4.dequantize(q, w.dtype, served=served)), want)
        assert torch.equal(bits(int4.fake_quantize(w, group_size, name="w", scale_rule=rule,
                                                   served=served)), want)


def test_ties_round_half_to_even():
    s = 2.0 ** -4                                                  # amax = 7 * 2^-4 -> s = 2^-4
    k = torch.tensor([7.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -6.5, 4.5, 5.5, 6.5, 0, 1, 2, 3])
    w = (k * s).reshape(1, 16)
    q = int4.quantize(w, 16)
    assert q.scale.item() == s
    assert q.codes.tolist() == [[7, 0, 2, 2, 4, 0, -2, -2, -6, 4, 6, 6, 0, 1, 2, 3]]


def test_negative_zero_and_all_zero_groups():
    w = torch.zeros(2, 64, dtype=torch.bfloat16)
    w[0] = -0.0
    w[1, 32:] = torch.linspace(-1, 1, 32)
    for rule, zero_scale in (("amax/7", torch.tensor(1e-5).bfloat16()),
                             ("amax/7.5", torch.tensor(2.0 ** -7).bfloat16())):
        q = int4.quantize(w, 32, scale_rule=rule)
        assert torch.equal(q.scale[:, 0], zero_scale.expand(2))
        fq = int4.fake_quantize(w, 32, scale_rule=rule)
        assert not torch.signbit(fq[0]).any() and (fq[0] == 0).all()  # served zero is +0.0
        assert (fq[1, :32] == 0).all()


def test_grid_and_scale_rules():
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0 - 2 ** -8] + [0.0] * 4])
    q7 = int4.quantize(w, 8)                                     # s = bf16(1/7), codes in [-7, 7]
    assert q7.scale.item() == torch.tensor(1 / 7).bfloat16().item()
    assert q7.codes[0, 0].item() == -7
    q75 = int4.quantize(w, 8, scale_rule="amax/7.5")            # s = bf16(1/7.5), -8 reachable
    assert q75.scale.item() == torch.tensor(1 / 7.5).bfloat16().item()
    assert q75.codes[0, 0].item() == -7                          # 1 / bf16(1/7.5) = 7.48 -> -7
    assert int4.quantize(torch.tensor([[-1.0] + [0.125] * 7]), 8,
                         scale_rule="amax/7.5").codes.min().item() >= -8


def test_served_weight_is_the_bf16_product_of_the_stored_scale():
    # q * s needs more than bf16's 8 significant bits: the served weight is that product rounded
    # once to bf16, and fake_quantize of an fp32 weight returns exactly that (not the fp32 value).
    s = 255 / 256                                      # a bf16 scale with all 8 bits significant
    w = torch.tensor([[7 * s, 5 * s, 3 * s, -7 * s] * 8], dtype=torch.float32)
    q = int4.quantize(w, 32)
    assert q.scale.float().unique().tolist() == [s] and q.codes[0, :4].tolist() == [7, 5, 3, -7]
    exact = q.codes.double() * q.scale.double().repeat_interleave(32, -1)
    fq = int4.fake_quantize(w, 32)
    assert torch.equal(fq, exact.float().bfloat16().float())
    assert not torch.equal(fq.double(), exact)                   # the rounding is really there


def test_served_exact_is_the_float32_product_for_float32_decoders():
    # llama.cpp Q4_0 decodes (nibble - 8) * d in float32: the exact product, not bf16(q * s).
    s = 255 / 256
    w = torch.tensor([[7 * s, 5 * s, 3 * s, -7 * s] * 8], dtype=torch.float32)
    q = int4.quantize(w, 32)
    exact = q.codes.float() * q.scale.float().repeat_interleave(32, -1)
    assert torch.equal(int4.dequantize(q, torch.float32, served="exact"), exact)
    assert torch.equal(int4.fake_quantize(w, 32, served="exact"), exact)
    bf = int4.fake_quantize(w, 32, served="bf16")
    assert torch.equal(bf, exact.bfloat16().float()) and not torch.equal(bf, exact)
    # codes and scales do not depend on the rule; for bf16 outputs both rules give the same bits
    wb = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(bits(int4.fake_quantize(wb, 32, served="exact")),
                       bits(int4.fake_quantize(wb, 32, served="bf16")))
    qb = int4.quantize(wb, 32)
    assert torch.equal(bits(int4.dequantize(qb, served="exact")), bits(int4.dequantize(qb)))
    # fp16 outputs: the exact product rounded once to fp16 (not via bf16)
    wh = torch.tensor([[7 * s, 5 * s, 3 * s, -7 * s] * 8], dtype=torch.float16)
    qh = int4.quantize(wh, 32)
    exact_h = (qh.codes.float() * qh.scale.float().repeat_interleave(32, -1)).half()
    assert torch.equal(int4.fake_quantize(wh, 32, served="exact"), exact_h)
    assert torch.equal(int4.dequantize(qh, torch.float16, served="exact"), exact_h)
    # the STE holds for both
    p = torch.nn.Parameter(w.clone())
    int4.fake_quantize(p, 32, served="exact").sum().backward()
    assert torch.equal(p.grad, torch.ones_like(w))


def test_served_rule_is_validated():
    with pytest.raises(ValueError, match=r"experts\.0\.up_proj: unknown INT4 served rule 'fp16'"):
        int4.fake_quantize(torch.zeros(2, 32), 32, name="experts.0.up_proj", served="fp16")
    with pytest.raises(ValueError, match="unknown INT4 served rule 'fp32'"):
        int4.dequantize(int4.quantize(torch.zeros(2, 32), 32), served="fp32")


def test_error_bound_on_gaussian_weights():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    for g in int4.MARLIN_GROUP_SIZES:
        q = int4.quantize(w, g)
        err = (int4.fake_quantize(w, g) - w).abs()
        bound = q.scale.float().repeat_interleave(g, -1) * 0.5 * (1 + 2 ** -7) + w.abs() * 2 ** -8
        assert (err <= bound).all()
        assert 0.05 < (err.pow(2).mean() / w.pow(2).mean()).sqrt().item() < 0.2


def test_near_max_weights_stay_finite():
    for dtype in (torch.bfloat16, torch.float32):
        fmax = torch.finfo(dtype).max
        w = torch.tensor([[fmax, -fmax, fmax / 2, 1.0] * 8], dtype=dtype)
        for rule in RULES:
            q = int4.quantize(w, 32, scale_rule=rule)
            assert q.scale.item() == int4.S_MAX[rule].item()
            out = int4.fake_quantize(w, 32, scale_rule=rule)
            assert torch.isfinite(out).all() and out[0, 0] > 0.85 * torch.finfo(torch.bfloat16).max


def test_stacked_experts_equal_per_expert():
    w = torch.randn(3, 16, 128, dtype=torch.bfloat16)
    q = int4.quantize(w, 64)
    for e in range(3):
        qe = int4.quantize(w[e], 64)
        assert torch.equal(q.expert(e).codes, qe.codes) and torch.equal(q.expert(e).scale, qe.scale)


def test_pack_layout_uint4b8_lowest_nibble_first():
    codes = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    q = int4.quantize(torch.zeros(1, 16), 16)
    q = type(q)(codes, q.scale, None, 16, QuantFormat.INT4)
    t = int4.pack(q)
    assert t["weight_packed"].dtype == torch.int32
    assert t["weight_packed"].tolist() == [[0x76543210, 0xFEDCBA98 - 2**32]]
    assert t["weight_shape"].tolist() == [1, 16] and t["weight_shape"].dtype == torch.int64
    assert torch.equal(int4.unpack(t, 16, scale_rule="amax/7.5").codes, codes)


def test_straight_through_estimator_saves_nothing():
    w = torch.nn.Parameter(torch.randn(8, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = int4.fake_quantize(w, 32)
    assert saved == [] and out.requires_grad
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(w.grad, g)
    with torch.no_grad():
        assert not int4.fake_quantize(w, 32).requires_grad


def test_get_format():
    assert get_format("int4") is int4 and get_format(QuantFormat.INT4) is int4
    with pytest.raises(ValueError, match="unknown quant format 'int3'"):
        get_format("int3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises_naming_tensor(bad):
    w = torch.zeros(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.experts\.1\.up_proj.*NaN or Inf"):
        int4.fake_quantize(w, 32, name="layers.3.mlp.experts.1.up_proj")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"down_proj: last dim .*\(4, 100\).*group_size 128"):
        int4.quantize(torch.zeros(4, 100), 128, name="down_proj")
    with pytest.raises(ValueError, match="unknown INT4 scale_rule 'amax/8'"):
        int4.quantize(torch.zeros(4, 128), scale_rule="amax/8")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        int4.quantize(torch.zeros(4, 128), 0)
    with pytest.raises(ValueError, match=r"w: expected a weight of shape \[\.\.\., N, K\]"):
        int4.quantize(torch.zeros(128), name="w")
    with pytest.raises(ValueError, match="dtype torch.int32 not supported"):
        int4.quantize(torch.zeros(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="expected an INT4 QuantizedTensor"):
        int4.pack(get_format("mxfp4").quantize(torch.zeros(2, 32)))


def test_unpack_validates():
    t = int4.pack(int4.quantize(torch.randn(4, 128), 64, scale_rule="amax/7.5"))
    with pytest.raises(ValueError, match="missing key 'weight_scale'"):
        int4.unpack({k: v for k, v in t.items() if k != "weight_scale"}, 64)
    with pytest.raises(ValueError, match=r"weight_scale shape \(4, 2\) does not match .*group_size 32"):
        int4.unpack(t, 32)
    with pytest.raises(ValueError, match="weight_shape"):
        int4.unpack({**t, "weight_shape": torch.tensor([4, 64])}, 64)
    with pytest.raises(ValueError, match="weight_scale must be bfloat16"):
        int4.unpack({**t, "weight_scale": t["weight_scale"].half()}, 64)
    codes = torch.full((4, 128), -8, dtype=torch.int8)
    q = int4.quantize(torch.zeros(4, 128), 64)
    t = int4.pack(type(q)(codes, q.scale, None, 64, QuantFormat.INT4))
    with pytest.raises(ValueError, match=r"code -8, outside the \[-7, 7\] grid"):
        int4.unpack(t, 64)
    assert int4.unpack(t, 64, scale_rule="amax/7.5").codes.min().item() == -8
