"""The quantization scheme: one object that drives fake quant, export and verification.

A :class:`QuantScheme` answers three questions, and every part of the pipeline asks *it*:

1. **What numbers?** ``format`` (INT4 / MXFP4 / NVFP4), ``group_size`` (how many consecutive
   weights along ``in_features`` share one scale) and, for INT4, ``scale_rule``. The numerics live
   in :mod:`int4_qat.formats`; :meth:`QuantScheme.quantize` / :meth:`QuantScheme.fake_quantize`
   only forward the scheme's settings there. Nothing in this module computes a scale.

   ======  ===============  =====================================================
   format  group            scale
   ======  ===============  =====================================================
   INT4    32/64/128 (any   bf16, ``amax/7`` (slime / Kimi-K2 QAT) or ``amax/7.5``
           divisor of K)    (compressed-tensors' own compressor)
   MXFP4   32 (fixed, OCP)  E8M0 power of two, one byte
   NVFP4   16 (fixed)       E4M3 block scale under an fp32 per-tensor global scale
   ======  ===============  =====================================================

   INT4 also has ``served``: how the serving engine evaluates ``q * s``, so fake quant computes the
   weight *that* engine serves (one rule, in :mod:`int4_qat.formats.int4`): ``"bf16"`` (default)
   = ``bf16(q * s)``, what Marlin (SGLang / vLLM) and compressed-tensors compute; ``"exact"`` =
   the exact product ``q * s``, what llama.cpp's Q4_0 decode computes in float32. Codes and scales
   are the same; the two differ only for float32 training (CPU), where ``"exact"`` keeps the bits
   bf16 rounding drops.

2. **Which weights?** ``scope``: ``experts`` quantizes routed-expert weights only (the Kimi-K2 /
   slime default: attention, shared experts, dense MLPs stay BF16); ``all-linear`` quantizes
   every linear projection of the decoder. In *no* scope are the router (Megatron ``mlp.router``,
   HF ``mlp.gate`` / gpt-oss ``mlp.router``), embeddings, norms or the output layer / ``lm_head``
   quantized: a router packed to INT4 is a known way to get a server that silently loads zeros.
   :meth:`QuantScheme.quantizes_megatron` and :meth:`QuantScheme.quantizes_hf` answer the
   question by name; the ModelOpt config is generated from the *same* glob lists (see
   :mod:`int4_qat.modelopt_backend`), and :meth:`QuantScheme.apply` checks afterwards that the
   two agree on the real model.

3. **How does training see it?** :meth:`QuantScheme.apply` inserts ModelOpt ``TensorQuantizer``
   modules (``mtq.quantize``) whose weight quantizers call this project's numerics through a
   registered ModelOpt backend: weight-only (W4A16), no calibration, the per-group scale is
   recomputed from the live weight on every forward, and the backward is a straight-through
   estimator. Because the backend is ordinary torch code, INT4, MXFP4 and NVFP4 fake quant run on
   CPU as well as GPU with the same numbers (ModelOpt's own MXFP4/NVFP4 kernels are CUDA-only).

The scheme serialises to the recipe's ``quant:`` section (:meth:`to_dict` / :meth:`from_dict`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

import torch

from int4_qat.formats import QuantFormat, QuantizedTensor, get_format
from int4_qat.formats import int4 as _int4
from int4_qat.formats import mxfp4 as _mxfp4
from int4_qat.formats import nvfp4 as _nvfp4

# ModelOpt helpers re-exported for callers that hold a quantized model (modelopt itself is only
# imported when they run): the exact fake-quantized weights by parameter name, the enabled weight
# quantizers, and backend registration (needed before the first forward of a model restored from
# a ModelOpt state; QuantScheme.apply does it).
from int4_qat.modelopt_backend import (  # noqa: E402
    enabled_weight_quantizers,
    fake_quantized_weights,
    register_backend,
)

__all__ = [
    "QuantScheme",
    "enabled_weight_quantizers",
    "fake_quantized_weights",
    "register_backend",
    "Scope",
    "SCALE_RULES",
    "SERVED_RULES",
    "FIXED_GROUP_SIZES",
    "DEFAULT_INT4_GROUP_SIZE",
    "MEGATRON_EXPERT_GLOBS",
    "MEGATRON_NON_EXPERT_GLOBS",
    "HF_EXPERT_GLOBS",
    "HF_FUSED_EXPERT_GLOBS",
    "HF_NON_EXPERT_GLOBS",
    "NEVER_QUANTIZED_GLOBS",
]


class Scope(str, Enum):
    """Which weights a scheme quantizes."""

    EXPERTS = "experts"  # routed experts only (Kimi-K2 / slime default)
    ALL_LINEAR = "all-linear"  # every decoder linear; router/embeddings/norms/head still excluded


# Defaults and allowed values come from the numerics modules (one source of truth).
SCALE_RULES = tuple(_int4.SCALE_RULES)  # ("amax/7", "amax/7.5")
SERVED_RULES = ("bf16", "exact")  # int4_qat.formats.int4 ``served=`` (Marlin / llama.cpp)
DEFAULT_SERVED = "bf16"
DEFAULT_INT4_GROUP_SIZE = _int4.DEFAULT_GROUP_SIZE  # 128
DEFAULT_SCALE_RULE = "amax/7"  # slime / Kimi-K2 QAT convention
# The FP4 block sizes are part of the formats themselves (OCP MX spec: 32; NVFP4: 16).
FIXED_GROUP_SIZES = {
    QuantFormat.MXFP4: _mxfp4.DEFAULT_GROUP_SIZE,
    QuantFormat.NVFP4: _nvfp4.DEFAULT_GROUP_SIZE,
}

# --------------------------------------------------------------------------------------------
# Name globs (fnmatch, matched against a module name, or for fused 3-D expert tensors against
# the parameter name). These lists are the single source of truth for "is this weight
# quantized?": quantizes_megatron / quantizes_hf match them, and the ModelOpt quant_cfg is built
# from them (module glob + ".weight_quantizer"; fused param glob + "_weight_quantizer").
# --------------------------------------------------------------------------------------------

# Megatron-Core: SequentialMLP experts (megatron/core/transformer/moe/experts.py) and the
# TEGroupedMLP / GroupedMLP containers whose linear_fc1/2 hold all local experts.
MEGATRON_EXPERT_GLOBS = (
    "*mlp.experts.local_experts.*.linear_fc1",
    "*mlp.experts.local_experts.*.linear_fc2",
    "*mlp.experts.linear_fc1",
    "*mlp.experts.linear_fc2",
)
# Everything else that is a decoder linear (added by scope all-linear).
MEGATRON_NON_EXPERT_GLOBS = (
    "*mlp.shared_experts.linear_fc1",
    "*mlp.shared_experts.linear_fc2",
    "*mlp.linear_fc1",  # dense MLP (e.g. DeepSeek-V3 first_k_dense_replace layers)
    "*mlp.linear_fc2",
    "*self_attention.linear_qkv",
    "*self_attention.linear_proj",
    # MLA (megatron/core/transformer/multi_latent_attention.py)
    "*self_attention.linear_q_proj",
    "*self_attention.linear_q_down_proj",
    "*self_attention.linear_q_up_proj",
    "*self_attention.linear_kv_down_proj",
    "*self_attention.linear_kv_up_proj",
)
# HF transformers: per-expert nn.Linear (qwen3_moe, deepseek_v3 checkpoints) and the fused 3-D
# expert parameters (gpt-oss GptOssExperts; transformers>=5 @use_experts_implementation).
HF_EXPERT_GLOBS = (
    "*mlp.experts.*.gate_proj",
    "*mlp.experts.*.up_proj",
    "*mlp.experts.*.down_proj",
    "*mlp.experts.gate_up_proj",
    "*mlp.experts.down_proj",
)
# Fused 3-D expert parameters: ModelOpt names their quantizers "<param>_weight_quantizer(s)".
HF_FUSED_EXPERT_GLOBS = frozenset({"*mlp.experts.gate_up_proj", "*mlp.experts.down_proj"})
HF_NON_EXPERT_GLOBS = (
    "*mlp.shared_experts.gate_proj",  # deepseek_v3
    "*mlp.shared_experts.up_proj",
    "*mlp.shared_experts.down_proj",
    "*mlp.shared_expert.gate_proj",  # qwen2_moe-style singular
    "*mlp.shared_expert.up_proj",
    "*mlp.shared_expert.down_proj",
    "*mlp.gate_proj",  # dense MLP
    "*mlp.up_proj",
    "*mlp.down_proj",
    "*self_attn.q_proj",
    "*self_attn.k_proj",
    "*self_attn.v_proj",
    "*self_attn.o_proj",
    # DeepSeek-V3 MLA (transformers models/deepseek_v3/modeling_deepseek_v3.py)
    "*self_attn.q_a_proj",
    "*self_attn.q_b_proj",
    "*self_attn.kv_a_proj_with_mqa",
    "*self_attn.kv_b_proj",
)
# Never quantized, in any scope (checked first, so no enable glob can override them).
NEVER_QUANTIZED_GLOBS = (
    "*router*",  # Megatron mlp.router, gpt-oss mlp.router
    "*mlp.gate",  # HF qwen3_moe / deepseek_v3 router (a Linear named "gate")
    "*mlp.gate.*",
    "*shared_expert_gate*",
    "*embedding*",  # Megatron embedding.word_embeddings
    "*embed_tokens*",
    "*output_layer*",
    "*lm_head*",
    "*norm*",  # RMSNorm / LayerNorm / q_a_layernorm / kv_a_layernorm
)


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _weight_owner(name: str, hf: bool) -> str | None:
    """Reduce a module or parameter name to the name the globs match; None for non-weights.

    ``...linear_fc1`` and ``...linear_fc1.weight`` (and TE grouped ``...linear_fc1.weight3``) are
    the same weight; ``...gate_up_proj`` (gpt-oss fused parameter) is matched as is; biases,
    TE ``_extra_state`` and quantizer buffers are not weights.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"module name must be a non-empty string, got {name!r}")
    last = name.rsplit(".", 1)[-1]
    if last == "bias" or last.endswith("_bias") or "_extra_state" in last or "quantizer" in name:
        return None
    if last == "weight" or (not hf and last.startswith("weight") and last[6:].isdigit()):
        return name.rsplit(".", 1)[0]
    return name


@dataclass(frozen=True)
class QuantScheme:
    """Format + group size + scope (+ INT4 scale rule and served rule); see the module docstring.

    ``group_size=None`` means the format's default (INT4 128, MXFP4 32, NVFP4 16);
    ``scale_rule=None`` means ``amax/7`` for INT4 and must stay None for the FP4 formats;
    ``served=None`` means ``bf16`` (Marlin) for INT4 and must stay None for the FP4 formats.
    Strings are accepted for ``format`` and ``scope`` and normalised to the enums.
    """

    format: QuantFormat = QuantFormat.INT4
    group_size: int | None = None
    scope: Scope = Scope.EXPERTS
    scale_rule: str | None = None
    served: str | None = None

    def __post_init__(self) -> None:
        fmt = _coerce_enum(QuantFormat, self.format, "format")
        scope = _coerce_enum(Scope, self.scope, "scope")
        group = self.group_size
        if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
            raise ValueError(f"group_size must be an integer, got {group!r}")
        if fmt in FIXED_GROUP_SIZES:
            fixed = FIXED_GROUP_SIZES[fmt]
            if group is not None and group != fixed:
                raise ValueError(
                    f"group_size={group} is not valid for {fmt.value}: its block size is fixed "
                    f"at {fixed} by the format; omit group_size or set {fixed}"
                )
            group = fixed
            if self.scale_rule is not None:
                raise ValueError(
                    f"scale_rule={self.scale_rule!r} applies to int4 only; {fmt.value} has a "
                    "fixed scale rule (leave scale_rule unset)"
                )
            if self.served is not None:
                raise ValueError(
                    f"served={self.served!r} applies to int4 only; {fmt.value} has one served "
                    "weight for every engine (leave served unset)"
                )
            rule = served = None
        else:
            group = DEFAULT_INT4_GROUP_SIZE if group is None else group
            if group <= 0:
                raise ValueError(f"group_size must be positive, got {group}")
            rule = DEFAULT_SCALE_RULE if self.scale_rule is None else self.scale_rule
            if rule not in SCALE_RULES:
                raise ValueError(
                    f"scale_rule={rule!r} is not supported; allowed values: {list(SCALE_RULES)}"
                )
            served = DEFAULT_SERVED if self.served is None else self.served
            if served not in SERVED_RULES:
                raise ValueError(
                    f"served={served!r} is not supported; allowed values: {list(SERVED_RULES)} "
                    "('bf16' for SGLang / vLLM Marlin, 'exact' for llama.cpp)"
                )
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "group_size", group)
        object.__setattr__(self, "scale_rule", rule)
        object.__setattr__(self, "served", served)

    # ---------------------------------------------------------------- numerics (delegated)
    @property
    def _fmt_module(self):
        return get_format(self.format)

    @property
    def rule_kwargs(self) -> dict[str, str]:
        """Keyword arguments ``fake_quantize`` takes besides the group size (INT4: ``scale_rule``
        and ``served``; nothing for the FP4 formats). ``quantize`` takes the scale rule only
        (:attr:`quantize_kwargs`), ``dequantize`` the served rule only."""
        kw = {"scale_rule": self.scale_rule} if self.scale_rule is not None else {}
        if self.served is not None:
            kw["served"] = self.served
        return kw

    @property
    def quantize_kwargs(self) -> dict[str, str]:
        """The subset of :attr:`rule_kwargs` that ``quantize`` takes (codes and scales do not
        depend on how the engine evaluates ``q * s``)."""
        return {k: v for k, v in self.rule_kwargs.items() if k != "served"}

    def quantize(self, w: torch.Tensor, name: str = "weight") -> QuantizedTensor:
        """Real quantization of ``w`` ([..., N, K], groups along K) with this scheme's settings."""
        return self._fmt_module.quantize(w, self.group_size, name=name, **self.quantize_kwargs)

    def fake_quantize(self, w: torch.Tensor, name: str = "weight") -> torch.Tensor:
        """``dequantize(quantize(w))`` in ``w.dtype``; straight-through backward."""
        return self._fmt_module.fake_quantize(w, self.group_size, name=name, **self.rule_kwargs)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The served weight of ``q`` in ``dtype``."""
        served = {"served": self.served} if self.served is not None else {}
        return self._fmt_module.dequantize(q, dtype, **served)

    # ---------------------------------------------------------------- scope
    def _enable_globs(self, hf: bool) -> tuple[str, ...]:
        experts = HF_EXPERT_GLOBS if hf else MEGATRON_EXPERT_GLOBS
        if self.scope is Scope.EXPERTS:
            return experts
        return experts + (HF_NON_EXPERT_GLOBS if hf else MEGATRON_NON_EXPERT_GLOBS)

    def _quantizes(self, module_name: str, hf: bool) -> bool:
        owner = _weight_owner(module_name, hf)
        if owner is None or _matches(owner, NEVER_QUANTIZED_GLOBS):
            return False
        return _matches(owner, self._enable_globs(hf))

    def quantizes_megatron(self, module_name: str) -> bool:
        """Whether the Megatron-Core module (or its ``.weight``) is fake-quantized by this scheme.

        >>> QuantScheme().quantizes_megatron("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1")
        True
        >>> QuantScheme().quantizes_megatron("decoder.layers.0.mlp.router")
        False
        """
        return self._quantizes(module_name, hf=False)

    def quantizes_hf(self, module_name: str) -> bool:
        """Whether the HF module / parameter (checkpoint name) is quantized by this scheme.

        >>> QuantScheme().quantizes_hf("model.layers.0.mlp.experts.3.gate_proj.weight")
        True
        >>> QuantScheme().quantizes_hf("model.layers.0.mlp.gate.weight")
        False
        """
        return self._quantizes(module_name, hf=True)

    # ---------------------------------------------------------------- ModelOpt
    def modelopt_config(self) -> dict[str, Any]:
        """The ``mtq.quantize`` config: weight-only, our backend, everything else disabled."""
        from int4_qat.modelopt_backend import build_modelopt_config

        return build_modelopt_config(self)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Register the backend (idempotent) and ``mtq.quantize`` ``model`` in place.

        No calibration runs (weight-only, the scale comes from the live weight every forward).
        Raises ValueError for layouts the backend cannot quantize correctly (legacy Megatron
        ``GroupedMLP``) and RuntimeError if ModelOpt enabled a quantizer the scheme does not
        claim by name.
        """
        from int4_qat.modelopt_backend import apply_scheme

        return apply_scheme(self, model)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The recipe ``quant:`` section: plain str/int values, round-trips through from_dict."""
        return {
            "format": self.format.value,
            "group_size": self.group_size,
            "scope": self.scope.value,
            "scale_rule": self.scale_rule,
            "served": self.served,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantScheme":
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are a ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"quant scheme must be a mapping, got {type(d).__name__}")
        allowed = ("format", "group_size", "scope", "scale_rule", "served")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown quant scheme key(s) {unknown}; allowed keys: {list(allowed)}")
        return cls(**{k: d[k] for k in allowed if k in d})

    def describe(self) -> str:
        """One line for logs, e.g. ``int4 g128 amax/7 scope=experts`` (``served=exact`` added
        when it is not the default)."""
        rule = f" {self.scale_rule}" if self.scale_rule else ""
        served = f" served={self.served}" if self.served not in (None, DEFAULT_SERVED) else ""
        return f"{self.format.value} g{self.group_size}{rule}{served} scope={self.scope.value}"


def _coerce_enum(enum_cls, value, key: str):
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = [m.value for m in enum_cls]
        raise ValueError(f"{key}={value!r} is not valid; allowed values: {allowed}") from None
