"""Triton fake-quant kernels for CUDA tensors (used by ``int4_qat.formats.fused``).

Same ops, same order, same bits as the eager oracle and the C kernels (``_cpu_kernels.c``); the
GPU-specific traps and what avoids each:

* Triton's ``/`` on float32 is an approximate division (``div.full.f32``, ~2 ulp): every division
  is ``tl.div_rn`` (IEEE round-to-nearest, ``div.rn.f32``), never a reciprocal multiply.
* FMA contraction of ``a * b + c``: every launch passes ``enable_fp_fusion=False``.
* libdevice functions (``rint``) are linked with flush-to-zero: round-half-to-even is done with
  the magic constant instead, ``(x + 1.5 * 2^23) - 1.5 * 2^23``, exact in IEEE float32 for
  |x| < 2^22 (every rounded quantity here is below 16); LLVM does not reassociate it (no fast-math
  flags). It returns +0.0 for x in (-0.5, 0]; every use adds +0.0 or rounds |x| anyway.
* bf16 loads are widened on the bits (``<< 16``); bf16 and e4m3 rounding are done on the bits
  (round to nearest even), not by conversions whose rounding / saturation differs across GPU
  generations; fp16 outputs use ``.to(tl.float16)``
  (``cvt.rn.f16.f32``, IEEE RNE with subnormals, as torch's cast).
* amax is an integer max over the bit patterns of |w| (NaN-safe: NaN sorts above Inf); a
  non-finite group sets a device-side flag (``tl.atomic_max``, no host sync) and serves NaN.

Compilation: one kernel per (format, dtype, group size, rule), cached on disk by Triton
(``~/.triton/cache``); sizes are not specialised on, so new shapes do not recompile.

Exactness is tested bitwise against the CPU result by the ``gpu``-marked tests in
tests/test_formats_fused.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from int4_qat.formats import int4, nvfp4
from int4_qat.formats._common import QuantFormat
from int4_qat.formats.finite import report_nonfinite

__all__ = ["available", "why_unavailable", "fake_quantize"]

_ERR: str | None = None
try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001 - no Triton (CPU-only installs): the oracle is used
    triton = tl = None
    _ERR = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def why_unavailable() -> str:
    return _ERR or ("no CUDA device" if not torch.cuda.is_available() else "")


_ROWS = 64  # groups per program
_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}

if triton is not None:
    _MAGIC = 12582912.0  # 1.5 * 2^23

    @triton.jit
    def _rint(x):
        """Round half to even, exact for |x| < 2^22 (see module docstring)."""
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _bf16_bits(v):
        """float32 -> bf16 bits (uint32 in the low 16), round to nearest even."""
        u = v.to(tl.uint32, bitcast=True)
        return (u + 0x7FFF + ((u >> 16) & 1)) >> 16

    @triton.jit
    def _bf16_round(v):
        return (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_groups(x_ptr, pid, n_groups, G: tl.constexpr, ROWS: tl.constexpr, IN_BF16: tl.constexpr):
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        offs = rows[:, None] * G + tl.arange(0, G)[None, :]
        rmask = rows < n_groups
        if IN_BF16:  # bf16 passed as int16 bits: the exact widening, done on the bits
            b = tl.load(x_ptr + offs, mask=rmask[:, None], other=0)
            x = (b.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(x_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        mbits = tl.max(x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, axis=1)
        return x, offs, rows, rmask, mbits

    @triton.jit
    def _finish(out_ptr, flag_ptr, v, offs, rmask, mbits, OUT_KIND: tl.constexpr):
        bad = mbits >= 0x7F800000
        tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), axis=0))
        nan = tl.full(v.shape, float("nan"), tl.float32)
        v = tl.where(bad[:, None], nan, v)
        if OUT_KIND == 0:  # bf16: round on the bits, store through an int16 view
            bits = tl.where(bad[:, None], 0x7FC0, _bf16_bits(v))
            tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=rmask[:, None])
        elif OUT_KIND == 1:
            tl.store(out_ptr + offs, v.to(tl.float16), mask=rmask[:, None])
        else:
            tl.store(out_ptr + offs, v, mask=rmask[:, None])

    @triton.jit
    def _e2m1_value(x, cap):
        """_common._e2m1_round: nearest E2M1 value, ties to even, |value| <= cap, sign of x + 0."""
        src = x + 0.0
        a = tl.abs(src)
        a = tl.where(a > cap, cap, a)
        h = a * 0.5
        h = tl.where(h < 0.5, 0.5, h)
        sb = h.to(tl.uint32, bitcast=True) & 0x7F800000
        step = sb.to(tl.float32, bitcast=True)
        inv = (0x7F000000 - sb).to(tl.float32, bitcast=True)  # 1 / step, exact
        mag = _rint(a * inv) * step
        sign = src.to(tl.uint32, bitcast=True) & 0x80000000
        return (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    # do_not_specialize: one compiled kernel per dtype / group / rule, not per tensor size
    @triton.jit(do_not_specialize=["n_groups"])
    def _int4_kernel(
        x_ptr,
        out_ptr,
        flag_ptr,
        n_groups,
        divisor,
        floor,
        zero_scale,
        smax,
        qmin,
        qmax,
        RULE: tl.constexpr,
        SERVED_EXACT: tl.constexpr,
        OUT_KIND: tl.constexpr,
        G: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        x, offs, rows, rmask, mbits = _load_groups(x_ptr, tl.program_id(0), n_groups, G, ROWS, OUT_KIND == 0)
        s = tl.div_rn(mbits.to(tl.float32, bitcast=True), divisor)
        if RULE == 0:
            s = tl.where(s < floor, floor, s)
        s = _bf16_round(s)
        if RULE == 1:
            s = tl.where(s == 0.0, zero_scale, s)
        s = tl.where(s > smax, smax, s)
        q = _rint(tl.div_rn(x, s[:, None]))
        q = tl.where(q < qmin, qmin, q)
        q = tl.where(q > qmax, qmax, q) + 0.0
        v = q * s[:, None]
        if not SERVED_EXACT:
            v = _bf16_round(v)
        _finish(out_ptr, flag_ptr, v, offs, rmask, mbits, OUT_KIND)

    @triton.jit(do_not_specialize=["n_groups"])
    def _mxfp4_kernel(x_ptr, out_ptr, flag_ptr, n_groups, OUT_KIND: tl.constexpr, ROWS: tl.constexpr):
        x, offs, rows, rmask, mbits = _load_groups(x_ptr, tl.program_id(0), n_groups, 32, ROWS, OUT_KIND == 0)
        # e = ceil(log2(amax / 6)) from the bits (mxfp4._block_exponents); subnormal amax is
        # scaled by 2^64 (exact) first
        sub = mbits < 0x00800000
        scaled = tl.where(
            sub, (mbits.to(tl.float32, bitcast=True) * 18446744073709551616.0).to(tl.uint32, bitcast=True), mbits
        )
        e = (scaled >> 23).to(tl.int32) - 129 + ((scaled & 0x7FFFFF) > 0x400000).to(tl.int32) - tl.where(sub, 64, 0)
        e = tl.where(mbits == 0, -127, e)
        e = tl.minimum(tl.maximum(e, -127), 127)
        p2 = tl.where(e >= -126, ((e + 127).to(tl.uint32) << 23), 0x00400000).to(tl.float32, bitcast=True)
        cap = tl.where(e >= 127, 1.5, tl.where(e >= 126, 3.0, 6.0))
        v = _e2m1_value(tl.div_rn(x, p2[:, None]), cap[:, None]) * p2[:, None]
        _finish(out_ptr, flag_ptr, _bf16_round(v), offs, rmask, mbits, OUT_KIND)

    @triton.jit
    def _e4m3_round(s):
        """Nearest-even float8_e4m3fn value of s in [0, 448] (c10 fp8e4m3fn_from_fp32_value)."""
        sub = tl.div_rn(_rint(s * 512.0), 512.0)
        E = tl.maximum(s.to(tl.uint32, bitcast=True) >> 23, 121)
        quantum = ((E - 3) << 23).to(tl.float32, bitcast=True)
        nrm = _rint(tl.div_rn(s, quantum)) * quantum
        return tl.where(s < 0.015625, sub, nrm)

    @triton.jit(do_not_specialize=["n_groups", "blocks_per_mat"])
    def _nvfp4_kernel(
        x_ptr, out_ptr, flag_ptr, g_ptr, n_groups, blocks_per_mat, OUT_KIND: tl.constexpr, ROWS: tl.constexpr
    ):
        x, offs, rows, rmask, mbits = _load_groups(x_ptr, tl.program_id(0), n_groups, 16, ROWS, OUT_KIND == 0)
        g = tl.load(g_ptr + rows // blocks_per_mat, mask=rmask, other=1.0)
        s = tl.div_rn(mbits.to(tl.float32, bitcast=True), 6.0) * g
        s = tl.where(s > 448.0, 448.0, s)
        s = _e4m3_round(s)
        s = tl.where(s == 0.0, 0.125, s)
        s_eff = tl.div_rn(s, g)
        v = _e2m1_value(tl.div_rn(x, s_eff[:, None]), 6.0) * s_eff[:, None]
        _finish(out_ptr, flag_ptr, _bf16_round(v), offs, rmask, mbits, OUT_KIND)


def supports(fmt: QuantFormat, group_size: int) -> bool:
    """Power-of-two groups only (Triton block shapes); others use the oracle."""
    return group_size >= 2 and group_size & (group_size - 1) == 0


def fake_quantize(fmt: QuantFormat, x: Tensor, group_size: int, name: str, rule: dict) -> Tensor:
    """The fused fake quant of a CUDA tensor ``x`` (checked by the caller; no autograd here)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n_groups = x.numel() // group_size
    if n_groups == 0:
        return out
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    kind = _OUT_KIND[x.dtype]
    dst = out.view(torch.int16) if kind == 0 else out
    src = x.view(torch.int16) if kind == 0 else x
    grid = (triton.cdiv(n_groups, _ROWS),)
    if fmt is QuantFormat.INT4:
        from int4_qat.formats.fused import _int4_params

        served = int4._check_served(rule.get("served", "bf16"), name)
        divisor, rule_id, floor, zero, smax, qmin, qmax = _int4_params(rule.get("scale_rule", "amax/7"), name)
        _int4_kernel[grid](
            src,
            dst,
            flag,
            n_groups,
            divisor,
            floor,
            zero,
            smax,
            qmin,
            qmax,
            RULE=rule_id,
            SERVED_EXACT=served == "exact",
            OUT_KIND=kind,
            G=group_size,
            ROWS=_ROWS,
            enable_fp_fusion=False,
        )
    elif fmt is QuantFormat.MXFP4:
        _mxfp4_kernel[grid](src, dst, flag, n_groups, OUT_KIND=kind, ROWS=_ROWS, enable_fp_fusion=False)
    else:
        amax = nvfp4.matrix_amax(x)
        report_nonfinite(~torch.isfinite(amax).all(), name)  # before global_amax checks, as the oracle
        g = nvfp4.global_scale(amax, rule.get("global_amax"), name).contiguous()
        bpm = x.shape[-2] * x.shape[-1] // 16
        _nvfp4_kernel[grid](src, dst, flag, g, n_groups, bpm, OUT_KIND=kind, ROWS=_ROWS, enable_fp_fusion=False)
    report_nonfinite(flag[0] != 0, name)
    return out
