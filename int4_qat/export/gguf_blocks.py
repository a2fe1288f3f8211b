"""Our 4-bit codes as GGML blocks (llama.cpp), and what llama.cpp decodes from them.

GGML stores a quantized row of ``K`` weights as ``K / B`` fixed-size blocks; a tensor ``[..., N, K]``
is ``[..., N, K / B * bytes_per_block]`` bytes, rows contiguous (ggml/src/ggml-common.h). Three GGML
types hold our formats without re-quantizing: the codes and scales this project computed
(:mod:`int4_qat.formats`, the same ones training's fake quant used) are *rearranged*, never
recomputed, and ggml's own quantizer is never called.

``Q4_0`` (INT4)  ``block_q4_0 {fp16 d; u8 qs[16]}``, 32 weights, 18 bytes. Weight ``j`` is nibble
    ``qs[j] & 15`` for ``j < 16`` and ``qs[j-16] >> 4`` above (low halves first), decoded as
    ``(nibble - 8) * d`` in float32 (ggml-quants.c ``dequantize_row_q4_0``). So an INT4 code ``q``
    in [-8, 7] is stored as ``q + 8``, and an INT4 group of ``G`` (any multiple of 32) is ``G / 32``
    blocks carrying the same scale. The bf16 scale ``s`` becomes ``fp16(s)``: exact when
    ``2^-24 <= s <= 65504`` and ``s`` has no bits below fp16's spacing there (always for
    ``s >= 2^-17``: bf16 keeps 8 significant bits; the ``amax/7`` rule's floor 1e-5 is above
    2^-17); an inexact scale is *counted* (blocks, max error), a scale above 65504 is refused.
    The decode ``q * d`` is exact in float32, i.e. llama.cpp serves the exact ``q * s`` — the
    INT4 ``served="exact"`` rule of :mod:`int4_qat.formats.int4`.
``MXFP4``  ``block_mxfp4 {u8 e; u8 qs[16]}``, 32 weights, 17 bytes; same nibble order as Q4_0;
    decoded as ``kvalues[nibble] * 2^(e - 128)`` with ``kvalues`` the doubled E2M1 table, i.e.
    ``E2M1(code) * 2^(e - 127)`` exactly: our E8M0 byte and E2M1 codes go in unchanged. (ggml has
    no -0: E2M1 code 8 decodes to +0, equal in value to our -0.)
``NVFP4``  ``block_nvfp4 {u8 d[4]; u8 qs[32]}``, 64 weights = 4 sub-blocks of 16, 36 bytes;
    in sub-block ``s`` weight ``j`` is nibble ``qs[8s + j] & 15`` for ``j < 8`` and
    ``qs[8s + j - 8] >> 4`` above; ``d[s]`` is an unsigned E4M3 scale (our E4M3 bits without the
    sign bit, which is 0 for our positive scales). The per-matrix global scale ``g`` is not in the
    block: llama.cpp multiplies the *matmul output* by a float32 tensor ``<name>.scale`` = ``1/g``
    (src/llama-graph.cpp ``build_ffn`` / ``build_moe_ffn``, the ``*_s`` tensors; convert_hf_to_gguf
    writes ``1 / weight_global_scale`` there). Its weight is therefore ``E2M1 * s * fl(1/g)``,
    while compressed-tensors (our NVFP4 served weight) computes ``bf16(E2M1 * fl(s / g))``: equal
    up to bf16 rounding (about 2^-9 relative), never bit for bit. The layout holds our codes and
    scales exactly, so the export is written and the difference is reported, not hidden.

:func:`check_decoded` compares what the ``gguf`` package's own dequantizers (``gguf.quants``, the
Python twin of ggml's) decode from the bytes with the training fake-quant weight.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from int4_qat.formats import QuantFormat, QuantizedTensor

__all__ = [
    "GGML_BLOCK",
    "TensorCheck",
    "check_decoded",
    "check_layout",
    "decode",
    "ggml_type",
    "global_scale_inverse",
    "pack_blocks",
]

if sys.byteorder != "little":  # GGUF files are little-endian; the fp16 bytes below are native
    raise ImportError("int4_qat.export.gguf_blocks writes little-endian GGUF and needs a little-endian host")

#: our format -> (GGML type name, weights per block)
GGML_BLOCK = {QuantFormat.INT4: ("Q4_0", 32), QuantFormat.MXFP4: ("MXFP4", 32),
              QuantFormat.NVFP4: ("NVFP4", 64)}


def ggml_type(fmt: QuantFormat | str):
    """The ``gguf.GGMLQuantizationType`` that holds format ``fmt``."""
    import gguf

    return gguf.GGMLQuantizationType[GGML_BLOCK[QuantFormat(fmt)][0]]


def check_layout(scheme, name: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError (naming the tensor and the fix) unless ``scheme``'s codes of a weight of
    ``shape`` fit the GGML block type without re-quantization."""
    fmt = QuantFormat(scheme.format)
    tname, block = GGML_BLOCK[fmt]
    k = shape[-1]
    if fmt is QuantFormat.INT4 and scheme.group_size % 32:
        raise ValueError(f"{name}: an INT4 g{scheme.group_size} scheme cannot be stored as GGML Q4_0 "
                         f"(blocks of 32 weights with one scale): the group size must be a multiple of "
                         f"32; train with group_size 32, 64 or 128")
    if k % block:
        raise ValueError(f"{name}: shape {list(shape)}: in_features {k} is not a multiple of the GGML "
                         f"{tname} block of {block}; llama.cpp cannot hold this weight as {tname}")


def _q4_0(q: QuantizedTensor, name: str) -> np.ndarray:
    k = q.codes.shape[-1]
    d = q.scale.to(torch.float16)  # round-to-nearest-even, as any bf16 -> fp16 conversion
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"{name}: an INT4 scale exceeds 65504, the largest fp16 value; GGML Q4_0 "
                         f"stores fp16 scales, so this weight cannot be served by llama.cpp as Q4_0")
    d = d.repeat_interleave(q.group_size // 32, dim=-1).unsqueeze(-1)       # [..., N, K/32, 1]
    nib = (q.codes.to(torch.int16) + 8).to(torch.uint8).unflatten(-1, (k // 32, 32))
    qs = nib[..., :16] | (nib[..., 16:] << 4)                               # [..., N, K/32, 16]
    return torch.cat([d.contiguous().view(torch.uint8), qs], -1).flatten(-2).numpy()


def _mxfp4(q: QuantizedTensor) -> np.ndarray:
    c = q.codes.unflatten(-1, (q.codes.shape[-1] // 32, 32))
    qs = c[..., :16] | (c[..., 16:] << 4)
    return torch.cat([q.scale.unsqueeze(-1), qs], -1).flatten(-2).numpy()


def _nvfp4(q: QuantizedTensor, name: str) -> np.ndarray:
    k = q.codes.shape[-1]
    bits = q.scale.view(torch.uint8)
    if bool((bits & 0x80).any()):
        raise ValueError(f"{name}: negative NVFP4 block scale; GGML NVFP4 scales are unsigned E4M3")
    c = q.codes.unflatten(-1, (k // 16, 16))
    qs = (c[..., :8] | (c[..., 8:] << 4)).unflatten(-2, (k // 64, 4)).flatten(-2)   # [..., N, K/64, 32]
    d = bits.unflatten(-1, (k // 64, 4))                                             # [..., N, K/64, 4]
    return torch.cat([d, qs], -1).flatten(-2).numpy()


def pack_blocks(q: QuantizedTensor, name: str = "weight") -> np.ndarray:
    """uint8 ``[..., N, K / B * bytes_per_block]``: ``q``'s codes and scales as GGML blocks."""
    if q.fmt is QuantFormat.INT4:
        return _q4_0(q, name)
    if q.fmt is QuantFormat.MXFP4:
        return _mxfp4(q)
    return _nvfp4(q, name)


def global_scale_inverse(q: QuantizedTensor) -> np.ndarray:
    """NVFP4: float32 ``1 / g`` per matrix (``[1]`` for a Linear, ``[E]`` for an expert stack),
    the ``<name>.scale`` tensor llama.cpp multiplies the matmul output by."""
    return (1.0 / q.global_scale.float()).reshape(-1).numpy()


def decode(blocks: np.ndarray, fmt: QuantFormat | str, scale_inv: np.ndarray | None = None) -> torch.Tensor:
    """The weight llama.cpp computes with, decoded by ``gguf.quants`` (float64, so an NVFP4
    ``1/g`` factor adds no rounding of its own): ``[..., N, K]``."""
    import gguf

    w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, ggml_type(fmt)))).double()
    if scale_inv is not None:  # one factor per matrix: [1] for [N, K], [E] for [E, N, K]
        s = torch.from_numpy(np.array(scale_inv, dtype=np.float64))
        w = w * (s.view(-1, 1, 1) if w.ndim == 3 else s.view(1, 1))
    return w


@dataclass
class TensorCheck:
    """Decoded (llama.cpp) vs training fake-quant weight for one GGUF tensor."""

    name: str
    ggml_type: str
    elements: int = 0
    blocks: int = 0
    mismatched: int = 0            # elements whose decoded value != the fake-quant value
    max_abs: float = 0.0
    max_rel: float = 0.0           # max |decoded - ref| / |ref| over mismatched elements
    inexact_scale_blocks: int = 0  # Q4_0: blocks whose bf16 scale fp16 cannot hold exactly
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.mismatched == 0 and self.inexact_scale_blocks == 0

    def merge(self, other: "TensorCheck") -> None:
        """Accumulate another piece (e.g. the next expert of a stacked tensor)."""
        self.elements += other.elements
        self.blocks += other.blocks
        self.mismatched += other.mismatched
        self.inexact_scale_blocks += other.inexact_scale_blocks
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.notes += [n for n in other.notes if n not in self.notes]

    def as_dict(self) -> dict:
        return asdict(self)


def check_decoded(name: str, q: QuantizedTensor, blocks: np.ndarray, reference: torch.Tensor,
                  scale_inv: np.ndarray | None = None) -> TensorCheck:
    """Compare the gguf-decoded ``blocks`` with ``reference`` (the training fake-quant weight).

    ``reference`` is compared as a value in its own dtype (a bf16 fake quant is what a bf16 model
    computes with); equal values count as equal (+0 and -0 too: ggml has no -0).
    """
    fmt = QuantFormat(q.fmt)
    tname, block = GGML_BLOCK[fmt]
    dec = decode(blocks, fmt, scale_inv)
    ref = reference.double()
    if dec.shape != ref.shape:
        raise RuntimeError(f"{name}: decoded shape {tuple(dec.shape)} != weight shape {tuple(ref.shape)}")
    diff = (dec - ref).abs()
    bad = diff != 0
    c = TensorCheck(name, tname, elements=ref.numel(), blocks=ref.numel() // block,
                    mismatched=int(bad.sum()))
    if c.mismatched:
        c.max_abs = float(diff.max())
        nz = bad & (ref != 0)  # a weight served non-zero where training has 0 is infinitely off
        c.max_rel = float((diff[nz] / ref.abs()[nz]).max()) if bool(nz.any()) else 0.0
        if int(nz.sum()) < c.mismatched:
            c.max_rel = float("inf")
    if fmt is QuantFormat.INT4:
        if c.mismatched and reference.dtype != torch.float32:
            c.notes.append(f"the fake-quant weight is {str(reference.dtype).removeprefix('torch.')} "
                           "(the checkpoint's dtype), i.e. rounded q*s; llama.cpp computes q*s exactly")
        inexact = q.scale.to(torch.float16).float() != q.scale.float()
        c.inexact_scale_blocks = int(inexact.sum()) * (q.group_size // 32)
        if c.inexact_scale_blocks:
            c.notes.append("bf16 scale not representable in fp16 (below 2^-17)")
    if fmt is QuantFormat.NVFP4 and c.mismatched:
        c.notes.append("llama.cpp applies 1/g to the matmul output: E2M1*s*fl(1/g) vs bf16(E2M1*fl(s/g))")
    return c
