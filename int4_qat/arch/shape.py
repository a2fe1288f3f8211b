"""The shape of a model, from its HF ``config.json``: one torch-free reading for everything.

Three consumers need the sizes of a model and must never disagree about them:

* the memory planner and the launch checks (:mod:`int4_qat.planner`, ``tools/launch.py check``),
  which run on a laptop and must not import torch;
* the layout rules (:func:`int4_qat.parallel.validate_layout`: heads / query groups / FFN widths
  versus TP, EP, ETP; quantization groups versus row-parallel shards);
* the model builders and the HF <-> Megatron name tables (:mod:`int4_qat.arch`), whose ``Rule``
  shapes say which tensor an architecture's checkpoint must hold and how large it is.

:func:`arch_shape` normalises the config of every supported ``model_type`` (and its aliases:
``kimi_k2`` is DeepSeek-V3's architecture) into one :class:`ArchShape`. The strict, field-by-field
reading that refuses unknown config keys is the builders' (``int4_qat.arch.*.parse_*``); a test
checks that both readings agree for every shipped config and every registered alias.

Which layers are MoE (the only non-trivial part):

* Qwen3-MoE: layer ``i`` is sparse iff ``i`` is not in ``mlp_only_layers`` and
  ``(i + 1) % decoder_sparse_step == 0`` (transformers ``Qwen3MoeDecoderLayer``);
* DeepSeek-V3 / Kimi-K2: ``i >= first_k_dense_replace`` (and ``i % moe_layer_freq == 0``);
* gpt-oss: every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["ArchShape", "arch_shape", "MODEL_TYPES", "ALIASES"]

#: model_type -> the architecture family that reads it.
ALIASES = {"qwen3_moe": "qwen3_moe", "qwen3": "qwen3", "deepseek_v3": "deepseek_v3",
           "kimi_k2": "deepseek_v3", "gpt_oss": "gpt_oss"}
MODEL_TYPES = tuple(ALIASES)


@dataclass(frozen=True)
class ArchShape:
    """The config.json numbers every consumer needs, normalised across qwen3_moe / qwen3 /
    deepseek_v3 (kimi_k2) / gpt_oss."""
    model_type: str                     # as written in config.json (kimi_k2 stays kimi_k2)
    family: str                         # qwen3_moe | qwen3 | deepseek_v3 | gpt_oss
    hidden: int
    layers: int
    vocab: int
    tied_embeddings: bool
    heads: int
    kv_heads: int
    head_dim: int
    attention_bias: bool
    qk_norm: bool
    mla: dict[str, int] | None          # q_lora_rank (0 = none), kv_lora_rank, qk_nope, qk_rope, v_head_dim
    dense_intermediate: int             # FFN width of a dense MLP layer (0: the model has none)
    num_experts: int                    # routed experts per MoE layer (0: dense model)
    top_k: int
    moe_intermediate: int
    shared_experts: int
    shared_intermediate: int
    expert_bias: bool                   # biased expert Linears (gpt-oss)
    router_bias: bool                   # router Linear bias (gpt-oss) / correction bias (DeepSeek)
    moe_layers: tuple[bool, ...] = field(repr=False)
    extra_layers: int = 0               # checkpoint layers after the decoder (DeepSeek MTP)

    # ------------------------------------------------------------------ derived sizes
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def query_groups(self) -> int:
        """Query groups TP must divide (MLA has one latent per head: no grouping)."""
        return self.heads if self.mla else self.kv_heads

    @property
    def q_dim(self) -> int:
        """Width of the attention output (in_features of o_proj / linear_proj)."""
        return self.heads * (self.mla["v_head_dim"] if self.mla else self.head_dim)

    @property
    def qkv_out(self) -> int:
        """out_features of the fused GQA linear_qkv (not MLA)."""
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def dense_layer_count(self) -> int:
        return self.layers - sum(self.moe_layers)

    @property
    def dense_ffn(self) -> int | None:
        """in_features of a dense MLP's down_proj, None when no layer is dense."""
        return self.dense_intermediate if self.dense_layer_count and self.dense_intermediate else None

    @property
    def moe_ffn(self) -> int | None:
        return self.moe_intermediate if self.is_moe else None

    @property
    def shared_ffn(self) -> int | None:
        """in_features of the shared experts' down_proj (all shared experts fused), or None."""
        return self.shared_experts * self.shared_intermediate or None


def _need(cfg: Mapping, key: str, source: str, typ=int):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{source}: config.json lacks {key!r}; fix: use the model's published "
                         f"config.json")
    v = cfg[key]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"{source}: config.json field {key!r} must be an integer, got {v!r}")
    if typ is int and v < 0:
        raise ValueError(f"{source}: config.json field {key!r} must be >= 0, got {v}")
    return v


def _opt_int(cfg: Mapping, key: str, default: int, source: str) -> int:
    return default if cfg.get(key) is None else _need(cfg, key, source)


def arch_shape(cfg: Any, source: str = "config.json") -> ArchShape:
    """Normalise an HF config.json dict; ``ValueError`` naming ``source`` and the key if lacking."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{source}: config.json must hold a JSON object, got "
                         f"{type(cfg).__name__}; fix: use the model's config.json")
    mt = cfg.get("model_type")
    if mt not in ALIASES:
        raise ValueError(f"{source}: model_type {mt!r} is not supported (supported: "
                         f"{', '.join(MODEL_TYPES)})")
    family = ALIASES[mt]
    g = lambda k: _need(cfg, k, source)  # noqa: E731
    h, n_layers, heads = g("hidden_size"), g("num_hidden_layers"), g("num_attention_heads")
    if heads == 0 or n_layers == 0 or h == 0:
        raise ValueError(f"{source}: hidden_size / num_hidden_layers / num_attention_heads must be > 0")
    common = dict(model_type=mt, family=family, hidden=h, layers=n_layers, vocab=g("vocab_size"),
                  tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), heads=heads,
                  kv_heads=_opt_int(cfg, "num_key_value_heads", heads, source),
                  head_dim=_opt_int(cfg, "head_dim", h // heads, source),
                  attention_bias=bool(cfg.get("attention_bias", False)))
    if family in ("qwen3_moe", "qwen3"):
        # transformers >= 5 writes Qwen3-MoE's expert count as num_local_experts on save
        n_exp = 0
        if family == "qwen3_moe":
            n_exp = _opt_int(cfg, "num_experts", 0, source) or _opt_int(cfg, "num_local_experts", 0, source)
        step = _opt_int(cfg, "decoder_sparse_step", 1, source) or 1
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list):
            raise ValueError(f"{source}: config.json field 'mlp_only_layers' must be a list")
        moe = tuple(n_exp > 0 and i not in only and (i + 1) % step == 0 for i in range(n_layers))
        return ArchShape(**common, qk_norm=True, mla=None,
                         dense_intermediate=_opt_int(cfg, "intermediate_size", 0, source),
                         num_experts=n_exp, top_k=_opt_int(cfg, "num_experts_per_tok", 0, source),
                         moe_intermediate=_opt_int(cfg, "moe_intermediate_size", 0, source),
                         shared_experts=0, shared_intermediate=0, expert_bias=False,
                         router_bias=False, moe_layers=moe)
    if family == "deepseek_v3":
        n_exp = g("n_routed_experts")
        k_dense = _opt_int(cfg, "first_k_dense_replace", 0, source)
        freq = _opt_int(cfg, "moe_layer_freq", 1, source) or 1
        moe = tuple(i >= k_dense and i % freq == 0 for i in range(n_layers))
        mla = dict(q_lora_rank=_opt_int(cfg, "q_lora_rank", 0, source), kv_lora_rank=g("kv_lora_rank"),
                   qk_nope=g("qk_nope_head_dim"), qk_rope=g("qk_rope_head_dim"), v_head_dim=g("v_head_dim"))
        common["kv_heads"] = heads          # MLA: one k/v per head
        return ArchShape(**common, qk_norm=False, mla=mla, dense_intermediate=g("intermediate_size"),
                         num_experts=n_exp, top_k=g("num_experts_per_tok"),
                         moe_intermediate=g("moe_intermediate_size"),
                         shared_experts=_opt_int(cfg, "n_shared_experts", 1, source),
                         shared_intermediate=g("moe_intermediate_size"), expert_bias=False,
                         router_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc", moe_layers=moe,
                         extra_layers=_opt_int(cfg, "num_nextn_predict_layers", 0, source))
    # gpt_oss
    n_exp = _opt_int(cfg, "num_local_experts", 0, source) or g("num_experts")
    top_k = _opt_int(cfg, "num_experts_per_tok", 0, source) or g("experts_per_token")
    return ArchShape(**common, qk_norm=False, mla=None, dense_intermediate=0, num_experts=n_exp,
                     top_k=top_k, moe_intermediate=g("intermediate_size"), shared_experts=0,
                     shared_intermediate=0, expert_bias=True, router_bias=True,
                     moe_layers=(True,) * n_layers)
