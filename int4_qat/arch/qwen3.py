"""Qwen3 (dense) and Qwen3-MoE: HF config.json -> Megatron-Core, and the HF<->Megatron name table.

The model (transformers/models/qwen3_moe/modeling_qwen3_moe.py, qwen3/modeling_qwen3.py):
pre-norm decoder, RMSNorm everywhere, grouped-query attention with a per-head RMSNorm on q and
k before RoPE ("qk_layernorm"), non-interleaved RoPE (``rotate_half``) with ``rope_theta``, no
biases, SwiGLU MLPs, untied embeddings (tied for the small dense Qwen3s).

Qwen3-MoE's sparse block: router logits = ``gate(x)`` over all E experts, softmax over *all*
experts, take top-k; with ``norm_topk_prob`` the k probabilities are renormalised to sum to 1.
Megatron expresses both exactly:

* ``norm_topk_prob=False`` -> ``moe_router_pre_softmax=True``: softmax over all, then top-k.
* ``norm_topk_prob=True``  -> ``moe_router_pre_softmax=False``: top-k of the logits, then softmax
  over those k -- equal to softmax-then-renormalise, since softmax is monotonic and
  ``exp(l_i)/sum_topk exp(l_j)`` is the renormalised probability
  (megatron/core/transformer/moe/moe_utils.py topk_routing_with_score_function).

Layers listed in ``mlp_only_layers`` or not hit by ``decoder_sparse_step`` are dense
(``intermediate_size``); HF's rule ``(i + 1) % step == 0`` becomes Megatron's explicit
``moe_layer_freq`` list.
"""
from __future__ import annotations

import torch.nn.functional as F

from int4_qat.arch.base import (
    ArchDefinition,
    ArchParts,
    HFConfig,
    Rule,
    glu_to_hf,
    glu_to_mcore,
    output_layer_rule,
    qkv_to_hf,
    qkv_to_mcore,
    register_arch,
)

__all__ = ["QWEN3", "QWEN3_MOE", "parse_qwen3", "qwen3_rules"]


def _rope(cfg: HFConfig) -> float:
    """rope_theta from the hub layout (``rope_theta`` + ``rope_scaling``) or the transformers-5
    layout (``rope_parameters = {"rope_type": "default", "rope_theta": ...}``)."""
    params = cfg.get("rope_parameters", None, dict)
    if params is not None:
        if params.get("rope_type", "default") != "default" or set(params) - {"rope_type", "rope_theta"}:
            raise ValueError(f"{cfg.path}: rope_parameters={params} is not supported (only default RoPE)")
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0, float))
    else:
        theta = cfg.get("rope_theta", 10000.0, float)
    scaling = cfg.get("rope_scaling", None)
    if scaling not in (None, {}) and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ValueError(f"{cfg.path}: field 'rope_scaling'={scaling} is not supported "
                         "(YaRN/linear scaling is not implemented for Qwen3 here)")
    return float(theta)


def parse_qwen3(cfg: HFConfig) -> ArchParts:
    moe = cfg.model_type == "qwen3_moe"
    cfg.expect("hidden_act", ["silu"], "silu", why="Qwen3 MLPs are SwiGLU")
    cfg.expect("attention_bias", [False], False, why="q/k/v/o biases are not mapped")
    cfg.expect("use_sliding_window", [False], False, why="sliding-window attention is not implemented")
    cfg.ignore("sliding_window", "max_window_layers")   # only used when use_sliding_window is true
    layer_types = cfg.get("layer_types", None, list)     # transformers-5 writes it for qwen3
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise ValueError(f"{cfg.path}: field 'layer_types' has {sorted(set(layer_types))}; only "
                         "'full_attention' layers are supported")
    hidden = cfg.require("hidden_size", int)
    heads = cfg.require("num_attention_heads", int)
    layers = cfg.require("num_hidden_layers", int)
    kv_heads = cfg.get("num_key_value_heads", heads, int)
    head_dim = cfg.get("head_dim", hidden // heads, int)
    if heads % kv_heads:
        raise ValueError(f"{cfg.path}: num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    tf = dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=kv_heads, kv_channels=head_dim,
        ffn_hidden_size=cfg.require("intermediate_size", int),
        normalization="RMSNorm", layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6, float),
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=True, hidden_dropout=0.0,
        attention_dropout=cfg.get("attention_dropout", 0.0, (int, float)),
    )
    moe_layers = None
    if moe:
        experts = cfg.require("num_experts", int, aliases=("num_local_experts",))
        step = cfg.get("decoder_sparse_step", 1, int)
        mlp_only = cfg.get("mlp_only_layers", [], list)
        bad = [i for i in mlp_only if not isinstance(i, int) or not 0 <= i < layers]
        if bad or step < 1:
            raise ValueError(f"{cfg.path}: invalid mlp_only_layers {bad} / decoder_sparse_step {step}")
        moe_layers = [int(i not in mlp_only and (i + 1) % step == 0) for i in range(layers)]
        norm_topk = cfg.get("norm_topk_prob", False, bool)
        tf.update(
            num_moe_experts=experts, moe_layer_freq=moe_layers,
            moe_ffn_hidden_size=cfg.require("moe_intermediate_size", int),
            moe_router_topk=cfg.require("num_experts_per_tok", int),
            moe_router_pre_softmax=not norm_topk, moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=cfg.get("router_aux_loss_coef", 0.001, float),
        )
    tie = cfg.get("tie_word_embeddings", False, bool)
    return ArchParts(
        tf_kwargs=tf, vocab_size=cfg.require("vocab_size", int),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096, int),
        gpt_kwargs=dict(position_embedding_type="rope", rotary_base=_rope(cfg), rotary_percent=1.0),
        tie_embeddings=tie, moe_layers=moe_layers,
    )


# Megatron names: local spec first, TE spec second (TE fuses the pre-norms into the next linear:
# megatron/core/models/gpt/gpt_layer_specs.py get_gpt_layer_with_transformer_engine_spec).
_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."


def qwen3_rules(arch) -> list[Rule]:
    rules = [
        Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), "column",
             shape=lambda s: (s.vocab, s.hidden)),
        Rule((_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight"),
             (_H + "input_layernorm.weight",), shape=lambda s: (s.hidden,)),
        Rule((_L + "self_attention.linear_qkv.weight",),
             (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
              _H + "self_attn.v_proj.weight"), "column", qkv_to_mcore, qkv_to_hf,
             shape=lambda s: (s.qkv_out, s.hidden)),
        Rule((_L + "self_attention.q_layernorm.weight",), (_H + "self_attn.q_norm.weight",),
             shape=lambda s: (s.head_dim,)),
        Rule((_L + "self_attention.k_layernorm.weight",), (_H + "self_attn.k_norm.weight",),
             shape=lambda s: (s.head_dim,)),
        Rule((_L + "self_attention.linear_proj.weight",), (_H + "self_attn.o_proj.weight",), "row",
             shape=lambda s: (s.hidden, s.q_dim)),
        Rule((_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
             (_H + "post_attention_layernorm.weight",), shape=lambda s: (s.hidden,)),
        # dense MLP (all layers of qwen3; mlp_only_layers of qwen3_moe)
        Rule((_L + "mlp.linear_fc1.weight",), (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
             "glu", glu_to_mcore, glu_to_hf, shape=lambda s: (2 * s.dense_intermediate, s.hidden),
             layers="dense"),
        Rule((_L + "mlp.linear_fc2.weight",), (_H + "mlp.down_proj.weight",), "row",
             shape=lambda s: (s.hidden, s.dense_intermediate), layers="dense"),
        Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), shape=lambda s: (s.hidden,)),
    ]
    if arch.is_moe:
        _E = _L + "mlp.experts.local_experts.{expert}."
        _HE = _H + "mlp.experts.{expert}."
        rules += [
            Rule((_L + "mlp.router.weight",), (_H + "mlp.gate.weight",),
                 shape=lambda s: (s.num_experts, s.hidden), layers="moe"),
            Rule((_E + "linear_fc1.weight",), (_HE + "gate_proj.weight", _HE + "up_proj.weight"),
                 "glu", glu_to_mcore, glu_to_hf, shape=lambda s: (2 * s.moe_intermediate, s.hidden),
                 layers="moe"),
            Rule((_E + "linear_fc2.weight",), (_HE + "down_proj.weight",), "row",
                 shape=lambda s: (s.hidden, s.moe_intermediate), layers="moe"),
        ]
    return rules + [output_layer_rule(arch)]


QWEN3 = register_arch(ArchDefinition("qwen3", parse_qwen3, qwen3_rules,
                                     ignore_hf=(r"^lm_head\.weight$",)))
QWEN3_MOE = register_arch(ArchDefinition("qwen3_moe", parse_qwen3, qwen3_rules))
