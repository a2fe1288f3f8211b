"""HF config.json + tensor names → what llama.cpp expects for an architecture (GGUF side).

A GGUF model is ``general.architecture`` (llama.cpp's name for it), hyperparameters under
``<arch>.*`` keys, tokenizer metadata (:mod:`.gguf_vocab`) and tensors under llama.cpp's names.
Names and keys come from the ``gguf`` package (``gguf.TensorNameMap``, ``gguf.Keys`` through the
``GGUFWriter.add_*`` methods) — the tables llama.cpp's own ``convert_hf_to_gguf.py`` uses — so no
name table is repeated here. What this module adds is the per-architecture knowledge of that
converter (conversion/qwen.py ``Qwen3Model`` / ``Qwen3MoeModel``, conversion/base.py
``TextModel.set_gguf_parameters`` and ``prepare_tensors``) and of llama.cpp's model code
(src/models/qwen3moe.cpp), written down once:

* routed experts: HF stores ``mlp.experts.{e}.{gate,up,down}_proj.weight`` ``[N, K]`` per expert;
  llama.cpp wants one stacked tensor ``blk.{i}.ffn_{gate,up,down}_exps.weight`` ``[E, N, K]``
  (ggml ``ne = {K, N, E}``) — stacked here in expert order, streamed one expert at a time;
* float types (conversion/base.py ``prepare_tensors``): 1-D tensors, norms and the router
  (``ffn_gate_inp``) are F32; other float tensors keep the checkpoint's dtype (BF16, F16 or F32:
  lossless, the exact training weights);
* the config is parsed by the project's one parser (:mod:`int4_qat.arch`: unknown fields, biases,
  sliding windows, RoPE scaling are refused there); on top, configurations llama.cpp would load
  but compute *differently* are refused: qwen3moe always renormalises the top-k router weights
  (``build_moe_ffn(..., norm_w=true, ...)``) and makes every layer an MoE layer, so
  ``norm_topk_prob: false``, ``mlp_only_layers`` or ``decoder_sparse_step != 1`` are refused.

Supported: ``qwen3`` → ``qwen3``, ``qwen3_moe`` → ``qwen3moe``. Refused, with the reason in
:data:`REFUSED`: ``gpt_oss``, ``deepseek_v3`` / ``kimi_k2``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

__all__ = ["GGUFTensor", "REFUSED", "SUPPORTED", "add_hparams", "parse_config", "plan_tensors"]

#: HF model_type -> llama.cpp architecture (gguf.MODEL_ARCH member name)
SUPPORTED = {"qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE"}
#: HF model_type -> why this exporter refuses it
REFUSED = {
    "gpt_oss": "llama.cpp's gpt-oss graph (src/models/openai-moe.cpp) would compute another model: "
               "ggml always rounds YaRN's correction range (ggml.c ggml_rope_yarn_corr_dims, floor/ceil "
               "= HF truncate: true) while gpt-oss trains with rope_scaling.truncate: false, and its "
               "SwiGLU alpha/limit are compile-time constants (1.702, 7.0); this exporter also does not "
               "map gpt-oss tensors (sinks, biases, interleaved gate_up) yet. Use the compressed-tensors "
               "(native MXFP4) export",
    "deepseek_v3": "llama.cpp's deepseek2 graph needs MLA's kv_b_proj split into attn_k_b / attn_v_b, the "
                   "sigmoid router's correction bias, expert groups and the routed scaling written its "
                   "way (conversion/deepseek.py); this exporter does not map them yet. Use the "
                   "compressed-tensors export",
}
REFUSED["kimi_k2"] = REFUSED["deepseek_v3"]

_EXPERT_RE = re.compile(r"^(?P<pre>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<p>gate_proj|up_proj|down_proj)\.weight$")
_SKIP = (".rotary_emb.inv_freq",)


def parse_config(config: dict):
    """``(gguf.MODEL_ARCH, ArchParts)``: ``config`` parsed by the project's one config parser
    (:mod:`int4_qat.arch`, which refuses fields it does not know), then checked against what
    llama.cpp's graph for the architecture computes; ValueError naming the key and the fix."""
    import gguf

    from int4_qat.arch.base import HFConfig, _load_builtin_archs, get_arch_definition

    mt = config.get("model_type")
    if mt in REFUSED:
        raise ValueError(f"config.json: model_type {mt!r} is not exported to GGUF: {REFUSED[mt]}")
    if mt not in SUPPORTED:
        raise ValueError(f"config.json: model_type {mt!r} has no GGUF mapping here (supported: "
                         f"{sorted(SUPPORTED)}; refused: {sorted(REFUSED)})")
    _load_builtin_archs()
    cfg = HFConfig(config, "config.json")
    parts = get_arch_definition(mt).parse(cfg)
    cfg.finish()
    tf = parts.tf_kwargs
    if mt == "qwen3_moe":
        if tf["moe_router_pre_softmax"]:
            raise ValueError("config.json: norm_topk_prob: false — llama.cpp's qwen3moe always "
                             "renormalises the top-k router weights (src/models/qwen3moe.cpp), so it "
                             "would compute another model; GGUF export refused")
        if not all(parts.moe_layers):
            raise ValueError(f"config.json: dense layers {[i for i, m in enumerate(parts.moe_layers) if not m]} "
                             "(mlp_only_layers / decoder_sparse_step) — llama.cpp's qwen3moe makes every "
                             "layer an MoE layer; GGUF export refused")
    return getattr(gguf.MODEL_ARCH, SUPPORTED[mt]), parts


def add_hparams(writer, parts) -> None:
    """Hyperparameter keys, as conversion/base.py ``TextModel.set_gguf_parameters`` and
    conversion/qwen.py ``Qwen2MoeModel.set_gguf_parameters`` write them."""
    tf = parts.tf_kwargs
    writer.add_block_count(tf["num_layers"])
    writer.add_context_length(parts.max_position_embeddings)
    writer.add_embedding_length(tf["hidden_size"])
    writer.add_feed_forward_length(tf["ffn_hidden_size"])
    writer.add_head_count(tf["num_attention_heads"])
    writer.add_head_count_kv(tf["num_query_groups"])
    writer.add_key_length(tf["kv_channels"])
    writer.add_value_length(tf["kv_channels"])
    writer.add_rope_freq_base(float(parts.gpt_kwargs["rotary_base"]))
    writer.add_layer_norm_rms_eps(float(tf["layernorm_epsilon"]))
    writer.add_vocab_size(parts.vocab_size)
    if tf.get("num_moe_experts"):
        writer.add_expert_count(tf["num_moe_experts"])
        writer.add_expert_used_count(tf["moe_router_topk"])
        writer.add_expert_feed_forward_length(tf["moe_ffn_hidden_size"])


@dataclass(frozen=True)
class GGUFTensor:
    """One GGUF tensor: its llama.cpp name, the HF tensors it is made of (several = an expert
    stack along a new dim 0, in expert order) and its logical (numpy-order) shape."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype          # source dtype
    quantized: bool
    router_or_norm: bool        # F32 in llama.cpp whatever the source dtype

    @property
    def stacked(self) -> bool:
        return len(self.sources) > 1 or len(self.shape) == 3


def plan_tensors(infos: Iterable, config: dict, scheme=None) -> list[GGUFTensor]:
    """Map HF tensors (``TensorInfo``-like: ``.name``, ``.dtype``, ``.shape``) to GGUF tensors from
    metadata only; ValueError naming the tensor for anything llama.cpp has no place for."""
    import gguf

    from int4_qat.export.convert import never_quantized

    arch, parts = parse_config(config)
    tmap = gguf.get_tensor_name_map(arch, parts.tf_kwargs["num_layers"])
    infos = [t for t in infos if not t.name.endswith(_SKIP)]
    experts: dict[tuple[str, str], dict[int, object]] = {}
    singles = []
    for t in infos:
        m = _EXPERT_RE.match(t.name)
        if m:
            experts.setdefault((m["pre"], m["p"]), {})[int(m["e"])] = t
        else:
            singles.append(t)
    n_exp = parts.tf_kwargs.get("num_moe_experts")
    groups: list[tuple[str, list]] = [(t.name, [t]) for t in singles]
    for (pre, proj), by_e in experts.items():
        missing = sorted(set(range(n_exp or 0)) - set(by_e)) if n_exp else []
        if not n_exp or missing or len(by_e) != n_exp:
            raise ValueError(f"{pre}.*.{proj}.weight: expected experts 0..{(n_exp or 0) - 1} "
                             f"(config num_experts={n_exp}), missing {missing[:5] or sorted(by_e)[:5]}")
        ts = [by_e[e] for e in range(n_exp)]
        if len({(t.dtype, tuple(t.shape)) for t in ts}) != 1:
            raise ValueError(f"{pre}.*.{proj}.weight: experts differ in dtype or shape")
        groups.append((f"{pre}.{proj}.weight", ts))
    out = []
    for hf_name, ts in groups:
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{ts[0].name}: no llama.cpp tensor for it in architecture "
                             f"{gguf.MODEL_ARCH_NAMES[arch]} (gguf.TensorNameMap); refusing to drop it")
        t0 = ts[0]
        if not t0.dtype.is_floating_point or t0.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{t0.name}: dtype {t0.dtype} has no GGML float type (BF16, F16, F32)")
        shape = (len(ts), *t0.shape) if len(ts) > 1 else tuple(t0.shape)
        module = t0.name.removesuffix(".weight")
        quantized = bool(scheme is not None and t0.name.endswith(".weight") and len(t0.shape) == 2
                         and scheme.quantizes_hf(module) and not never_quantized(module))
        special = (len(shape) == 1 or name.endswith("_norm.weight")
                   or tmap.get_type(hf_name, try_suffixes=(".weight",)) == gguf.MODEL_TENSOR.FFN_GATE_INP)
        out.append(GGUFTensor(name, tuple(t.name for t in ts), shape, t0.dtype, quantized, special))
    names = [t.name for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"two HF tensors map to the same GGUF tensor {sorted(dup)[0]}")
    return out
