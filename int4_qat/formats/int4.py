"""INT4 W4A16: symmetric group-wise integer quantization, compressed-tensors ``pack-quantized``.

The format
----------
Each group of ``G`` consecutive in_features (last dim) shares one bf16 scale ``s``; each weight
becomes a signed integer ``q``; the server computes ``q * s``. No zero point (symmetric).

Scale rules (``scale_rule=``)
-----------------------------
``"amax/7"`` (default; Kimi-K2 / slime convention): ``s = max(amax / 7, 1e-5)``, ``q`` in
[-7, 7] (15 of the 16 levels; the grid is symmetric so +amax and -amax are both exact).
``"amax/7.5"`` (compressed-tensors' own compressor, quantization/utils/helpers.py
``calculate_qparams``: amax / (bit_range / 2)): ``s = amax / 7.5``, ``q`` in [-8, 7]; a zero scale
is replaced by bf16's eps as compressed-tensors does.

Both rules compute ``amax / c`` in float32 (a true division on every device), then round the scale
to **bf16** (round-to-nearest-even), then compute ``q = clamp(round_half_even(w_fp32 / s_bf16),
qmin, qmax)``. Computing ``q`` from the bf16-rounded scale, i.e. the scale that is stored, removes
the train/serve mismatch of the reference system (fake quant with the fp32 scale, export with the
bf16 one).

The served weight (defined once)
--------------------------------
compressed-tensors decompresses ``pack-quantized`` with ``unpack_from_int32`` (int8 codes) and
``dequantize`` (quantization/lifecycle/forward.py, forward_helpers.py ``_dequantize``):
``x_q.to(scale.dtype) * scale`` -- a bf16 x bf16 product, correctly rounded to bf16. The Marlin
kernel SGLang / vLLM serve W4A16 with turns a uint4b8 nibble into bf16 exactly (vLLM
csrc/quantization/gptq_marlin/dequant.h, ``dequant<nv_bfloat162, kU4B8>``: magic ``128 + nibble``
minus 136) and then multiplies by the bf16 group scale with ``__hmul2`` (the ``scale`` step of
marlin_template.h): the same correctly rounded bf16 product. So the served weight is
``bf16(q * s_bf16)`` (the exact product, which fits float32, rounded once to bf16). ``dequantize``
returns exactly that, cast to the requested dtype; ``fake_quantize(w)`` returns exactly that cast
to ``w.dtype`` (for fp32 weights, too: training sees what the server computes).

Engines that decode in float32 (``served="exact"``)
---------------------------------------------------
Not every consumer rounds to bf16. llama.cpp's Q4_0 (ggml-quants.c ``dequantize_row_q4_0``:
``(nibble - 8) * d`` with ``d`` converted to float) computes the product in float32, where it is
exact: ``|q| <= 8`` has 4 significant bits and the bf16 scale 8, so ``q * s`` has at most 12 and
always fits float32's 24 (bf16's exponent range is float32's, subnormals included). So the
keyword ``served`` of ``fake_quantize`` / ``dequantize`` picks the served weight:
``"bf16"`` (default; Marlin, compressed-tensors) = ``bf16(q * s)`` then cast to the output dtype;
``"exact"`` (float32 decoders) = the exact ``q * s`` cast to the output dtype. Codes and scales are
the same for both. For bf16 outputs both give the same bits (one rounding of the same exact
value); for fp32 outputs they differ (``"exact"`` keeps all 12 bits), and for fp16 outputs they can
differ by double rounding.

Overflow edges: the scale is capped at the largest bf16 value ``S_MAX`` with ``bf16(|qext| * S_MAX)``
finite (``|qext|`` = 7 or 8), so the served weight is always finite; only weights within ~1% of
bf16's max (3.39e38) are affected (clipped). NaN / Inf in the weight raise ValueError.

On-disk layout (compressed-tensors compressors/pack_quantized/helpers.py ``pack_to_int32``)
-------------------------------------------------------------------------------------------
``weight_packed`` int32 ``[..., N, K/8]``: each code is stored as ``q + 8`` (uint4b8, GPTQ's
layout); element ``j`` of a row lives in word ``j // 8`` at bits ``4 * (j % 8)``, lowest nibble
first. ``weight_scale`` bf16 ``[..., N, K/G]``. ``weight_shape`` int64 ``[N, K]`` (the full shape).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from int4_qat.formats._common import (
    QuantFormat,
    QuantizedTensor,
    check_finite,
    check_group_size,
    check_weight,
    group_view,
    pack_nibbles,
    require_key,
    straight_through,
    true_div,
    unpack_nibbles,
)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "MARLIN_GROUP_SIZES",
    "SCALE_RULES",
    "SCALE_FLOOR",
    "SERVED_RULES",
    "S_MAX",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack",
    "unpack",
]

DEFAULT_GROUP_SIZE = 128
#: Group sizes SGLang / vLLM's Marlin W4A16 kernels serve (marlin_utils.py; -1 = per-channel is
#: also served but is not a group size). Any divisor of K is accepted here for experiments.
MARLIN_GROUP_SIZES = (32, 64, 128)
#: scale_rule -> (divisor, qmin, qmax)
SCALE_RULES = {"amax/7": (7.0, -7, 7), "amax/7.5": (7.5, -8, 7)}
#: slime's lower bound on the amax/7 scale.
SCALE_FLOOR = 1e-5
#: ``served=`` values: how the consumer evaluates ``q * s`` (module docstring).
SERVED_RULES = ("bf16", "exact")
_CT_ZERO_SCALE = torch.finfo(torch.bfloat16).eps  # compressed-tensors' replacement for scale 0


def _largest_safe_scale(qext: int) -> Tensor:
    """Largest bf16 ``s`` with ``bf16(qext * s)`` finite."""
    s = torch.tensor(torch.finfo(torch.bfloat16).max / qext).to(torch.bfloat16)
    while not torch.isfinite((s.float() * qext).to(torch.bfloat16)):
        s = torch.nextafter(s, torch.zeros_like(s))
    return s


#: scale_rule -> largest bf16 scale whose extreme code times the scale is finite in bf16.
S_MAX = {rule: _largest_safe_scale(max(-lo, hi)) for rule, (_, lo, hi) in SCALE_RULES.items()}
_S_MAX_F = {rule: float(s) for rule, s in S_MAX.items()}  # as Python floats (bf16 values, exact)


def _rule(scale_rule: str, name: str) -> tuple[float, int, int]:
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"{name}: unknown INT4 scale_rule {scale_rule!r} (allowed: {list(SCALE_RULES)})")
    return SCALE_RULES[scale_rule]


def _scales_and_codes(w: Tensor, group_size: int, scale_rule: str, name: str):
    """-> (codes as float32 ``[..., N, K/G, G]``, bf16 scales ``[..., N, K/G]``)."""
    check_group_size(group_size, name)
    check_weight(w, group_size, name)
    divisor, qmin, qmax = _rule(scale_rule, name)
    wg = group_view(w, group_size).float()
    amax = wg.abs().amax(dim=-1)
    check_finite(amax, name)
    s = true_div(amax, divisor)
    if scale_rule == "amax/7":
        s = s.clamp_min(SCALE_FLOOR)
    s = s.to(torch.bfloat16)
    if scale_rule == "amax/7.5":
        s = torch.where(s == 0, torch.full_like(s, _CT_ZERO_SCALE), s)
    s = s.clamp(max=_S_MAX_F[scale_rule])  # a bf16 value: exact; a scalar: no device copy
    q = torch.round(wg / s.float().unsqueeze(-1)).clamp_(qmin, qmax)
    # + 0.0 turns -0.0 into +0.0: an integer code has no negative zero, so the served weight of a
    # zero code is +0.0 (compressed-tensors: int8 0 -> bf16 0.0 -> 0.0 * s).
    return q.add_(0.0), s


def _check_served(served: str, name: str) -> str:
    if served not in SERVED_RULES:
        raise ValueError(
            f"{name}: unknown INT4 served rule {served!r} (allowed: "
            f"{list(SERVED_RULES)}: 'bf16' for Marlin / compressed-tensors, 'exact' "
            "for float32 decoders such as llama.cpp)"
        )
    return served


def _served(q: Tensor, s: Tensor, served: str = "bf16") -> Tensor:
    """Served weight: the exact product q * s (fits float32), rounded once to bf16 unless
    ``served == "exact"`` (then float32, exact)."""
    prod = (q.float() * s.float().unsqueeze(-1)).flatten(-2)
    return prod if served == "exact" else prod.to(torch.bfloat16)


def quantize(
    w: Tensor, group_size: int = DEFAULT_GROUP_SIZE, *, name: str = "weight", scale_rule: str = "amax/7"
) -> QuantizedTensor:
    """Quantize ``w [..., N, K]`` to int8 codes and bf16 group scales."""
    with torch.no_grad():
        q, s = _scales_and_codes(w, group_size, scale_rule, name)
        codes = q.to(torch.int8).flatten(-2)
    return QuantizedTensor(codes=codes, scale=s, global_scale=None, group_size=group_size, fmt=QuantFormat.INT4)


def _check_qt(q: QuantizedTensor) -> None:
    if not isinstance(q, QuantizedTensor) or q.fmt != QuantFormat.INT4:
        raise ValueError(f"expected an INT4 QuantizedTensor, got {getattr(q, 'fmt', type(q).__name__)}")


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, *, served: str = "bf16") -> Tensor:
    """The served weight ``bf16(q * s)`` (``served="exact"``: the exact ``q * s``), cast to
    ``dtype``."""
    _check_qt(q)
    _check_served(served, "INT4 dequantize")
    g = group_view(q.codes, q.group_size)
    return _served(g, q.scale, served).to(dtype)


def fake_quantize(
    w: Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    name: str = "weight",
    scale_rule: str = "amax/7",
    served: str = "bf16",
) -> Tensor:
    """``dequantize(quantize(w), served=served)`` cast to ``w.dtype``; backward is the identity
    (STE)."""
    _check_served(served, name)

    def fn(x: Tensor) -> Tensor:
        q, s = _scales_and_codes(x, group_size, scale_rule, name)
        return _served(q, s, served).to(x.dtype)

    return straight_through(w, fn)


def pack(q: QuantizedTensor) -> dict[str, Tensor]:
    """compressed-tensors ``pack-quantized``: weight_packed / weight_scale / weight_shape."""
    _check_qt(q)
    k = q.codes.shape[-1]
    if k % 8 != 0:
        raise ValueError(
            f"INT4 pack: in_features {k} (shape {tuple(q.codes.shape)}) must be a multiple of 8 for int32 packing"
        )
    nib = (q.codes.to(torch.int16) + 8).to(torch.uint8)
    packed = pack_nibbles(nib).contiguous()
    if sys.byteorder == "big":  # the int32 word's low byte comes first in memory
        packed = packed.unflatten(-1, (-1, 4)).flip(-1).flatten(-2).contiguous()
    return {
        "weight_packed": packed.view(torch.int32),
        "weight_scale": q.scale,
        "weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64),
    }


def unpack(
    tensors: dict[str, Tensor], group_size: int = DEFAULT_GROUP_SIZE, *, scale_rule: str = "amax/7"
) -> QuantizedTensor:
    """Inverse of :func:`pack`; checks dtypes, shapes, group size and the rule's code grid."""
    packed = require_key(tensors, "weight_packed", "INT4")
    scale = require_key(tensors, "weight_scale", "INT4")
    shape_t = require_key(tensors, "weight_shape", "INT4")
    _, qmin, _ = _rule(scale_rule, "INT4 unpack")
    check_group_size(group_size, "INT4 unpack")
    if packed.dtype != torch.int32:
        raise ValueError(f"INT4 unpack: weight_packed must be int32, got {packed.dtype}")
    if scale.dtype != torch.bfloat16:
        raise ValueError(f"INT4 unpack: weight_scale must be bfloat16, got {scale.dtype}")
    shape = tuple(int(v) for v in shape_t.reshape(-1).tolist())
    if len(shape) < 2 or shape[:-1] != tuple(packed.shape[:-1]) or shape[-1] != 8 * packed.shape[-1]:
        raise ValueError(
            f"INT4 unpack: weight_shape {list(shape)} does not match weight_packed "
            f"shape {tuple(packed.shape)} (expected [..., N, K/8])"
        )
    k = shape[-1]
    if k % group_size != 0 or tuple(scale.shape) != (*shape[:-1], k // group_size):
        raise ValueError(
            f"INT4 unpack: weight_scale shape {tuple(scale.shape)} does not match "
            f"weight_shape {list(shape)} with group_size {group_size}"
        )
    b = packed.contiguous().view(torch.uint8)
    if sys.byteorder == "big":
        b = b.unflatten(-1, (-1, 4)).flip(-1).flatten(-2)
    codes = (unpack_nibbles(b).to(torch.int16) - 8).to(torch.int8)
    if qmin > -8 and bool((codes < qmin).any()):
        raise ValueError(
            f"INT4 unpack: weight_packed holds code -8, outside the [{qmin}, 7] grid "
            f"of scale_rule {scale_rule!r}; was it exported with 'amax/7.5'?"
        )
    return QuantizedTensor(codes=codes, scale=scale, global_scale=None, group_size=group_size, fmt=QuantFormat.INT4)
