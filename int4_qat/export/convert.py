"""Per-tensor conversion, driven by the one :class:`~int4_qat.scheme.QuantScheme`.

Every input tensor gets a :class:`TensorPlan` computed from its *metadata only* (name, dtype,
shape), so the whole export can be checked, and each output shard's safetensors header written,
before a single weight is read:

``copy``
    Kept bit-for-bit (attention when the scope is ``experts``, router, embeddings, norms,
    ``lm_head``, biases, shared experts, dense MLPs).
``pack``
    A quantized Linear ``<m>.weight [N, K]`` becomes compressed-tensors tensors (layouts from
    compressed_tensors/compressors/{pack_quantized,mxfp4,nvfp4}/base.py; they are what
    SGLang's and vLLM's compressed-tensors loaders read):

    ======  ==========================  ==============================  ======================
    format  ``<m>.weight_packed``        ``<m>.weight_scale``             third tensor
    ======  ==========================  ==============================  ======================
    int4    int32 ``[N, K/8]`` (uint4b8)  bf16 ``[N, K/G]``                ``weight_shape`` int64 [2]
    mxfp4   uint8 ``[N, K/2]`` (E2M1)     uint8 E8M0 ``[N, K/32]``         —
    nvfp4   uint8 ``[N, K/2]`` (E2M1)     float8_e4m3fn ``[N, K/16]``      ``weight_global_scale`` f32 [1]
    ======  ==========================  ==============================  ======================
``gpt_oss``
    gpt-oss fused experts ``mlp.experts.{gate_up,down}_proj [E, K, N]`` (stored in x@W order,
    transformers models/gpt_oss/modeling_gpt_oss.py) become the native MXFP4 pair
    ``*_blocks`` uint8 ``[E, N, K/32, 16]`` and ``*_scales`` uint8 ``[E, N, K/32]``
    (transformers integrations/mxfp4.py ``_convert_moe_packed_tensors`` reads them back).

The numbers themselves (codes, scales) come only from :mod:`int4_qat.formats` through the
scheme; this module decides *which* tensor becomes *what*, and checks it can be served.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from int4_qat.export.writer import TensorSpec

__all__ = [
    "TensorPlan",
    "plan_tensor",
    "convert",
    "never_quantized",
    "check_marlin",
    "MARLIN_GROUP_SIZES",
    "GPT_OSS_EXPERT_RE",
    "attach_siblings",
    "quantize",
    "quantize_pack",
    "fake_quantize",
    "chunk_rows",
]

MARLIN_GROUP_SIZES = (32, 64, 128)  # sglang/vllm .../quantization/utils/marlin_utils.py (plus -1)
GPT_OSS_EXPERT_RE = re.compile(r"^(?P<m>.*\.mlp\.experts)\.(?P<p>gate_up_proj|down_proj)$")
# Defense in depth: whatever a scheme says, these are never packed (DESIGN.md §2).
_NEVER_RE = re.compile(
    r"(^|\.)(lm_head|embed_tokens|wte|mlp\.gate|mlp\.router|[a-z_]*norm[a-z_]*)$"
)


def never_quantized(module: str) -> bool:
    """Router, embeddings, norms and lm_head: never packed, in any scope."""
    return bool(_NEVER_RE.search(module))


@dataclass(frozen=True)
class TensorPlan:
    source: str
    kind: Literal["copy", "pack", "gpt_oss"]
    module: str  # HF module name (pack/gpt_oss); the tensor name for copy
    outputs: tuple[TensorSpec, ...]
    split_dim0: bool  # rows (copy) or experts (gpt_oss) are independent: may stream in chunks
    siblings: tuple[str, ...] = ()  # NVFP4: other weights sharing this one's global scale


# Projections that Megatron trains fused (linear_fc1 = [gate; up], linear_qkv) and that SGLang /
# vLLM serve fused (w13 / qkv_proj) with ONE NVFP4 global scale (vLLM
# compressed_tensors_moe_w4a4_nvfp4.py uses w13_weight_global_scale[:, 0]); so their global scale
# comes from the amax over all members (int4_qat/formats/nvfp4.py ``matrix_amax``/``global_amax``).
_FUSED = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"))


def _fusion_candidates(module: str) -> tuple[str, ...]:
    parent, _, leaf = module.rpartition(".")
    for group in _FUSED:
        if leaf in group:
            return tuple(f"{parent}.{m}.weight" for m in group if m != leaf)
    return ()


def attach_siblings(plans: list[TensorPlan], scheme) -> list[TensorPlan]:
    """NVFP4 only: link each packed gate/up (q/k/v) weight to its packed fusion partners."""
    if _fmt(scheme) != "nvfp4":
        return plans
    packed = {p.source for p in plans if p.kind == "pack"}
    out = []
    for p in plans:
        if p.kind == "pack":
            sib = tuple(n for n in _fusion_candidates(p.module) if n in packed)
            if sib:
                p = TensorPlan(p.source, p.kind, p.module, p.outputs, p.split_dim0, sib)
        out.append(p)
    return out


def fused_kwargs(scheme, tensor: torch.Tensor, siblings: list[torch.Tensor]) -> dict:
    """Extra format kwargs for a weight with fusion partners (NVFP4 shared ``global_amax``)."""
    if not siblings or _fmt(scheme) != "nvfp4":
        return {}
    from int4_qat.formats import fused

    amax = fused.matrix_amax(tensor)  # = nvfp4.matrix_amax, one pass
    for s in siblings:
        amax = torch.maximum(amax, fused.matrix_amax(s))
    return {"global_amax": amax}


def quantize(scheme, w: torch.Tensor, name: str, siblings: list[torch.Tensor] | None = None):
    """``scheme.quantize`` plus the shared NVFP4 global amax of fused projections."""
    kw = fused_kwargs(scheme, w, siblings or [])
    if not kw:
        return scheme.quantize(w, name)
    from int4_qat.formats import get_format

    return get_format(scheme.format).quantize(w, scheme.group_size, name=name, **kw, **scheme.quantize_kwargs)


def quantize_pack(scheme, w: torch.Tensor, name: str, siblings: list[torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """``fmt.pack(quantize(...))`` in one fused pass (int4_qat.formats.fused; same bytes)."""
    from int4_qat.formats import fused

    kw = fused_kwargs(scheme, w, siblings or [])
    return fused.quantize_pack(scheme.format, w, scheme.group_size, name=name, **kw, **scheme.rule_kwargs)


def fake_quantize(scheme, w: torch.Tensor, name: str, siblings: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``scheme.fake_quantize`` plus the shared NVFP4 global amax (what training computes on the
    fused Megatron weight); fused kernels, the oracle's bits (int4_qat.formats.fused)."""
    from int4_qat.formats import fused

    kw = fused_kwargs(scheme, w, siblings or [])
    return fused.fake_quantize(scheme.format, w, scheme.group_size, name=name, **kw, **scheme.rule_kwargs)


def _fmt(scheme) -> str:
    return getattr(scheme.format, "value", scheme.format)


def _pack_specs(module: str, n: int, k: int, scheme) -> tuple[TensorSpec, ...]:
    fmt, g = _fmt(scheme), scheme.group_size
    if fmt == "int4":
        return (
            TensorSpec(f"{module}.weight_packed", torch.int32, (n, k // 8)),
            TensorSpec(f"{module}.weight_scale", torch.bfloat16, (n, k // g)),
            TensorSpec(f"{module}.weight_shape", torch.int64, (2,)),
        )
    if fmt == "mxfp4":
        return (
            TensorSpec(f"{module}.weight_packed", torch.uint8, (n, k // 2)),
            TensorSpec(f"{module}.weight_scale", torch.uint8, (n, k // g)),
        )
    if fmt == "nvfp4":
        return (
            TensorSpec(f"{module}.weight_packed", torch.uint8, (n, k // 2)),
            TensorSpec(f"{module}.weight_scale", torch.float8_e4m3fn, (n, k // g)),
            TensorSpec(f"{module}.weight_global_scale", torch.float32, (1,)),
        )
    raise ValueError(f"unknown quant format {fmt!r}; expected int4, mxfp4 or nvfp4")


def _check_divisible(name: str, shape: tuple[int, ...], scheme) -> None:
    k, g = shape[-1], scheme.group_size
    per_word = 8 if _fmt(scheme) == "int4" else 2
    if k % g or k % per_word:
        raise ValueError(
            f"{name}: shape {list(shape)} cannot be quantized: in_features {k} is not divisible by "
            f"the {_fmt(scheme)} group size {g}" + (f" and the pack factor {per_word}" if k % per_word else "")
        )


def plan_tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], scheme, model_type: str) -> TensorPlan:
    """Decide from metadata what ``name`` becomes; raise ``ValueError`` if it cannot be served."""
    shape = tuple(shape)
    m = GPT_OSS_EXPERT_RE.match(name)
    if model_type == "gpt_oss" and m and len(shape) == 3:
        if scheme.quantizes_hf(name) and not never_quantized(m["m"]):
            if _fmt(scheme) != "mxfp4":
                raise ValueError(
                    f"{name}: gpt-oss experts are fused 3-D parameters; they export only as native "
                    f"MXFP4 (--format mxfp4), not {_fmt(scheme)}"
                )
            e, k, n = shape  # gpt-oss stores W as [E, in, out]; the served layout is [E, out, in]
            _check_divisible(name, (e, n, k), scheme)
            blocks = TensorSpec(f"{name}_blocks", torch.uint8, (e, n, k // 32, 16))
            scales = TensorSpec(f"{name}_scales", torch.uint8, (e, n, k // 32))
            return TensorPlan(name, "gpt_oss", name, (blocks, scales), True)
    if name.endswith(".weight") and len(shape) == 2 and dtype.is_floating_point:
        module = name[: -len(".weight")]
        if scheme.quantizes_hf(module) and not never_quantized(module):
            _check_divisible(name, shape, scheme)
            return TensorPlan(name, "pack", module, _pack_specs(module, shape[0], shape[1], scheme), False)
    return TensorPlan(name, "copy", name, (TensorSpec(name, dtype, shape),), len(shape) >= 1)


def check_marlin(scheme, config: dict, serving_tp: int, quantizes_experts: bool, serving_ep: int = 1) -> None:
    """INT4 is served by Marlin kernels in SGLang/vLLM (marlin_utils.py, ``check_moe_marlin_supports_layer``).

    The rule itself lives once, in :func:`int4_qat.planner.marlin_problems` (also what
    ``make check-recipes`` runs). Here a group size other than 32/64/128 only warns (a divisor of K
    is a valid checkpoint, just not a Marlin-servable one); shapes Marlin rejects are errors, with
    the fix in the message.
    """
    if _fmt(scheme) != "int4":
        return
    from int4_qat.planner import arch_shape, marlin_problems

    problems = marlin_problems(arch_shape(config), scheme.group_size, serving_tp, serving_ep,
                               scope=getattr(scheme.scope, "value", scheme.scope))
    if not quantizes_experts:   # nothing MoE-shaped is packed: only the group-size note applies
        problems = [q for q in problems if q.startswith("quant.group_size: Marlin serves")]
    for q in problems:
        if q.startswith("quant.group_size: Marlin serves"):
            warnings.warn(f"{q} -- the checkpoint is valid compressed-tensors, but SGLang's Marlin "
                          "kernels will refuse it", stacklevel=2)
    errors = [q for q in problems if not q.startswith("quant.group_size: Marlin serves")]
    if errors:
        raise ValueError("config.json: this INT4 export cannot be served by Marlin at serving TP "
                         f"{serving_tp} / EP {serving_ep}:\n  " + "\n  ".join(errors)
                         + "\n(pass --allow-unservable to write it anyway)")


def _finite(name: str, t: torch.Tensor) -> None:
    # one reduction pass (NaN propagates through min/max, Inf shows as ±inf); the index only on error
    if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name}: non-finite value (NaN/Inf) at index {bad}; refusing to export")


def convert(plan: TensorPlan, tensor: torch.Tensor, scheme, siblings: list[torch.Tensor] | None = None
            ) -> list[torch.Tensor]:
    """Compute the output tensors of ``plan`` (in ``plan.outputs`` order) from ``tensor``.

    ``tensor`` may be a chunk of dim 0 when ``plan.split_dim0`` (rows for copy, experts for gpt_oss).
    """
    from int4_qat.formats import get_format

    if plan.kind == "copy":
        _finite(plan.source, tensor)  # packed tensors: int4_qat.formats refuses non-finite, naming them
        return [tensor]
    fmt = get_format(scheme.format)
    if plan.kind == "gpt_oss":
        w = tensor.transpose(-1, -2).contiguous()  # [E, in, out] -> [E, out, in]: groups along in
        q = scheme.quantize(w, plan.source)
        blocks, scales = fmt.pack_gpt_oss(q)
        return [blocks, scales]
    for sib_name, sib in zip(plan.siblings, siblings or [], strict=False):
        _finite(sib_name, sib)
    packed = quantize_pack(scheme, tensor, plan.module, siblings)
    out = []
    for spec in plan.outputs:
        suffix = spec.name[len(plan.module) + 1:]
        if suffix not in packed:
            raise RuntimeError(f"int4_qat.formats.{_fmt(scheme)}.pack gave {sorted(packed)}, missing {suffix}")
        t = packed[suffix]
        if suffix == "weight_shape":
            t = t.to(torch.int64)
        out.append(t)
    return out


def chunk_rows(plan: TensorPlan, shape: tuple[int, ...], elem_bytes: int,
               max_bytes: int) -> list[tuple[int, int]] | None:
    """Row ranges of dim 0 so each chunk's input is ≤ ``max_bytes``; ``None`` = whole tensor."""
    if not plan.split_dim0 or not shape:
        return None
    row = math.prod(shape[1:]) * elem_bytes
    if row * shape[0] <= max_bytes:
        return None
    step = max(1, max_bytes // max(row, 1))
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]
