"""Numerics of the served 4-bit weight formats: the only place a scale or a code is computed.

One module per format, each with the same functions (docs/DESIGN.md section 1):
``quantize``, ``dequantize`` (the served weight), ``fake_quantize`` (STE), ``pack`` / ``unpack``
(compressed-tensors on-disk layout); MXFP4 also ``pack_gpt_oss`` / ``unpack_gpt_oss``.

    from int4_qat.formats import QuantFormat, get_format
    fmt = get_format(QuantFormat.INT4)          # or "int4"
    q = fmt.quantize(w, 128, name="model.layers.0.mlp.experts.3.down_proj.weight")
    tensors = fmt.pack(q)                       # {"weight_packed", "weight_scale", "weight_shape"}
    assert torch.equal(fmt.dequantize(fmt.unpack(tensors, 128), w.dtype), fmt.fake_quantize(w, 128))

- ``int4``: symmetric INT4, groups of 32/64/128 (Marlin), bf16 scales, ``pack-quantized``.
- ``mxfp4``: E2M1 + E8M0 power-of-two scale per 32, ``mxfp4-pack-quantized`` and gpt-oss blocks.
- ``nvfp4``: E2M1 + E4M3 scale per 16 + float32 global scale, ``nvfp4-pack-quantized``.

These modules are the oracle: clear eager code that defines every bit. ``int4_qat.formats.fused``
computes the same bits at memory speed (C kernels on CPU, Triton on CUDA) for training and
export; ``finite_check`` / ``raise_if_nonfinite`` (``finite.py``) defer the NaN/Inf check to once
per training step.
"""
from __future__ import annotations

from types import ModuleType

from int4_qat.formats import int4, mxfp4, nvfp4
from int4_qat.formats._common import QuantFormat, QuantizedTensor
from int4_qat.formats.finite import (
    finite_check,
    finite_check_mode,
    raise_if_nonfinite,
    set_finite_check,
)

__all__ = ["QuantFormat", "QuantizedTensor", "get_format", "int4", "mxfp4", "nvfp4",
           "finite_check", "finite_check_mode", "raise_if_nonfinite", "set_finite_check"]

_MODULES = {QuantFormat.INT4: int4, QuantFormat.MXFP4: mxfp4, QuantFormat.NVFP4: nvfp4}


def get_format(fmt: QuantFormat | str) -> ModuleType:
    """The module implementing ``fmt`` ("int4" | "mxfp4" | "nvfp4")."""
    try:
        return _MODULES[QuantFormat(fmt)]
    except ValueError:
        raise ValueError(f"unknown quant format {fmt!r} (allowed: "
                         f"{[f.value for f in QuantFormat]})") from None
