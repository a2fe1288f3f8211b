"""Shared pieces of the three 4-bit formats: types, input checks, E2M1, nibbles, the STE.

Everything here is format-neutral plumbing; each format module (``int4``, ``mxfp4``, ``nvfp4``)
owns its own scale rule and its own definition of the served weight.

Group quantization in one paragraph
-----------------------------------
A weight ``W[..., N, K]`` (N = out_features, K = in_features; 3-D for fused expert stacks) is cut
along its last dimension into groups of ``G`` consecutive elements. Every group gets one scale
``s``; every element gets a 4-bit code ``q``; the consumer (SGLang / vLLM / transformers) computes
``q * s`` and nothing else. The scale rule (how ``s`` follows from the group's largest magnitude
``amax``) is free; the *decode* is fixed by the consumer, so each format module writes down, from the
consumer's source, the dtype and the order in which ``q * s`` is evaluated, and ``fake_quantize``
returns exactly that tensor.

E2M1 (the element type of MXFP4 and NVFP4)
------------------------------------------
4 bits ``s e e m``: bit 3 is the sign, the low three bits index the magnitudes
``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (2 exponent bits with bias 1, 1 mantissa bit, a subnormal 0.5, no
Inf/NaN). Code 8 is -0.0. Rounding to E2M1 is round-to-nearest with ties to the even code, i.e. the
decision boundaries are 0.25 (ties down to 0), 0.75 (up to 1), 1.25 (down to 1), 1.75 (up to 2),
2.5 (down to 2), 3.5 (up to 4), 5 (down to 4); magnitudes above 5 become 6. These are the
thresholds of compressed-tensors' ``cast_to_fp4`` (compressed_tensors/quantization/utils/
fp4_utils.py). The sign bit is set iff ``w < 0``: a small negative that rounds to zero is stored
as code 8 (-0.0) and a -0.0 weight as code 0 (+0.0), exactly what compressed-tensors' compressor
writes (``cast_to_fp4`` multiplies by ``torch.sign(x)``, which is +0 for -0.0, then
``pack_fp4_to_uint8`` takes ``signbit``). (ModelOpt's ``cast_fp4`` differs: it sets the sign bit
for every zero.)

Two 4-bit codes share a byte, the even element in the low nibble (compressed-tensors
``pack_fp4_to_uint8`` in compressors/nvfp4/helpers.py, and gpt-oss ``*_blocks`` tensors read by
transformers/integrations/mxfp4.py ``convert_moe_packed_tensors``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from int4_qat.formats.finite import check_finite  # noqa: F401  (re-exported: one definition)

__all__ = [
    "QuantFormat",
    "QuantizedTensor",
    "BF16_MAX",
    "E2M1_VALUES",
    "check_weight",
    "check_group_size",
    "check_finite",
    "group_view",
    "e2m1_round",
    "e2m1_encode",
    "e2m1_decode",
    "pack_nibbles",
    "unpack_nibbles",
    "straight_through",
    "require_key",
    "true_div",
]

#: Largest finite bfloat16 (2^127 * (2 - 2^-7) = 3.3895e38). The served weight of every format is
#: bf16; scale rules keep ``q * s`` at or below this so the served weight is always finite.
BF16_MAX = torch.finfo(torch.bfloat16).max

#: E2M1 code -> value, codes 0..15 (bit 3 = sign; code 8 is -0.0). Same table as transformers'
#: ``FP4_VALUES`` (transformers/integrations/mxfp4.py).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class QuantFormat(str, enum.Enum):
    """The three served 4-bit weight formats."""

    INT4 = "int4"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight ``[..., N, K]`` before packing (docs/DESIGN.md section 1).

    codes: same shape as the weight. INT4: int8 in [-8, 7]. MXFP4/NVFP4: uint8 E2M1 codes 0..15.
    scale: ``[..., N, K // group_size]`` in storage dtype: INT4 bf16, MXFP4 uint8 (E8M0 biased
        exponent), NVFP4 float8_e4m3fn.
    global_scale: NVFP4 only, float32 ``[..., 1]``: one per 2-D matrix (``[1]`` for a Linear,
        ``[E, 1]`` for an expert stack ``[E, N, K]``, so each expert matches a per-expert export).
    """

    codes: Tensor
    scale: Tensor
    global_scale: Tensor | None
    group_size: int
    fmt: QuantFormat

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def rows(self, start: int, stop: int) -> "QuantizedTensor":
        """Rows ``start:stop`` of dim -2 (out_features) with the same global scale, e.g. the
        gate / up halves of a fused ``[2I, H]`` projection exported as two Linears."""
        n = self.codes.shape[-2]
        if not 0 <= start < stop <= n:
            raise ValueError(f"rows({start}, {stop}) out of range for {n} rows")
        return QuantizedTensor(self.codes[..., start:stop, :], self.scale[..., start:stop, :],
                               self.global_scale, self.group_size, self.fmt)

    def expert(self, index: int) -> "QuantizedTensor":
        """The ``index``-th matrix of a 3-D (or higher) stack, as its own 2-D QuantizedTensor."""
        if self.codes.ndim < 3:
            raise ValueError(f"expert({index}) needs a stacked [E, N, K] tensor, got codes of "
                             f"shape {tuple(self.codes.shape)}")
        gs = None if self.global_scale is None else self.global_scale[index]
        return QuantizedTensor(self.codes[index], self.scale[index], gs, self.group_size, self.fmt)


def check_group_size(group_size: int, name: str, allowed: tuple[int, ...] | None = None) -> int:
    """Validate a group size (a positive int; one of ``allowed`` when given)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
    if allowed is not None and group_size not in allowed:
        raise ValueError(f"{name}: group_size {group_size} not supported by this format "
                         f"(allowed: {list(allowed)})")
    return group_size


def check_weight(w: Tensor, group_size: int, name: str) -> None:
    """Raise ValueError (naming ``name``) unless ``w`` is a float ``[..., N, K]`` with K % G == 0.

    Finiteness is checked by the callers on the per-group amax (NaN and Inf propagate into it),
    which costs one reduction they need anyway instead of a second full pass.
    """
    if not isinstance(w, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {w.dtype} not supported "
                         f"(use one of {[str(d) for d in _SUPPORTED_DTYPES]})")
    if w.ndim < 2:
        raise ValueError(f"{name}: expected a weight of shape [..., N, K], got shape "
                         f"{tuple(w.shape)}")
    if w.shape[-1] % group_size != 0:
        raise ValueError(f"{name}: last dim (in_features) of shape {tuple(w.shape)} is not "
                         f"divisible by group_size {group_size}")


def true_div(x: Tensor, divisor: float) -> Tensor:
    """``x / divisor``, correctly rounded on every device.

    CUDA evaluates ``tensor / python_scalar`` as ``tensor * (1 / scalar)`` (PyTorch
    aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu, "may lose one bit of precision"), while the
    CPU divides. Dividing by a 0-dim tensor on ``x``'s own device takes the true-division kernel on
    both, so a scale computed on a GPU during training equals the one computed on a CPU at export.
    """
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def group_view(w: Tensor, group_size: int) -> Tensor:
    """``[..., N, K]`` -> ``[..., N, K // G, G]`` (a view when ``w`` is contiguous)."""
    return w.unflatten(-1, (w.shape[-1] // group_size, group_size))


# E2M1 rounding by binade, elementwise arithmetic only (no search, no table): inside the binade of
# |x| the E2M1 grid is uniform with step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6], so
# ``k = round_half_even(|x| / step)`` and the value is ``k * step``. Ties go to the even code
# because in each binade the parity of k is the parity of the code index (index = k + 2 * binade).
# The step is the power of two below ``max(|x| / 2, 0.5)`` (mask float32 mantissa bits).
def _e2m1_round(x: Tensor, cap: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (sign source, k, step) for float32 ``x``; ``|value| = k * step <= cap``."""
    src = x + 0.0                               # -0.0 -> +0.0; negative iff x < 0
    a = src.abs().clamp_(max=cap)               # cap is an E2M1 value: rounding stays below it
    step = (a * 0.5).clamp_(min=0.5)            # (x * 0.5 is exact on every device)
    step.view(torch.int32).bitwise_and_(0x7F800000)
    k = a.div_(step).round_()
    return src, k, step


def e2m1_round(x: Tensor, cap: float | Tensor = 6.0) -> Tensor:
    """Round float32 ``x`` (already divided by its scale) to the nearest E2M1 value (float32).

    Ties to even, saturating at ``cap`` (6, or a smaller E2M1 value per block, broadcastable).
    Negative results keep their sign even when they round to zero (-0.0); -0.0 input gives +0.0.
    """
    src, k, step = _e2m1_round(x, cap)
    return torch.copysign(k * step, src)


def e2m1_encode(x: Tensor, cap: float | Tensor = 6.0) -> Tensor:
    """Round float32 ``x`` to E2M1 codes (uint8 0..15), the codes of :func:`e2m1_round`."""
    src, k, step = _e2m1_round(x, cap)
    binade2 = (step.view(torch.int32) >> 22) - 252          # 2 * binade: step 0.5/1/2 -> 0/2/4
    mag = (k.to(torch.int32) + binade2).to(torch.uint8)
    return mag | (torch.signbit(src).to(torch.uint8) << 3)


_VALUES_CACHE: dict[torch.device, Tensor] = {}


def e2m1_decode(codes: Tensor) -> Tensor:
    """E2M1 codes (uint8 0..15) -> float32 values (code 8 -> -0.0)."""
    table = _VALUES_CACHE.get(codes.device)
    if table is None:
        table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
        _VALUES_CACHE[codes.device] = table
    return table[codes.long()]


def pack_nibbles(nibbles: Tensor) -> Tensor:
    """uint8 values 0..15 ``[..., K]`` -> uint8 ``[..., K/2]``, element 2j in the low nibble."""
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[..., K/2]`` -> uint8 ``[..., K]``."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def require_key(tensors: dict[str, Tensor], key: str, fmt: str) -> Tensor:
    if key not in tensors:
        raise ValueError(f"{fmt} unpack: missing key '{key}' (got keys {sorted(tensors)})")
    return tensors[key]


class _StraightThrough(torch.autograd.Function):
    """Forward: ``fn(w)`` (the served weight, computed without autograd). Backward: identity.

    Nothing is saved for backward (no ``ctx.save_for_backward``): the STE gradient needs no
    tensors, so fake quant adds no activation memory to training.
    """

    @staticmethod
    def forward(ctx, w: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:  # noqa: D102
        with torch.no_grad():
            return fn(w)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None


def straight_through(w: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(w)`` in the forward pass, identity gradient in the backward pass (STE)."""
    if w.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(w, fn)
    with torch.no_grad():
        return fn(w)
