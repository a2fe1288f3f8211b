"""NVFP4: E2M1 elements, blocks of 16 with an FP8 E4M3 scale, and one FP32 global scale.

The format
----------
Two-level scaling. Each 2-D weight matrix has a float32 global scale ``g`` chosen so the block
scales use E4M3's whole range; each block of 16 in_features has a scale ``s`` stored as
float8_e4m3fn (4 exponent bits, 3 mantissa bits, max 448, no Inf); each element is an E2M1 code.
The value is ``value(code) * s / g``.

Scale rule (compressed-tensors' convention)
-------------------------------------------
Following compressed-tensors (quantization/utils/helpers.py ``generate_gparam`` and
``calculate_qparams``), all in float32:

* ``g = 448 * 6 / max(amax_matrix, tiny)``, evaluated as compressed-tensors' torch code does,
  ``fl(fl(1 / amax) * 2688)``; a non-finite ``g`` (matrix amax below ~7.9e-36, e.g. an all-zero
  matrix) becomes 1.0;
* ``s = e4m3(clamp(fl(amax_block / 6) * g, -448, 448))`` (a true division on every device) rounded
  to nearest even; a block scale that rounds to 0 becomes 0.125 (compressed-tensors' E4M3 eps),
  which only happens in blocks whose codes are all zero anyway;
* ``s_eff = float32(s) / g`` and ``q = E2M1(w_fp32 / s_eff)`` (ties to even, saturating at 6).

"Per tensor" means per 2-D matrix: a stacked expert weight ``[E, N, K]`` gets ``E`` global scales
(``global_scale`` shape ``[E, 1]``), so each expert equals a per-expert export. Matrices that the
server fuses must share one global scale (vLLM / SGLang serve an expert's gate_proj and up_proj as
one ``w13`` with the gate's global scale, and q/k/v likewise): quantize the fused ``[gate; up]``
matrix and split it with ``QuantizedTensor.rows``, or pass the max of the parts' ``matrix_amax``
as ``global_amax``. A tensor-parallel shard passes its TP-group max the same way. For an fp32 matrix
whose amax exceeds bf16's max (only fp32 weights can), ``g`` is computed from bf16's max instead,
so the served bf16 weight saturates at about bf16's max instead of overflowing.

The served weight (defined once)
--------------------------------
compressed-tensors' ``NVFP4PackedCompressor.decompress`` (compressors/nvfp4/base.py) unpacks E2M1
values to bf16, converts the E4M3 scale to bf16 (exact), and ``_dequantize``
(quantization/lifecycle/forward_helpers.py) computes ``scale / global_scale`` -- a bf16 tensor
divided by a float32 ``[1]`` tensor, so float32 -- then ``x_q.to(float32) * that`` in float32,
and ``_process_group`` casts the result to bf16. So the served weight is
``bf16(fp32(value(code) * fp32(float32(s) / g)))``, two float32 roundings then one bf16 rounding;
``dequantize`` and ``fake_quantize`` evaluate exactly these ops in this order. (Native FP4 GEMMs,
e.g. CUTLASS in SGLang / vLLM, instead multiply ``value * s`` exactly in the tensor core and apply
``1 / g`` to the float32 accumulator; that differs from this bf16 weight only by bf16 rounding,
at most 2^-9 relative per element.)

On-disk layout: compressed-tensors ``nvfp4-pack-quantized``
-----------------------------------------------------------
``weight_packed`` uint8 ``[N, K/2]`` (even column in the low nibble), ``weight_scale``
float8_e4m3fn ``[N, K/16]``, ``weight_global_scale`` float32 ``[1]`` (``[E, 1]`` for a stack).
ModelOpt's own NVFP4 export stores ``weight_scale_2 = 1 / g`` instead; we do not write that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from int4_qat.formats._common import (
    BF16_MAX,
    QuantFormat,
    QuantizedTensor,
    check_finite,
    check_group_size,
    check_weight,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
    group_view,
    pack_nibbles,
    require_key,
    straight_through,
    true_div,
    unpack_nibbles,
)
from int4_qat.formats.finite import finite_check_mode, report_nonfinite

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "E4M3_MAX",
    "E2M1_MAX",
    "ZERO_SCALE",
    "matrix_amax",
    "global_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack",
    "unpack",
]

DEFAULT_GROUP_SIZE = 16
E4M3_MAX = 448.0
E2M1_MAX = 6.0
#: compressed-tensors' replacement for a block scale that rounds to 0 (``_get_dtype_eps`` for E4M3)
ZERO_SCALE = 0.125
_TINY = torch.finfo(torch.float32).tiny


def matrix_amax(w: Tensor) -> Tensor:
    """max |w| of each 2-D matrix as float32 ``[..., 1]``: what the global scale is computed from.

    Callers whose matrix is split across tensors max-reduce it and pass it back as ``global_amax``:
    a tensor-parallel shard (``all_reduce(a, op=MAX)`` over the TP group), or the gate_proj /
    up_proj (and q/k/v) halves of a fused projection, which vLLM / SGLang serve with ONE global
    scale (vLLM compressed_tensors_moe_w4a4_nvfp4.py takes ``w13_weight_global_scale[:, 0]`` and
    warns "w1_weight_global_scale must match w3_weight_global_scale").
    """
    return w.abs().amax(dim=(-2, -1)).float().unsqueeze(-1)


def _global_scale(amax_blocks: Tensor, global_amax: Tensor | None, name: str) -> Tensor:
    """Per-matrix float32 global scale ``[..., 1]`` from block amaxes ``[..., N, K/16]``."""
    return global_scale(amax_blocks.amax(dim=(-2, -1)).unsqueeze(-1), global_amax, name)


def global_scale(amax: Tensor, global_amax: Tensor | None = None, name: str = "weight") -> Tensor:
    """The float32 global scale ``[..., 1]`` of each matrix from its amax ``[..., 1]`` (float32;
    :func:`matrix_amax`), or from ``global_amax`` when given (validated against ``amax``)."""
    if global_amax is not None:
        if not isinstance(global_amax, Tensor) or global_amax.shape != amax.shape:
            raise ValueError(
                f"{name}: global_amax must be a tensor of shape {tuple(amax.shape)} "
                f"(one per 2-D matrix, see matrix_amax), got "
                f"{getattr(global_amax, 'shape', type(global_amax).__name__)}"
            )
        ga = global_amax.to(device=amax.device, dtype=torch.float32)
        ok = (torch.isfinite(ga) & (ga >= amax)).all()
        if finite_check_mode() == "defer":  # no host sync in a training forward
            report_nonfinite(~ok, f"{name} (global_amax non-finite or below the matrix amax)")
        elif not bool(ok):
            raise ValueError(
                f"{name}: global_amax must be finite and >= the matrix's own amax "
                f"(a max over a larger group), got {ga.flatten().tolist()[:4]} vs "
                f"{amax.flatten().tolist()[:4]}"
            )
        amax = ga
    amax = amax.clamp(min=_TINY, max=BF16_MAX)
    # compressed-tensors writes ``448 * 6 / amax`` with a Python scalar numerator, which torch
    # evaluates as ``amax.reciprocal() * 2688`` (Tensor.__rtruediv__): same ops here, bit for bit.
    g = amax.reciprocal() * (E4M3_MAX * E2M1_MAX)
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))


def _block_scales(amax_blocks: Tensor, g: Tensor) -> Tensor:
    s = (true_div(amax_blocks, E2M1_MAX) * g.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
    s = s.to(torch.float8_e4m3fn).float()
    return torch.where(s == 0, torch.full_like(s, ZERO_SCALE), s).to(torch.float8_e4m3fn)


def _effective(s: Tensor, g: Tensor) -> Tensor:
    """float32(s) / g, broadcast per matrix: compressed-tensors' ``scale / global_scale``."""
    return s.float() / g.unsqueeze(-1)


def _scaled(w: Tensor, group_size: int, name: str, global_amax: Tensor | None = None):
    """-> (w / s_eff float32 ``[..., N, K/16, 16]``, e4m3 scales, global scales, s_eff)."""
    check_group_size(group_size, name, allowed=(DEFAULT_GROUP_SIZE,))
    check_weight(w, group_size, name)
    wg = group_view(w, group_size).float()
    amax_b = wg.abs().amax(dim=-1)
    check_finite(amax_b, name)
    g = _global_scale(amax_b, global_amax, name)
    s = _block_scales(amax_b, g)
    s_eff = _effective(s, g)
    return wg / s_eff.unsqueeze(-1), s, g, s_eff


def _served(values_g: Tensor, s_eff: Tensor) -> Tensor:
    """float32 product of E2M1 values and s_eff, rounded once to bf16 (compressed-tensors)."""
    return (values_g * s_eff.unsqueeze(-1)).to(torch.bfloat16).flatten(-2)


def quantize(
    w: Tensor, group_size: int = DEFAULT_GROUP_SIZE, *, name: str = "weight", global_amax: Tensor | None = None
) -> QuantizedTensor:
    """Quantize ``w [..., N, K]`` to E2M1 codes, E4M3 block scales and float32 global scales.

    ``global_amax`` (float32 ``[..., 1]``, see :func:`matrix_amax`) replaces each matrix's own
    amax in the global scale, for matrices that must share one (TP shards, fused gate/up)."""
    with torch.no_grad():
        x, s, g, _ = _scaled(w, group_size, name, global_amax)
        codes = e2m1_encode(x).flatten(-2)
    return QuantizedTensor(codes=codes, scale=s, global_scale=g, group_size=group_size, fmt=QuantFormat.NVFP4)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The served weight ``bf16(value(code) * (float32(s) / g))``, cast to ``dtype``."""
    _check_qt(q)
    s_eff = _effective(q.scale, q.global_scale)
    return _served(e2m1_decode(group_view(q.codes, q.group_size)), s_eff).to(dtype)


def fake_quantize(
    w: Tensor, group_size: int = DEFAULT_GROUP_SIZE, *, name: str = "weight", global_amax: Tensor | None = None
) -> Tensor:
    """``dequantize(quantize(w))`` cast to ``w.dtype``; backward is the identity (STE).

    Computed without materialising codes (E2M1 values straight from the rounding), which the
    tests hold bit-equal to the decode path."""

    def fn(x: Tensor) -> Tensor:
        scaled, _, _, s_eff = _scaled(x, group_size, name, global_amax)
        return _served(e2m1_round(scaled), s_eff).to(x.dtype)

    return straight_through(w, fn)


def _check_qt(q: QuantizedTensor) -> None:
    if not isinstance(q, QuantizedTensor) or q.fmt != QuantFormat.NVFP4:
        raise ValueError(f"expected an NVFP4 QuantizedTensor, got {getattr(q, 'fmt', type(q).__name__)}")
    if q.global_scale is None:
        raise ValueError("NVFP4 QuantizedTensor has no global_scale")


def pack(q: QuantizedTensor) -> dict[str, Tensor]:
    """compressed-tensors ``nvfp4-pack-quantized``: weight_packed / weight_scale /
    weight_global_scale."""
    _check_qt(q)
    return {
        "weight_packed": pack_nibbles(q.codes).contiguous(),
        "weight_scale": q.scale,
        "weight_global_scale": q.global_scale,
    }


def unpack(tensors: dict[str, Tensor], group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedTensor:
    """Inverse of :func:`pack`; checks dtypes, shapes and that the scales are finite."""
    packed = require_key(tensors, "weight_packed", "NVFP4")
    scale = require_key(tensors, "weight_scale", "NVFP4")
    g = require_key(tensors, "weight_global_scale", "NVFP4")
    check_group_size(group_size, "NVFP4 unpack", allowed=(DEFAULT_GROUP_SIZE,))
    if packed.dtype != torch.uint8 or packed.ndim < 2:
        raise ValueError(
            f"NVFP4 unpack: weight_packed must be uint8 [..., N, K/2], got {packed.dtype} {tuple(packed.shape)}"
        )
    if scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"NVFP4 unpack: weight_scale must be float8_e4m3fn, got {scale.dtype}")
    if g.dtype != torch.float32:
        raise ValueError(f"NVFP4 unpack: weight_global_scale must be float32, got {g.dtype}")
    k = 2 * packed.shape[-1]
    if k % group_size != 0 or tuple(scale.shape) != (*packed.shape[:-1], k // group_size):
        raise ValueError(
            f"NVFP4 unpack: weight_scale shape {tuple(scale.shape)} does not match "
            f"weight_packed shape {tuple(packed.shape)} (expected [..., N, K/16])"
        )
    if tuple(g.shape) != (*packed.shape[:-2], 1):
        raise ValueError(
            f"NVFP4 unpack: weight_global_scale shape {tuple(g.shape)} does not "
            f"match weight_packed shape {tuple(packed.shape)} (expected "
            f"{(*packed.shape[:-2], 1)})"
        )
    sf = scale.float()
    if not bool(torch.isfinite(sf).all()) or bool((sf < 0).any()):
        raise ValueError("NVFP4 unpack: weight_scale holds NaN or negative E4M3 values")
    if not bool(torch.isfinite(g).all()) or bool((g <= 0).any()):
        raise ValueError("NVFP4 unpack: weight_global_scale must be finite and positive")
    return QuantizedTensor(
        codes=unpack_nibbles(packed), scale=scale, global_scale=g, group_size=group_size, fmt=QuantFormat.NVFP4
    )
