"""MXFP4 (OCP Microscaling FP4): E2M1 elements, blocks of 32, one E8M0 power-of-two scale.

The format
----------
Each block of 32 consecutive in_features shares a scale ``2^e`` stored as one byte ``e + 127``
(E8M0: an 8-bit biased exponent, no sign, no mantissa; 255 is NaN). Each element is an E2M1 code
(see ``_common``: magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 = sign).

Scale rule: gpt-oss / ModelOpt
------------------------------
``e = ceil(log2(amax / 6))``, clamped to [-127, 127] (all-zero blocks get ``e = -127``, byte 0),
as ModelOpt's ``MXFP4QTensor.quantize`` (modelopt/torch/quantization/qtensor/mxfp4_tensor.py) and
the FORMATS.md gpt-oss convention. Why this one and not compressed-tensors' observer rule
(``floor(log2(round_to_power_2(amax))) - 2``, quantization/utils/mxfp_utils.py): it is the
smallest power of two that never clips (``amax / 2^e <= 6``), it is what the published gpt-oss
checkpoints and ModelOpt's MXFP4 QAT use, and decoding does not depend on the rule -- every
consumer computes ``value(code) * 2^(byte - 127)``. We evaluate the ceil exactly (float64 log2 of
the float32 amax; a float32 amax is either exactly ``6 * 2^k`` or at least 2^-24 away from it),
where ModelOpt's float32 ``log2`` can land one step low at such edges.

Codes: ``x = w_fp32 / 2^e`` in float32 (exact, except that values below float32's subnormal range
flush toward zero; they round to code 0 either way), then round to E2M1 with ties to even; the
sign bit is ``x < 0``.

The served weight (defined once)
--------------------------------
compressed-tensors (compressors/mxfp4/base.py + mx_utils.py ``decompress_mx_scale``) decodes the
scale to bf16 ``2 ** (byte - 127)`` and multiplies bf16 E2M1 values by it in bf16
(forward_helpers.py ``_dequantize``); transformers' gpt-oss path (integrations/mxfp4.py
``convert_moe_packed_tensors``) looks the codes up in a bf16 table and applies ``torch.ldexp``.
Both products are exact: an E2M1 value times a power of two in [2^-127, 2^127] is representable in
bf16 (subnormals included) unless it overflows. So the served weight is the exact
``value(code) * 2^e`` in bf16; ``dequantize`` / ``fake_quantize`` return it, cast to the dtype.

Overflow edge: bf16's max is 1.99 * 2^127. A block with ``e = 126`` (amax >= 2.98e38, reachable by
bf16 weights near bf16's max and by fp32 weights) would serve ``4 * 2^126 = inf``; we saturate the
code magnitude to 3 there (1.5 for ``e = 127``, which finite fp32 weights never reach), so the
served weight is always finite. NaN / Inf in the weight raise ValueError.

On-disk layouts
---------------
compressed-tensors ``mxfp4-pack-quantized``: ``weight_packed`` uint8 ``[..., N, K/2]`` (even column
in the low nibble), ``weight_scale`` uint8 ``[..., N, K/32]``, no global scale.
gpt-oss native (transformers integrations/mxfp4.py): ``*_blocks`` uint8 ``[..., N, K/32, 16]``
(the same bytes, one row of 16 per block) and ``*_scales`` uint8 ``[..., N, K/32]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from int4_qat.formats._common import (
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
    unpack_nibbles,
)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "E8M0_BIAS",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack",
    "unpack",
    "pack_gpt_oss",
    "unpack_gpt_oss",
]

DEFAULT_GROUP_SIZE = 32
E8M0_BIAS = 127
_E_MIN, _E_MAX = -127, 127  # byte 0 .. 254; 255 is NaN in E8M0


def _block_exponents(amax: Tensor) -> Tensor:
    """amax (float32) -> e = ceil(log2(amax / 6)) clamped to [-127, 127], as int32, exactly.

    With ``amax = m * 2^p`` (frexp, m in [0.5, 1)): ``amax / 6 = (m / 6) * 2^p`` and ``m / 6`` lies
    in [2^-3.58, 2^-2.58), so ``ceil(log2(m / 6))`` is -3 for m <= 0.75 and -2 above. Integer
    arithmetic only: no log2 rounding, identical on every device. amax = 0 gives -127.
    """
    m, p = torch.frexp(amax)
    e = p - 3 + (m > 0.75).to(p.dtype)
    e = torch.where(amax == 0, torch.full_like(e, _E_MIN), e)
    return e.clamp(_E_MIN, _E_MAX).to(torch.int32)


def _max_magnitude(e: Tensor) -> Tensor:
    """Largest E2M1 magnitude whose value * 2^e stays finite in bf16 (max 1.99 * 2^127):
    6 for e <= 125, 3 for e = 126, 1.5 for e = 127; float32 ``[..., 1]`` to broadcast per block."""
    six = torch.full(e.shape, 6.0, dtype=torch.float32, device=e.device)
    cap = torch.where(e >= 126, torch.where(e >= 127, six / 4, six / 2), six)
    return cap.unsqueeze(-1)


def _pow2(e: Tensor) -> Tensor:
    """2^e as float32, exact for e in [-127, 127] (2^-127 is a float32 subnormal)."""
    return torch.exp2(e.double()).float()


def _scaled(w: Tensor, group_size: int, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (w / 2^e as float32 ``[..., N, K/32, 32]``, exponents int32 ``[..., N, K/32]``,
    per-block magnitude cap)."""
    check_group_size(group_size, name, allowed=(DEFAULT_GROUP_SIZE,))
    check_weight(w, group_size, name)
    wg = group_view(w, group_size).float()
    amax = wg.abs().amax(dim=-1)
    check_finite(amax, name)
    e = _block_exponents(amax)
    return wg / _pow2(e).unsqueeze(-1), e, _max_magnitude(e)


def _served(values_g: Tensor, e: Tensor) -> Tensor:
    """E2M1 values ``[..., N, K/32, 32]`` times 2^e: exact, rounded (a no-op) to bf16."""
    return (values_g * _pow2(e).unsqueeze(-1)).to(torch.bfloat16).flatten(-2)


def quantize(w: Tensor, group_size: int = DEFAULT_GROUP_SIZE, *,
             name: str = "weight") -> QuantizedTensor:
    """Quantize ``w [..., N, K]`` to E2M1 codes (uint8) and E8M0 block scales (uint8)."""
    with torch.no_grad():
        x, e, cap = _scaled(w, group_size, name)
        codes = e2m1_encode(x, cap).flatten(-2)
    return QuantizedTensor(codes=codes, scale=(e + E8M0_BIAS).to(torch.uint8),
                           global_scale=None, group_size=group_size, fmt=QuantFormat.MXFP4)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The served weight ``value(code) * 2^(scale - 127)`` (exact in bf16), cast to ``dtype``."""
    _check_qt(q)
    e = q.scale.to(torch.int32) - E8M0_BIAS
    return _served(e2m1_decode(group_view(q.codes, q.group_size)), e).to(dtype)


def fake_quantize(w: Tensor, group_size: int = DEFAULT_GROUP_SIZE, *,
                  name: str = "weight") -> Tensor:
    """``dequantize(quantize(w))`` cast to ``w.dtype``; backward is the identity (STE).

    Computed without materialising codes (E2M1 values straight from the rounding), which the
    tests hold bit-equal to the decode path."""

    def fn(x: Tensor) -> Tensor:
        scaled, e, cap = _scaled(x, group_size, name)
        return _served(e2m1_round(scaled, cap), e).to(x.dtype)

    return straight_through(w, fn)


def _check_qt(q: QuantizedTensor) -> None:
    if not isinstance(q, QuantizedTensor) or q.fmt != QuantFormat.MXFP4:
        raise ValueError(f"expected an MXFP4 QuantizedTensor, got "
                         f"{getattr(q, 'fmt', type(q).__name__)}")


def pack(q: QuantizedTensor) -> dict[str, Tensor]:
    """compressed-tensors ``mxfp4-pack-quantized``: weight_packed (uint8) / weight_scale (E8M0)."""
    _check_qt(q)
    return {"weight_packed": pack_nibbles(q.codes).contiguous(), "weight_scale": q.scale}


def _check_scales(scale: Tensor, where: str) -> None:
    if scale.dtype != torch.uint8:
        raise ValueError(f"{where}: scales must be uint8 (E8M0), got {scale.dtype}")
    if bool((scale == 255).any()):
        raise ValueError(f"{where}: scales hold E8M0 byte 255 (NaN)")


def unpack(tensors: dict[str, Tensor], group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedTensor:
    """Inverse of :func:`pack`."""
    packed = require_key(tensors, "weight_packed", "MXFP4")
    scale = require_key(tensors, "weight_scale", "MXFP4")
    check_group_size(group_size, "MXFP4 unpack", allowed=(DEFAULT_GROUP_SIZE,))
    if packed.dtype != torch.uint8 or packed.ndim < 2:
        raise ValueError(f"MXFP4 unpack: weight_packed must be uint8 [..., N, K/2], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    _check_scales(scale, "MXFP4 unpack: weight_scale")
    k = 2 * packed.shape[-1]
    if k % group_size != 0 or tuple(scale.shape) != (*packed.shape[:-1], k // group_size):
        raise ValueError(f"MXFP4 unpack: weight_scale shape {tuple(scale.shape)} does not match "
                         f"weight_packed shape {tuple(packed.shape)} (expected [..., N, K/32])")
    return QuantizedTensor(codes=unpack_nibbles(packed), scale=scale, global_scale=None,
                           group_size=group_size, fmt=QuantFormat.MXFP4)


def pack_gpt_oss(q: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """gpt-oss native ``(*_blocks [..., N, K/32, 16], *_scales [..., N, K/32])``, both uint8."""
    _check_qt(q)
    blocks = pack_nibbles(q.codes).unflatten(-1, (-1, q.group_size // 2)).contiguous()
    return blocks, q.scale


def unpack_gpt_oss(blocks: Tensor, scales: Tensor) -> QuantizedTensor:
    """Inverse of :func:`pack_gpt_oss`."""
    if blocks.dtype != torch.uint8 or blocks.ndim < 3 or blocks.shape[-1] != DEFAULT_GROUP_SIZE // 2:
        raise ValueError(f"MXFP4 unpack_gpt_oss: blocks must be uint8 [..., N, K/32, 16], got "
                         f"{blocks.dtype} {tuple(blocks.shape)}")
    _check_scales(scales, "MXFP4 unpack_gpt_oss")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"MXFP4 unpack_gpt_oss: scales shape {tuple(scales.shape)} does not "
                         f"match blocks shape {tuple(blocks.shape)} (expected blocks.shape[:-1])")
    codes = unpack_nibbles(blocks).flatten(-2)
    return QuantizedTensor(codes=codes, scale=scales, global_scale=None,
                           group_size=DEFAULT_GROUP_SIZE, fmt=QuantFormat.MXFP4)
