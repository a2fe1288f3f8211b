"""DeepSeek-V3 / Kimi-K2: HF config.json -> Megatron-Core (MLA + sigmoid-routed MoE), name table.

The model (transformers/models/deepseek_v3/modeling_deepseek_v3.py; Kimi-K2 ships the same
architecture under ``model_type: kimi_k2``):

**Multi-head Latent Attention (MLA).** Queries and keys/values go through low-rank "latents":
``q = q_b_proj(RMSNorm(q_a_proj(x)))`` (``q_lora_rank``; without it a plain ``q_proj``), and
``kv_a_proj_with_mqa(x)`` gives a ``kv_lora_rank`` latent plus one shared ``qk_rope_head_dim``
RoPE key; ``kv_b_proj(RMSNorm(latent))`` expands the latent into per-head ``k_nope``
(``qk_nope_head_dim``) and ``v`` (``v_head_dim``). Each head's key is ``[k_nope, k_rope]``, so q/k
heads are ``nope + rope`` wide while v heads are ``v_head_dim`` wide -- which is why Megatron passes
``k_channels``/``v_channels`` to the core attention. RoPE rotates interleaved pairs
(``rope_interleave``); Megatron's MLA de-interleaves the same way
(megatron/core/models/common/embeddings/rope_utils.py ``_apply_rotary_pos_emb_bshd``).
With YaRN the cos/sin are multiplied by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
and the softmax scale by ``mscale(factor, mscale_all_dim)**2``, as in Megatron's MLA.

**MoE.** The first ``first_k_dense_replace`` layers have a dense SwiGLU MLP (``intermediate_size``);
the others ``n_routed_experts`` SwiGLU experts (``moe_intermediate_size``) plus ``n_shared_experts``
always-on shared experts (one MLP of ``n_shared * moe_intermediate_size``). The router scores each
expert with ``sigmoid(x W^T)``; *selection* uses ``score + e_score_correction_bias`` (DeepSeek's
auxiliary-loss-free balancing bias), first keeping the ``topk_group`` best of ``n_group`` expert
groups (group score = sum of its top-2), then the top-k experts inside them; the *weights* are the
un-biased scores of the chosen experts, renormalised (``norm_topk_prob``) and multiplied by
``routed_scaling_factor``. Megatron: ``moe_router_score_function="sigmoid"``,
``moe_router_enable_expert_bias`` (buffer ``mlp.router.expert_bias``), ``moe_router_num_groups`` /
``moe_router_group_topk`` (moe_utils.py ``group_limited_topk`` scores a group by its top
``topk // group_topk`` experts, hence the check that this is 2), ``moe_router_topk_scaling_factor``.

What is refused with a ValueError naming the field: ``rope_interleave=false``, attention biases,
``norm_topk_prob=false`` with top-k > 1 (Megatron always renormalises sigmoid scores), group scoring
other than top-2, non-sigmoid scoring, RoPE types other than default/YaRN, YaRN ``truncate=false``.

Multi-token-prediction layers (``num_nextn_predict_layers``) are not part of the model trained here;
their checkpoint tensors (``model.layers.{num_hidden_layers + i}.*``) are skipped on import.
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from int4_qat.arch.base import (
    output_layer_rule,
    ArchDefinition,
    ArchParts,
    HFConfig,
    Rule,
    glu_to_hf,
    glu_to_mcore,
    register_arch,
)

__all__ = ["DEEPSEEK_V3", "KIMI_K2", "parse_deepseek_v3", "deepseek_v3_rules",
           "deepseek_v3_layer_spec", "parse_rope"]

_YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor"}


def parse_rope(cfg: HFConfig) -> dict:
    """RoPE settings from either config layout: transformers-5 ``rope_parameters`` or the hub's
    ``rope_theta`` + ``rope_scaling``. Returns ``{"type": "rope"|"yarn", "theta", and for YaRN
    "factor", "original_max", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}``
    with transformers' defaults (transformers/modeling_rope_utils.py ``_compute_yarn_parameters``).
    """
    params = cfg.get("rope_parameters", None, dict)
    scaling = cfg.get("rope_scaling", None, dict)
    if params is not None and scaling:
        raise ValueError(f"{cfg.path}: both 'rope_parameters' and 'rope_scaling' are set; keep one")
    field = "rope_parameters" if params is not None else "rope_scaling"
    p = dict(params if params is not None else (scaling or {}))
    theta = p.get("rope_theta", cfg.get("rope_theta", 10000.0, (int, float)))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        extra = set(p) - {"rope_type", "type", "rope_theta"}
        if extra:
            raise ValueError(f"{cfg.path}: field {field!r} has {sorted(extra)} for default RoPE")
        return {"type": "rope", "theta": float(theta)}
    if kind != "yarn":
        raise ValueError(f"{cfg.path}: field {field!r} rope_type={kind!r} is not supported "
                         "(supported: default, yarn)")
    unknown = set(p) - _YARN_KEYS
    if unknown:
        raise ValueError(f"{cfg.path}: field {field!r} has unsupported YaRN key(s) {sorted(unknown)}")
    if p.get("attention_factor") is not None:
        raise ValueError(f"{cfg.path}: field {field!r}: an explicit 'attention_factor' is not "
                         "supported (it is derived from factor/mscale/mscale_all_dim)")
    for key in ("factor", "original_max_position_embeddings"):
        if not isinstance(p.get(key), (int, float)):
            raise ValueError(f"{cfg.path}: field {field!r} needs a number for YaRN key {key!r}")
    return {"type": "yarn", "theta": float(theta), "factor": float(p["factor"]),
            "original_max": int(p["original_max_position_embeddings"]),
            "beta_fast": float(p.get("beta_fast") or 32.0), "beta_slow": float(p.get("beta_slow") or 1.0),
            "mscale": p.get("mscale"), "mscale_all_dim": p.get("mscale_all_dim"),
            "truncate": bool(p.get("truncate", True)), "field": field}


def _mla_rope(cfg: HFConfig) -> dict:
    """MLATransformerConfig RoPE fields reproducing HF's YaRN scaling (see the module docstring)."""
    rope = parse_rope(cfg)
    if rope["type"] == "rope":
        # rotary_scaling_factor also feeds MLA's softmax mscale: 1.0 makes that factor 1.
        return dict(rope_type="rope", rotary_base=rope["theta"], rotary_scaling_factor=1.0)
    if not rope["truncate"]:
        raise ValueError(f"{cfg.path}: field {rope['field']!r} truncate=false is not supported by "
                         "Megatron's MLA YaRN (it always rounds the correction range)")
    ms, msa = rope["mscale"], rope["mscale_all_dim"]
    if ms and msa:
        mscale, mscale_all_dim = float(ms), float(msa)
    elif not msa:           # HF: cos/sin * mscale(factor); softmax scale unchanged
        mscale, mscale_all_dim = 1.0, 0.0
    else:
        raise ValueError(f"{cfg.path}: field {rope['field']!r} mscale={ms!r} with "
                         f"mscale_all_dim={msa!r} has no Megatron MLA equivalent")
    return dict(rope_type="yarn", rotary_base=rope["theta"], rotary_scaling_factor=rope["factor"],
                original_max_position_embeddings=rope["original_max"], beta_fast=rope["beta_fast"],
                beta_slow=rope["beta_slow"], mscale=mscale, mscale_all_dim=mscale_all_dim)


def _router(cfg: HFConfig, experts: int, top_k: int) -> dict:
    cfg.expect("scoring_func", ["sigmoid"], "sigmoid", why="DeepSeek-V3 routing is sigmoid")
    cfg.expect("topk_method", ["noaux_tc"], "noaux_tc",
               why="selection with e_score_correction_bias and group-limited top-k")
    if top_k > 1:
        cfg.expect("norm_topk_prob", [True], True,
                   why="Megatron renormalises the top-k sigmoid scores (moe_utils.py)")
    else:
        cfg.ignore("norm_topk_prob")
    n_group = cfg.get("n_group", 1, int)
    topk_group = cfg.get("topk_group", n_group, int)
    groups = {}
    if n_group > 1:
        if experts % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"{cfg.path}: n_group={n_group} / topk_group={topk_group} do not fit "
                             f"n_routed_experts={experts}")
        if top_k % topk_group or top_k // topk_group != 2:
            raise ValueError(f"{cfg.path}: fields num_experts_per_tok={top_k} / topk_group="
                             f"{topk_group}: HF scores a group by its top-2 experts, Megatron by its "
                             "top (num_experts_per_tok // topk_group); they agree only when that is 2")
        groups = dict(moe_router_num_groups=n_group, moe_router_group_topk=topk_group)
    return dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=cfg.get("routed_scaling_factor", 1.0, float),
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, **groups)


def parse_deepseek_v3(cfg: HFConfig) -> ArchParts:
    cfg.expect("hidden_act", ["silu"], "silu", why="DeepSeek-V3 MLPs are SwiGLU")
    cfg.expect("attention_bias", [False], False, why="MLA projection biases are not mapped")
    cfg.expect("rope_interleave", [True], True,
               why="Megatron's MLA always de-interleaves the RoPE dims (rope_utils.py)")
    cfg.expect("moe_layer_freq", [1], 1, why="HF makes every layer after first_k_dense_replace MoE")
    cfg.expect("pretraining_tp", [1], 1)
    # Training-time / inference-only fields that do not change the forward pass.
    # (head_dim / qk_head_dim are derived values transformers writes back.)
    cfg.ignore("aux_loss_alpha", "seq_aux", "ep_size", "num_nextn_predict_layers", "num_mtp_layers",
               "head_dim", "qk_head_dim")
    hidden = cfg.require("hidden_size", int)
    heads = cfg.require("num_attention_heads", int)
    layers = cfg.require("num_hidden_layers", int)
    if cfg.get("num_key_value_heads", heads, int) != heads:
        raise ValueError(f"{cfg.path}: field 'num_key_value_heads' must equal num_attention_heads "
                         f"({heads}) for MLA")
    eps = cfg.get("rms_norm_eps", 1e-6, float)
    if eps != 1e-6:
        # modeling_deepseek_v3.py builds q_a_layernorm / kv_a_layernorm with the default 1e-6.
        raise ValueError(f"{cfg.path}: field 'rms_norm_eps'={eps} is not supported: HF's MLA latent "
                         "norms use 1e-6 while Megatron uses one epsilon for every norm")
    dense = cfg.get("first_k_dense_replace", 0, int)
    experts = cfg.require("n_routed_experts", int)
    top_k = cfg.require("num_experts_per_tok", int)
    shared = cfg.get("n_shared_experts", 1, int)
    moe_ffn = cfg.require("moe_intermediate_size", int)
    if not 0 <= dense <= layers or shared < 1:
        raise ValueError(f"{cfg.path}: fields first_k_dense_replace={dense} / n_shared_experts="
                         f"{shared} are out of range (0..{layers} / >= 1)")
    moe_layers = [int(i >= dense) for i in range(layers)]
    q_lora = cfg.get("q_lora_rank", None, int)
    tf = dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=cfg.require("intermediate_size", int),
        normalization="RMSNorm", layernorm_epsilon=eps, multi_latent_attention=True,
        qk_layernorm=True,             # builds MLA's q_layernorm / kv_layernorm (the latent norms)
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=cfg.get("attention_dropout", 0.0, (int, float)),
        num_moe_experts=experts, moe_layer_freq=moe_layers, moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=top_k, moe_shared_expert_intermediate_size=shared * moe_ffn,
        **_router(cfg, experts, top_k),
    )
    mla = dict(
        q_lora_rank=q_lora, kv_lora_rank=cfg.require("kv_lora_rank", int),
        qk_head_dim=cfg.require("qk_nope_head_dim", int),
        qk_pos_emb_head_dim=cfg.require("qk_rope_head_dim", int),
        v_head_dim=cfg.require("v_head_dim", int), rotary_percent=1.0, **_mla_rope(cfg),
    )
    return ArchParts(
        tf_kwargs=tf, vocab_size=cfg.require("vocab_size", int),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096, int),
        # MLA owns its RoPE; GPTModel skips its own for multi_latent_attention (gpt_model.py:159).
        gpt_kwargs=dict(position_embedding_type="rope", rotary_base=mla["rotary_base"]),
        tie_embeddings=cfg.get("tie_word_embeddings", False, bool), moe_layers=moe_layers,
        extras={"mla": mla},
    )


def _as_mla_config(config, mla: dict):
    """Turn the TransformerConfig that ``base.build_model`` built into an MLATransformerConfig.

    ``build_model`` instantiates ``TransformerConfig``, which has no MLA fields; MLASelfAttention
    reads them from the config. We re-validate all fields through ``MLATransformerConfig`` and
    re-class the same object in place (GPTModel must receive this very object). To be replaced by
    a ``config_class`` hook in base.py."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    if isinstance(config, MLATransformerConfig):
        return config
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig) if f.init}
    full = MLATransformerConfig(**base, **mla)
    config.__class__ = MLATransformerConfig
    config.__dict__.update(full.__dict__)
    return config


def deepseek_v3_layer_spec(arch, config, use_te: bool):
    """Decoder block spec (dense first layers, MoE after) with MLA; local spec -> LocalCoreAttention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = _as_mla_config(config, arch.extras["mla"])
    from int4_qat.compat.cpu import structure_only_active

    if not use_te and config.tensor_model_parallel_size > 1 and not structure_only_active():
        raise ValueError(f"{arch.config_path}: MLA with TP>1 needs the TE spec (use_te=True): the "
                         "local spec shards linear_q_down_proj/linear_kv_down_proj, TE duplicates them")
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if not use_te:
        from int4_qat.compat.cpu import use_local_core_attention

        spec = use_local_core_attention(spec)
    return spec


# Megatron names: local spec first, TE spec second (TE fuses the latent norms into the up
# projections and the dense layers' pre-MLP norm into fc1: gpt_layer_specs.py
# get_gpt_layer_with_transformer_engine_spec, multi_latent_attention branch).
_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_A = _L + "self_attention."
_HA = _H + "self_attn."


def _mlp_rules(mcore: str, hf: str, width, layers: str) -> list[Rule]:
    """SwiGLU fc1 ([gate; up]) / fc2 of an MLP whose intermediate width is ``width(shape)``."""
    return [Rule((mcore + "linear_fc1.weight",), (hf + "gate_proj.weight", hf + "up_proj.weight"),
                 "glu", glu_to_mcore, glu_to_hf, shape=lambda s: (2 * width(s), s.hidden), layers=layers),
            Rule((mcore + "linear_fc2.weight",), (hf + "down_proj.weight",), "row",
                 shape=lambda s: (s.hidden, width(s)), layers=layers)]


def _qk(s) -> int:
    return s.mla["qk_nope"] + s.mla["qk_rope"]


def deepseek_v3_rules(arch) -> list[Rule]:
    mla = arch.extras["mla"]
    rules = [
        Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), "column",
             shape=lambda s: (s.vocab, s.hidden)),
        Rule((_L + "input_layernorm.weight",), (_H + "input_layernorm.weight",), shape=lambda s: (s.hidden,)),
        # TE duplicates the down projections on every TP rank (TELinear parallel_mode="duplicated").
        Rule((_A + "linear_kv_down_proj.weight",), (_HA + "kv_a_proj_with_mqa.weight",),
             shape=lambda s: (s.mla["kv_lora_rank"] + s.mla["qk_rope"], s.hidden)),
        Rule((_A + "kv_layernorm.weight", _A + "linear_kv_up_proj.layer_norm_weight"),
             (_HA + "kv_a_layernorm.weight",), shape=lambda s: (s.mla["kv_lora_rank"],)),
        Rule((_A + "linear_kv_up_proj.weight",), (_HA + "kv_b_proj.weight",), "column",
             shape=lambda s: (s.heads * (s.mla["qk_nope"] + s.mla["v_head_dim"]), s.mla["kv_lora_rank"])),
        Rule((_A + "linear_proj.weight",), (_HA + "o_proj.weight",), "row",
             shape=lambda s: (s.hidden, s.q_dim)),
        Rule((_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
             (_H + "post_attention_layernorm.weight",), shape=lambda s: (s.hidden,)),
        *_mlp_rules(_L + "mlp.", _H + "mlp.", lambda s: s.dense_intermediate, "dense"),  # first_k_dense_replace
        Rule((_L + "mlp.router.weight",), (_H + "mlp.gate.weight",),
             shape=lambda s: (s.num_experts, s.hidden), layers="moe"),
        Rule((_L + "mlp.router.expert_bias",), (_H + "mlp.gate.e_score_correction_bias",),
             shape=lambda s: (s.num_experts,), layers="moe"),
        *_mlp_rules(_L + "mlp.shared_experts.", _H + "mlp.shared_experts.",
                    lambda s: s.shared_experts * s.shared_intermediate, "moe"),
        *_mlp_rules(_L + "mlp.experts.local_experts.{expert}.", _H + "mlp.experts.{expert}.",
                    lambda s: s.moe_intermediate, "moe"),
        Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), shape=lambda s: (s.hidden,)),
    ]
    if mla["q_lora_rank"] is None:
        rules.append(Rule((_A + "linear_q_proj.weight",), (_HA + "q_proj.weight",), "column",
                          shape=lambda s: (s.heads * _qk(s), s.hidden)))
    else:
        rules += [
            Rule((_A + "linear_q_down_proj.weight",), (_HA + "q_a_proj.weight",),
                 shape=lambda s: (s.mla["q_lora_rank"], s.hidden)),
            Rule((_A + "q_layernorm.weight", _A + "linear_q_up_proj.layer_norm_weight"),
                 (_HA + "q_a_layernorm.weight",), shape=lambda s: (s.mla["q_lora_rank"],)),
            Rule((_A + "linear_q_up_proj.weight",), (_HA + "q_b_proj.weight",), "column",
                 shape=lambda s: (s.heads * _qk(s), s.mla["q_lora_rank"])),
        ]
    rules.append(output_layer_rule(arch))
    return rules


# Multi-token-prediction layers sit after the last decoder layer (index >= num_hidden_layers): their
# decoder-layer tensors match the rules but no Megatron layer asks for them, so import never reads
# them; this pattern declares their MTP-only tensors (enorm/hnorm/eh_proj/shared_head and the MTP
# copy of embed_tokens) ignorable.
_MTP_ONLY = r"^model\.layers\.\d+\.(enorm|hnorm|eh_proj|shared_head|embed_tokens)\."

DEEPSEEK_V3 = register_arch(ArchDefinition(
    "deepseek_v3", parse_deepseek_v3, deepseek_v3_rules, layer_spec=deepseek_v3_layer_spec,
    ignore_hf=(_MTP_ONLY,)))
KIMI_K2 = register_arch(ArchDefinition(
    "kimi_k2", parse_deepseek_v3, deepseek_v3_rules, layer_spec=deepseek_v3_layer_spec,
    ignore_hf=(_MTP_ONLY,)))
