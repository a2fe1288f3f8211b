"""gpt-oss: HF config.json -> Megatron-Core, and the HF<->Megatron name table.

The model (transformers/models/gpt_oss/modeling_gpt_oss.py):

**Attention.** Grouped-query attention with q/k/v/o biases, non-interleaved RoPE (``rotate_half``
halves) with YaRN scaling, and *attention sinks*: one learned logit per head (``self_attn.sinks``)
joins every query's softmax over the keys and is then dropped, so a head can attend "nowhere".
Megatron calls this ``softmax_type="learnable"``; the per-head logit is the parameter
``core_attention.softmax_offset`` (TEDotProductAttention on GPU, our LocalCoreAttention on CPU).
Layers alternate sliding-window and full attention (``layer_types``); HF's window ``W`` lets query
``i`` see keys ``i-W+1 .. i`` (transformers/masking_utils.py ``sliding_window_overlay``), which is
Megatron/TE's ``window_size=(W-1, 0)`` on the layers flagged in ``window_attn_skip_freq``.

**MoE.** Every layer is MoE: the router is a biased linear, top-k of its logits, softmax over those
k (Megatron: ``moe_router_pre_softmax=False``, router bias from ``add_bias_linear``). Experts are
biased and use a clamped SwiGLU variant::

    gate = min(gate, limit); up = clamp(up, -limit, limit)
    out  = (up + 1) * gate * sigmoid(alpha * gate)         # alpha = 1.702, limit = 7

which is Megatron's ``activation_func=quick_gelu`` (``x * sigmoid(1.702 x)``) with
``glu_linear_offset=1`` and ``activation_func_clamp_value=limit`` (megatron/core/transformer/mlp.py
``glu``). Megatron scales each expert's output *including its fc2 bias* by the routing weight, as
HF does (mlp.py ``per_token_scale``).

**Checkpoint layout.** HF stores each layer's experts fused and stacked:
``mlp.experts.gate_up_proj`` ``[E, hidden, 2*I]`` (input dim first; gate and up *interleaved*
along the last dim: column ``2j`` is gate ``j``, ``2j+1`` is up ``j``), ``gate_up_proj_bias``
``[E, 2*I]`` (same interleave), ``down_proj`` ``[E, I, hidden]``, ``down_proj_bias`` ``[E, hidden]``.
Megatron's per-expert ``linear_fc1.weight`` is ``[2*I, hidden]`` = ``[gate; up]`` halves and
``linear_fc2.weight`` ``[hidden, I]``. The rules below are ``stacked`` (one HF tensor holds all
experts on dim 0); the converters act on one expert's slice.

Refused with a ValueError naming the field: ``swiglu_alpha`` other than 1.702, ``attention_bias``
false, layer types other than sliding/full attention, RoPE other than default/YaRN.
"""
from __future__ import annotations

import torch

from int4_qat.arch.base import (
    output_layer_rule,
    ArchDefinition,
    ArchParts,
    HFConfig,
    Rule,
    qkv_to_hf,
    qkv_to_mcore,
    register_arch,
)
from int4_qat.arch.deepseek_v3 import parse_rope

__all__ = ["GPT_OSS", "parse_gpt_oss", "gpt_oss_rules", "gpt_oss_layer_spec",
           "gate_up_to_mcore", "gate_up_to_hf"]

_QUICK_GELU_ALPHA = 1.702        # megatron/core/fusions/fused_bias_geglu.py quick_gelu


def _layer_pattern(cfg: HFConfig, layers: int) -> list[int]:
    """1 = sliding-window layer, 0 = full attention (Megatron's window_attn_skip_freq list)."""
    default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    types = cfg.get("layer_types", default, list)
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"{cfg.path}: field 'layer_types' must list {layers} entries of "
                         f"'sliding_attention'/'full_attention', got {types}")
    return [int(t == "sliding_attention") for t in types]


def parse_gpt_oss(cfg: HFConfig) -> ArchParts:
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    cfg.expect("attention_bias", [True], True, why="gpt-oss q/k/v/o have biases")
    alpha = cfg.get("swiglu_alpha", _QUICK_GELU_ALPHA, float)
    if alpha != _QUICK_GELU_ALPHA:
        raise ValueError(f"{cfg.path}: field 'swiglu_alpha'={alpha} is not supported: Megatron's "
                         f"gated quick_gelu has alpha {_QUICK_GELU_ALPHA}")
    # hidden_act is written by transformers but the experts use the clamped SwiGLU above;
    # initial_context_length is the hub's name for YaRN's original length.
    cfg.ignore("hidden_act", "initial_context_length")
    hidden = cfg.require("hidden_size", int)
    heads = cfg.require("num_attention_heads", int)
    layers = cfg.require("num_hidden_layers", int)
    kv_heads = cfg.get("num_key_value_heads", heads, int)
    if heads % kv_heads:
        raise ValueError(f"{cfg.path}: num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    top_k = cfg.require("num_experts_per_tok", int)
    if cfg.get("experts_per_token", top_k, int) != top_k:
        raise ValueError(f"{cfg.path}: fields 'experts_per_token' and 'num_experts_per_tok' disagree")
    ffn = cfg.require("intermediate_size", int)
    sliding = _layer_pattern(cfg, layers)
    window = cfg.get("sliding_window", None, int)
    if any(sliding) and (window is None or window < 1):
        raise ValueError(f"{cfg.path}: field 'sliding_window'={window} but layer_types has "
                         "sliding_attention layers")
    tf = dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=kv_heads,
        kv_channels=cfg.get("head_dim", hidden // heads, int), ffn_hidden_size=ffn,
        normalization="RMSNorm", layernorm_epsilon=cfg.get("rms_norm_eps", 1e-5, float),
        add_bias_linear=True, add_qkv_bias=True, softmax_type="learnable",
        window_size=(window - 1, 0) if any(sliding) else None,
        window_attn_skip_freq=sliding if any(sliding) else None,
        gated_linear_unit=True, activation_func=quick_gelu, glu_linear_offset=1.0,
        activation_func_clamp_value=cfg.get("swiglu_limit", 7.0, float),
        hidden_dropout=0.0, attention_dropout=cfg.get("attention_dropout", 0.0, (int, float)),
        num_moe_experts=cfg.require("num_local_experts", int, aliases=("num_experts",)),
        moe_layer_freq=[1] * layers, moe_ffn_hidden_size=ffn, moe_router_topk=top_k,
        moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=cfg.get("router_aux_loss_coef", 0.0, float),
    )
    rope = parse_rope(cfg)
    gpt = dict(position_embedding_type="yarn" if rope["type"] == "yarn" else "rope",
               rotary_base=rope["theta"], rotary_percent=1.0)
    yarn = {}
    if rope["type"] == "yarn":
        both = bool(rope["mscale"] and rope["mscale_all_dim"])   # else HF uses mscale(factor)
        # GPTModel reads these with getattr (megatron/core/models/gpt/gpt_model.py:172-191,
        # transformer/attention.py _yarn_get_concentration_factor_from_config).
        yarn = dict(yarn_rotary_scaling_factor=rope["factor"],
                    yarn_original_max_position_embeddings=rope["original_max"],
                    yarn_beta_fast=rope["beta_fast"], yarn_beta_slow=rope["beta_slow"],
                    yarn_mscale=float(rope["mscale"]) if both else None,
                    yarn_mscale_all_dim=float(rope["mscale_all_dim"]) if both else None,
                    yarn_correction_range_round_to_int=rope["truncate"])
    return ArchParts(
        tf_kwargs=tf, vocab_size=cfg.require("vocab_size", int),
        max_position_embeddings=cfg.get("max_position_embeddings", 131072, int), gpt_kwargs=gpt,
        tie_embeddings=cfg.get("tie_word_embeddings", False, bool), moe_layers=[1] * layers,
        extras={"yarn": yarn},
    )


def gpt_oss_layer_spec(arch, config, use_te: bool):
    """All-MoE decoder block spec; attaches the YaRN attributes GPTModel reads from the config;
    the local spec gets LocalCoreAttention (sinks + sliding window on CPU)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    for key, value in arch.extras["yarn"].items():
        setattr(config, key, value)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if not use_te:
        from int4_qat.compat.cpu import use_local_core_attention

        spec = use_local_core_attention(spec)
    return spec


# ------------------------------------------------------------------ fused expert converters
def gate_up_to_mcore(arch, tensors):
    """One expert of HF ``gate_up_proj`` ``[H, 2I]`` (interleaved) -> Megatron fc1 ``[gate; up]``
    ``[2I, H]``; also the bias ``[2I]`` -> ``[gate_b; up_b]``."""
    (t,) = tensors
    if t.ndim == 2:
        return torch.cat([t[:, 0::2].t(), t[:, 1::2].t()]).contiguous()
    return torch.cat([t[0::2], t[1::2]]).contiguous()


def gate_up_to_hf(arch, fc1):
    """Inverse of :func:`gate_up_to_mcore`: re-interleave the halves (and transpose a weight)."""
    gate, up = fc1.chunk(2, dim=0)
    inter = torch.stack([gate, up], dim=1).reshape(fc1.shape)       # rows g0, u0, g1, u1, ...
    return [(inter.t() if fc1.ndim == 2 else inter).contiguous()]


def _transpose(arch, tensors):
    return tensors[0].t().contiguous()


def _transpose_back(arch, full):
    return [full.t().contiguous()]


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_E = _L + "mlp.experts.local_experts.{expert}."
_HE = _H + "mlp.experts."
_QKV = tuple(_H + f"self_attn.{p}_proj" for p in "qkv")


def gpt_oss_rules(arch) -> list[Rule]:
    hid = lambda s: (s.hidden,)  # noqa: E731
    rules = [
        Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), "column",
             shape=lambda s: (s.vocab, s.hidden)),
        # Local spec name first, TE second (TE fuses the input norm into linear_qkv; MoE layers keep
        # a separate pre_mlp_layernorm in both specs: gpt_layer_specs.py).
        Rule((_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight"),
             (_H + "input_layernorm.weight",), shape=hid),
        Rule((_L + "self_attention.linear_qkv.weight",), tuple(q + ".weight" for q in _QKV),
             "column", qkv_to_mcore, qkv_to_hf, shape=lambda s: (s.qkv_out, s.hidden)),
        Rule((_L + "self_attention.linear_qkv.bias",), tuple(q + ".bias" for q in _QKV),
             "column", qkv_to_mcore, qkv_to_hf, shape=lambda s: (s.qkv_out,)),
        Rule((_L + "self_attention.linear_proj.weight",), (_H + "self_attn.o_proj.weight",), "row",
             shape=lambda s: (s.hidden, s.q_dim)),
        Rule((_L + "self_attention.linear_proj.bias",), (_H + "self_attn.o_proj.bias",), shape=hid),
        Rule((_L + "self_attention.core_attention.softmax_offset",), (_H + "self_attn.sinks",),
             "column", shape=lambda s: (s.heads,)),       # one logit per head: split like heads
        Rule((_L + "pre_mlp_layernorm.weight",), (_H + "post_attention_layernorm.weight",), shape=hid),
        Rule((_L + "mlp.router.weight",), (_H + "mlp.router.weight",),
             shape=lambda s: (s.num_experts, s.hidden)),
        Rule((_L + "mlp.router.bias",), (_H + "mlp.router.bias",), shape=lambda s: (s.num_experts,)),
        Rule((_E + "linear_fc1.weight",), (_HE + "gate_up_proj",), "glu",
             gate_up_to_mcore, gate_up_to_hf, stacked=True,
             shape=lambda s: (2 * s.moe_intermediate, s.hidden)),
        Rule((_E + "linear_fc1.bias",), (_HE + "gate_up_proj_bias",), "glu",
             gate_up_to_mcore, gate_up_to_hf, stacked=True, shape=lambda s: (2 * s.moe_intermediate,)),
        Rule((_E + "linear_fc2.weight",), (_HE + "down_proj",), "row",
             _transpose, _transpose_back, stacked=True, shape=lambda s: (s.hidden, s.moe_intermediate)),
        Rule((_E + "linear_fc2.bias",), (_HE + "down_proj_bias",), stacked=True, shape=hid),
        Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), shape=hid),
    ]
    rules.append(output_layer_rule(arch))
    return rules


GPT_OSS = register_arch(ArchDefinition("gpt_oss", parse_gpt_oss, gpt_oss_rules,
                                       layer_spec=gpt_oss_layer_spec))
