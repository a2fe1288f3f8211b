"""Independent readers: the consumers' own code decodes our packed tensors to our served weight.

- compressed-tensors (the format SGLang / vLLM load): ``PackedQuantizationCompressor``,
  ``NVFP4PackedCompressor``, ``MXFP4PackedCompressor`` ``.decompress`` and the pack / unpack
  helpers (``pack_to_int32`` / ``unpack_from_int32``, ``pack_fp4_to_uint8`` /
  ``unpack_fp4_from_uint8``, ``compress_mx_scale``);
- transformers' gpt-oss MXFP4 dequantization ``convert_moe_packed_tensors``.
All comparisons are bitwise (sign of zero included).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from int4_qat.formats import int4, mxfp4, nvfp4
from int4_qat.formats._common import E2M1_VALUES, e2m1_decode
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors


def scheme(**weights) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(symmetric=True,
                                                                           **weights))


def int4_scheme(g):
    return scheme(num_bits=4, type="int", strategy="group", group_size=g)


NVFP4_SCHEME = scheme(num_bits=4, type="float", strategy="tensor_group", group_size=16)
MXFP4_SCHEME = scheme(num_bits=4, type="float", strategy="group", group_size=32,
                      scale_dtype=torch.uint8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float32: torch.int32}[t.dtype])


def weight(seed: int, shape, dtype, regime: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    if regime == "wide":
        w *= 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 60 - 30)
    elif regime == "huge":
        w = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * torch.finfo(dtype).max
    elif regime == "tiny":
        w *= 1e-39
    else:
        w *= 0.02
    w = w.to(dtype)
    w[torch.rand(n, generator=g) < 0.05] = 0.0
    w[torch.rand(n, generator=g) < 0.05] = -0.0
    w = w.reshape(shape)
    w[..., 0, :32] = 0.0                                      # an all-zero group in every matrix
    return w


FUZZ = dict(seed=st.integers(0, 2**31 - 1), experts=st.integers(1, 3), n=st.integers(1, 6),
            k_blocks=st.integers(1, 3), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
            regime=st.sampled_from(["normal", "wide", "huge", "tiny"]))


# ---------------------------------------------------------------------------------- INT4 ---
@settings(max_examples=15, deadline=None)
@given(group_size=st.sampled_from([32, 64, 128]), rule=st.sampled_from(["amax/7", "amax/7.5"]),
       **FUZZ)
def test_int4_compressed_tensors_decompress_gives_our_served_weight(group_size, rule, seed,
                                                                    experts, n, k_blocks, dtype,
                                                                    regime):
    w = weight(seed, (experts, n, 128 * k_blocks), dtype, regime)
    q = int4.quantize(w, group_size, scale_rule=rule)
    t = int4.pack(q)
    # compressed-tensors' own bit packing of our int8 codes is byte-identical to ours
    assert torch.equal(pack_to_int32(q.codes, 4), t["weight_packed"])
    assert torch.equal(unpack_from_int32(t["weight_packed"], 4, q.codes.shape), q.codes)
    ours = int4.dequantize(q)
    for e in range(experts):                       # per-Linear tensors, as the exporter writes
        te = int4.pack(q.expert(e))
        assert te["weight_shape"].tolist() == [n, 128 * k_blocks]
        out = PackedQuantizationCompressor.decompress(dict(te), int4_scheme(group_size))["weight"]
        assert out.dtype == torch.bfloat16
        assert torch.equal(bits(out), bits(ours[e]))
    stacked = PackedQuantizationCompressor.decompress(dict(t), int4_scheme(group_size))["weight"]
    assert torch.equal(bits(stacked), bits(ours))
    assert torch.equal(bits(int4.fake_quantize(w, group_size, scale_rule=rule)),
                       bits(stacked.to(dtype)))


def test_int4_compressed_tensors_compressor_agrees_for_fp32_not_bf16_weights():
    """Given our scales, compressed-tensors' own compressor reproduces our codes for fp32 weights;
    for bf16 weights it divides in bf16 (double rounding) and lands on other codes near ties, so
    the exporter must write our codes, never re-quantize with compressed-tensors."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    for dtype, lo, hi in ((torch.float32, 0.0, 0.0), (torch.bfloat16, 1e-3, 2e-2)):
        q = int4.quantize(w.to(dtype), 128)
        ct = PackedQuantizationCompressor.compress({"weight": w.to(dtype), "weight_scale": q.scale},
                                                   int4_scheme(128))
        codes = unpack_from_int32(ct["weight_packed"], 4, w.shape)
        assert lo <= (codes != q.codes).float().mean().item() <= hi


# ---------------------------------------------------------------------------------- FP4 ----
def test_e2m1_tables_agree():
    assert [math.copysign(1, v) * abs(v) for v in FP4_VALUES] == list(E2M1_VALUES)
    assert [math.copysign(1, v) for v in FP4_VALUES] == [math.copysign(1, v) for v in E2M1_VALUES]
    codes = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    ours = e2m1_decode(torch.stack((codes & 15, codes >> 4), -1).flatten(-2)).bfloat16()
    assert torch.equal(bits(unpack_fp4_from_uint8(codes, 1, 512)), bits(ours))
    assert torch.equal(pack_fp4_to_uint8(ours), codes)


@settings(max_examples=15, deadline=None)
@given(**FUZZ)
def test_nvfp4_compressed_tensors_reads_and_writes_our_bytes(seed, experts, n, k_blocks, dtype,
                                                             regime):
    w = weight(seed, (experts, n, 32 * k_blocks), dtype, regime)
    q = nvfp4.quantize(w)
    ours = nvfp4.dequantize(q)
    for e in range(experts):
        qe = q.expert(e)
        t = nvfp4.pack(qe)
        assert torch.equal(pack_fp4_to_uint8(e2m1_decode(qe.codes)), t["weight_packed"])
        out = NVFP4PackedCompressor.decompress(dict(t), NVFP4_SCHEME)["weight"]
        assert out.dtype == torch.bfloat16 and torch.equal(bits(out), bits(ours[e]))
        # compressed-tensors' compressor, handed our scales, writes exactly our bytes
        ct = NVFP4PackedCompressor.compress(
            {"weight": w[e], "weight_scale": qe.scale.float(),
             "weight_global_scale": qe.global_scale}, NVFP4_SCHEME)
        assert torch.equal(ct["weight_packed"], t["weight_packed"])
        assert torch.equal(ct["weight_scale"].view(torch.uint8), t["weight_scale"].view(torch.uint8))
    assert torch.equal(bits(nvfp4.fake_quantize(w)), bits(ours.to(dtype)))


@settings(max_examples=15, deadline=None)
@given(**FUZZ)
def test_mxfp4_compressed_tensors_and_transformers_read_our_bytes(seed, experts, n, k_blocks,
                                                                  dtype, regime):
    w = weight(seed, (experts, n, 32 * k_blocks), dtype, regime)
    q = mxfp4.quantize(w)
    ours = mxfp4.dequantize(q)
    # transformers' gpt-oss path: blocks/scales of the whole [E, N, K] stack -> [E, K, N]
    blocks, scales = mxfp4.pack_gpt_oss(q)
    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert hf.shape == (experts, 32 * k_blocks, n)
    assert torch.equal(bits(hf.transpose(1, 2)), bits(ours))
    for e in range(experts):
        qe = q.expert(e)
        t = mxfp4.pack(qe)
        assert torch.equal(pack_fp4_to_uint8(e2m1_decode(qe.codes)), t["weight_packed"])
        out = MXFP4PackedCompressor.decompress(dict(t), MXFP4_SCHEME)["weight"]
        assert out.dtype == torch.bfloat16 and torch.equal(bits(out), bits(ours[e]))
        scale_f = torch.exp2(qe.scale.double() - 127).to(dtype)
        assert torch.equal(compress_mx_scale(scale_f, torch.uint8), qe.scale)
        if regime != "huge":   # CT's compressor does not saturate codes at e=126 (bf16 inf)
            ct = MXFP4PackedCompressor.compress({"weight": w[e], "weight_scale": scale_f},
                                                MXFP4_SCHEME)
            if regime == "normal":
                assert torch.equal(ct["weight_packed"], t["weight_packed"])
            else:  # CT divides bf16 weights in bf16: a value that underflows there loses its
                # sign (code 0, not 8); the decoded values are still equal, zero sign aside
                ct_codes = torch.stack((ct["weight_packed"] & 15, ct["weight_packed"] >> 4), -1)
                assert torch.equal(e2m1_decode(ct_codes.flatten(-2)), e2m1_decode(qe.codes))
    assert torch.equal(bits(mxfp4.fake_quantize(w)), bits(ours.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpt_oss_checkpoint_shapes(dtype):
    """gpt_oss gate_up_proj: [E, 2I, H] weight -> blocks [E, 2I, H/32, 16], scales [E, 2I, H/32]."""
    w = torch.randn(2, 2 * 24, 64, dtype=dtype)
    blocks, scales = mxfp4.pack_gpt_oss(mxfp4.quantize(w))
    assert blocks.shape == (2, 48, 2, 16) and scales.shape == (2, 48, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    back = mxfp4.unpack_gpt_oss(blocks, scales)
    assert torch.equal(back.codes, mxfp4.quantize(w).codes)


# -------------------------------------------------------------------- device independence ---
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("regime", ["normal", "wide", "huge", "tiny"])
def test_cuda_and_cpu_give_the_same_bits(dtype, regime):
    """Training fake-quantizes on GPUs, export runs on CPUs: codes, scales and the served weight
    must not depend on the device (no reciprocal-multiply divisions, no float log2)."""
    w = weight(7, (2, 64, 256), dtype, regime)
    for fmt, kwargs in ((int4, {"group_size": 32}), (int4, {"scale_rule": "amax/7.5"}),
                        (mxfp4, {}), (nvfp4, {})):
        qc, qg = fmt.quantize(w, **kwargs), fmt.quantize(w.cuda(), **kwargs)
        assert torch.equal(qc.codes, qg.codes.cpu())
        assert torch.equal(qc.scale.view(torch.uint8) if qc.scale.element_size() == 1 else qc.scale,
                           (qg.scale.view(torch.uint8) if qg.scale.element_size() == 1
                            else qg.scale).cpu())
        if qc.global_scale is not None:
            assert torch.equal(qc.global_scale, qg.global_scale.cpu())
        assert torch.equal(bits(fmt.fake_quantize(w, **kwargs)),
                           bits(fmt.fake_quantize(w.cuda(), **kwargs).cpu()))
