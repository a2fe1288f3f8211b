"""Memory planner: parameter counts, per-GPU QAT training memory and serving checkpoint sizes.

Everything is computed from the architecture's HF ``config.json`` and a recipe; nothing is
measured. The formulas (bytes, 1 GB = 1e9 bytes):

**Parameters.** Per decoder layer: attention (GQA: q/k/v/o projections [+ biases, + q/k norms];
MLA as DeepSeek-V3/Kimi-K2: q_a, q_b, kv_a (with the shared rope key), kv_b, o plus the two
latent norms), the MLP (dense SwiGLU ``3·h·I``, or MoE: ``E`` routed experts of ``3·h·I_moe``
[+ biases for gpt-oss], shared experts, router ``h·E`` [+ bias]), two RMSNorms. Plus input
embeddings and ``lm_head`` (untied in all the models here). *Active* parameters count
``top_k`` routed experts instead of ``E``.

**Training memory per GPU** (bf16 mixed precision, Megatron DDP + distributed optimizer), for the
worst pipeline stage. Local params: dense part ``/ tp`` (per stage), routed experts
``/ (ep · etp)``, embeddings on stage 0 and lm_head on the last stage ``/ tp``. Then

* weights 2 B/param (fp32 recipes: 4), fp32 main grads 4 B/param;
* optimizer: fp32 master + Adam m, v = 12 B/param (fp32 recipes: 8), sharded by the distributed
  optimizer over ``dp`` for dense params and over expert-dp = world / (ep · etp · pp) for experts;
* fake-quant weight copies: every quantized weight's fake-quantized copy (in the weights' dtype)
  is saved by the matmul for backward; the trainer computes it once per step and every in-flight
  micro-batch shares it (``int4_qat.modelopt_backend.fake_quant_cache``):
  ``weight bytes · quantized local params``;
* activations (no recompute, flash attention, bf16), per layer and micro-batch with
  ``T = seq · micro_batch`` tokens and ``Tl = T/tp`` under sequence parallel (else ``T``):
  attention ``2·(3h·Tl + (qkv_out + attn_out)·T/tp)``; dense MLP ``2·(2h·Tl + 3·I·T/tp)``;
  MoE ``2·2h·Tl + 4·E·Tl + 2·k·Tl·(2h + 3·I_moe)`` (each token's k expert copies carry fc1
  input, gate/up output, activation, fc2 output) plus shared experts ``2·Tl·(h + 3·I_s)``;
  last stage logits ``2 · 4·T·V/tp`` (fp32 logits and their grad). Stage ``i`` of a 1F1B
  schedule holds ``min(pp − i, microbatches)`` micro-batches in flight;
* a fixed 5 GB for the CUDA context, NCCL buffers and allocator fragmentation.

**Serving checkpoint size** per format, with the recipe's scope deciding which Linear weights are
quantized (router, embeddings, norms, lm_head, biases always stay BF16): BF16 2 B/param; FP8
1 B + fp32 128×128 block scale; INT4 gG ``0.5 + 2/G`` (bf16 group scales, compressed-tensors
``pack-quantized``); MXFP4 ``0.5 + 1/32`` (E8M0 per 32); NVFP4 ``0.5 + 1/16`` (E4M3 per 16) +
a 4 B global scale per tensor. A checkpoint "fits" N GPUs when its weights take ≤ 85% of their
memory (the rest is KV cache and activations).

**Export** (``tools/export.py`` of a training checkpoint, streamed without building the model;
:func:`export_plan`), per process: the imports (torch, compressed-tensors, int4_qat: 0.45 GB
measured, +0.15 GB when Megatron is imported for gpt-oss), the checkpoint's DCP metadata (every
process unpickles it: ~3 KB per stored entry, measured; entries = model keys × 4 when the
optimizer saves Adam moments and fp32 master copies per parameter, + the ``_extra_state``
entries), the largest single read (a stored piece of the embedding / lm_head -- one TP chunk,
or up to ``CHUNK_BYTES`` of rows -- or the largest fused Megatron matrix, e.g. a dense
``linear_fc1``), the in-flight budget (``INFLIGHT_BYTES``) and, per conversion thread, the
quantizer's temporaries for the largest quantized matrix (measured: ~6× its BF16 bytes for INT4,
~14× for MXFP4 / NVFP4). Disk: the output checkpoint only (quantized weights packed, the rest in
the checkpoint's dtype), written beside the output and renamed; no intermediate copy.

**Launch checks** (:func:`check_recipe`, run by ``tools/launch.py`` before anything starts):
the schema, the layout (:func:`int4_qat.parallel.validate_layout`: world size, expert folding,
pipeline split, heads, groups vs TP/ETP shards), export formats equal to the trained format,
Marlin's INT4 MoE limits at the serving layout, FP4 blocks per serving rank, and this plan
≤ 141 GB per GPU. Example: Qwen3-30B-A3B has ``moe_intermediate_size`` 768; at SGLang TP 4 a rank
holds 192 columns of each expert, not a multiple of 128, so g128 fails there (g64, or serving
EP 4 with whole experts, pass).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from int4_qat.arch.shape import ArchShape, arch_shape  # the one reading of config.json sizes

__all__ = [
    "GB", "GPU_MEMORY_GB", "ArchShape", "ParamCounts", "arch_shape", "count_params",
    "serving_bytes", "SERVING_FORMATS", "TrainingMemory", "training_memory", "plan", "stage_layers",
    "export_plan",
]

GB = 1e9
#: GPU kinds the planner reports against (H100/H800 80 GB, H200 141 GB).
GPU_MEMORY_GB = {"80GB": 80.0, "141GB": 141.0}
OVERHEAD_GB = 5.0
SERVING_HEADROOM = 0.85


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements). ``*_linear`` are Linear weights a scope may quantize."""
    embedding: int
    lm_head: int
    attention: int            # all layers, incl. biases / norms of the attention block
    attention_linear: int
    dense_mlp: int
    routed_experts: int       # weights + biases of every routed expert
    routed_linear: int        # routed expert weights only
    shared_experts: int
    router: int
    norms: int
    total: int
    active: int
    # per-layer pieces, for pipeline placement
    attn_per_layer: int
    dense_mlp_per_layer: int
    moe_dense_per_layer: int  # shared experts + router of one MoE layer
    routed_per_layer: int
    routed_linear_per_layer: int
    one_expert: int


def count_params(a: ArchShape) -> ParamCounts:
    h = a.hidden
    if a.mla:
        m = a.mla
        qk = m["qk_nope"] + m["qk_rope"]
        q = (h * m["q_lora_rank"] + m["q_lora_rank"] + m["q_lora_rank"] * a.heads * qk) if m["q_lora_rank"] \
            else h * a.heads * qk
        kv = h * (m["kv_lora_rank"] + m["qk_rope"]) + m["kv_lora_rank"] \
            + m["kv_lora_rank"] * a.heads * (m["qk_nope"] + m["v_head_dim"])
        o = a.heads * m["v_head_dim"] * h
        attn_lin = q + kv + o - m["q_lora_rank"] - m["kv_lora_rank"]      # norms are not Linear
        attn = q + kv + o
    else:
        qd, kvd = a.heads * a.head_dim, a.kv_heads * a.head_dim
        attn_lin = h * qd + 2 * h * kvd + qd * h
        attn = attn_lin + (qd + 2 * kvd + h if a.attention_bias else 0) \
            + (2 * a.head_dim if a.qk_norm else 0) + (a.heads if a.model_type == "gpt_oss" else 0)  # sinks
    I = a.moe_intermediate
    expert_lin = 3 * h * I
    one_expert = expert_lin + ((2 * I + h) if a.expert_bias else 0)
    router = h * a.num_experts + (a.num_experts if a.router_bias else 0)
    shared = a.shared_experts * 3 * h * a.shared_intermediate
    dense_mlp = 3 * h * a.dense_intermediate
    n_moe = sum(a.moe_layers)
    n_dense = a.layers - n_moe
    norms = 2 * h * a.layers + h
    emb = a.vocab * h
    head = 0 if a.tied_embeddings else a.vocab * h
    total = (emb + head + attn * a.layers + dense_mlp * n_dense
             + n_moe * (a.num_experts * one_expert + shared + router) + norms)
    active = (emb + head + attn * a.layers + dense_mlp * n_dense
              + n_moe * (a.top_k * one_expert + shared + router) + norms)
    return ParamCounts(
        embedding=emb, lm_head=head, attention=attn * a.layers, attention_linear=attn_lin * a.layers,
        dense_mlp=dense_mlp * n_dense, routed_experts=n_moe * a.num_experts * one_expert,
        routed_linear=n_moe * a.num_experts * expert_lin, shared_experts=shared * n_moe,
        router=router * n_moe, norms=norms, total=total, active=active,
        attn_per_layer=attn, dense_mlp_per_layer=dense_mlp, moe_dense_per_layer=shared + router,
        routed_per_layer=a.num_experts * one_expert, routed_linear_per_layer=a.num_experts * expert_lin,
        one_expert=one_expert)


# ------------------------------------------------------------------------------- serving sizes
SERVING_FORMATS = ("bf16", "fp8", "int4-g32", "int4-g128", "mxfp4", "nvfp4")


def _bytes_per_quantized_param(fmt: str, group: int | None = None) -> float:
    if fmt == "bf16":
        return 2.0
    if fmt == "fp8":
        return 1.0 + 4.0 / (128 * 128)           # DeepSeek-style fp32 scale per 128x128 block
    if fmt == "int4" or fmt.startswith("int4-g"):
        g = group if fmt == "int4" else int(fmt.removeprefix("int4-g"))
        return 0.5 + 2.0 / g                      # packed nibbles + bf16 scale per group
    if fmt == "mxfp4":
        return 0.5 + 1.0 / 32                     # E2M1 + E8M0 per 32
    if fmt == "nvfp4":
        return 0.5 + 1.0 / 16                     # E2M1 + E4M3 per 16 (+ global per tensor)
    raise ValueError(f"unknown serving format {fmt!r} (one of {', '.join(SERVING_FORMATS)}, int4)")


def quantized_params(c: ParamCounts, scope: str) -> int:
    """Linear weights a scope quantizes: ``experts`` = routed experts; ``all-linear`` adds
    attention projections, dense MLPs and shared experts (never router/embeddings/lm_head)."""
    if scope == "experts":
        return c.routed_linear
    if scope == "all-linear":
        return c.routed_linear + c.attention_linear + c.dense_mlp + c.shared_experts
    raise ValueError(f"unknown scope {scope!r} (experts, all-linear)")


def serving_bytes(c: ParamCounts, fmt: str, scope: str = "experts", group: int | None = None) -> float:
    """Checkpoint bytes when ``scope``'s Linear weights are stored in ``fmt``, the rest BF16."""
    q = 0 if fmt == "bf16" else quantized_params(c, scope)
    return (c.total - q) * 2.0 + q * _bytes_per_quantized_param(fmt, group)


# ------------------------------------------------------------------------------- training memory
def stage_layers(layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Decoder layers per pipeline stage (Megatron's uneven split when first/last are given)."""
    if pp == 1:
        return [layers]
    f = first if first is not None else None
    l_ = last if last is not None else None
    if f is None and l_ is None:
        if layers % pp:
            raise ValueError(f"parallel.pp: {layers} layers do not split evenly over pp={pp}; set "
                             f"parallel.first_stage_layers / parallel.last_stage_layers")
        return [layers // pp] * pp
    middle_stages = pp - (f is not None) - (l_ is not None)
    rest = layers - (f or 0) - (l_ or 0)
    if rest < 0 or (middle_stages == 0 and rest) or (middle_stages and rest % middle_stages):
        raise ValueError(f"parallel.first_stage_layers/last_stage_layers: {layers} layers - first "
                         f"{f} - last {l_} leaves {rest}, which the {middle_stages} middle stage(s) "
                         f"of pp={pp} cannot split evenly")
    mid = rest // middle_stages if middle_stages else 0
    out = [mid] * pp
    if f is not None:
        out[0] = f
    if l_ is not None:
        out[-1] = l_
    return out


@dataclass
class TrainingMemory:
    """Per-GPU training memory of the worst pipeline stage, in GB."""
    stage: int
    local_params_b: float          # billions of params on that GPU
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    fake_quant_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float
    microbatches: int
    fits: dict[str, bool]


def _activation_bytes_per_layer(a: ArchShape, moe: bool, T: int, tp: int, sp: bool) -> float:
    Tl = T / tp if (sp or tp == 1) else T
    if a.mla:
        m = a.mla
        qkv_out = (m["q_lora_rank"] + m["kv_lora_rank"] + m["qk_rope"]
                   + a.heads * (2 * (m["qk_nope"] + m["qk_rope"]) + m["v_head_dim"]))
    else:
        qkv_out = (a.heads + 2 * a.kv_heads) * a.head_dim
    attn = 2 * (3 * a.hidden * Tl + (qkv_out + a.q_dim) * T / tp)
    if not moe:
        return attn + 2 * (2 * a.hidden * Tl + 3 * a.dense_intermediate * T / tp)
    mlp = (2 * 2 * a.hidden * Tl + 4 * a.num_experts * Tl
           + 2 * a.top_k * Tl * (2 * a.hidden + 3 * a.moe_intermediate)
           + (2 * Tl * (a.hidden + 3 * a.shared_experts * a.shared_intermediate) if a.shared_experts else 0))
    return attn + mlp


def training_memory(a: ArchShape, c: ParamCounts, parallel, train, scope: str) -> TrainingMemory:
    """Per-GPU memory of QAT training under ``parallel`` / ``train`` (recipe sections)."""
    p = parallel
    world = p.nodes * p.gpus_per_node
    edp = max(1, world // (p.ep * p.etp * p.pp))
    split = stage_layers(a.layers, p.pp, p.first_stage_layers, p.last_stage_layers)
    fp32 = getattr(train.precision, "value", train.precision) == "fp32"
    w_b, opt_b = (4.0, 8.0) if fp32 else (2.0, 12.0)
    n_micro = max(1, train.global_batch // (train.micro_batch * p.dp))
    T = train.seq_length * train.micro_batch
    best: TrainingMemory | None = None
    start = 0
    for s, n in enumerate(split):
        idx = range(start, start + n)
        start += n
        n_moe = sum(a.moe_layers[i] for i in idx)
        dense = (n * c.attn_per_layer + (n - n_moe) * c.dense_mlp_per_layer
                 + n_moe * c.moe_dense_per_layer) / p.tp + 2 * a.hidden * n
        if s == 0:
            dense += c.embedding / p.tp
        if s == p.pp - 1:
            dense += c.lm_head / p.tp + a.hidden
        expert = n_moe * c.routed_per_layer / (p.ep * p.etp)
        quant_local = n_moe * c.routed_linear_per_layer / (p.ep * p.etp)
        if scope == "all-linear":
            quant_local += (n * c.attention_linear / a.layers + (n - n_moe) * c.dense_mlp_per_layer
                            + n_moe * a.shared_experts * 3 * a.hidden * a.shared_intermediate) / p.tp
        in_flight = min(p.pp - s, n_micro)
        act = in_flight * sum(_activation_bytes_per_layer(a, a.moe_layers[i], T, p.tp, p.sequence_parallel)
                              for i in idx)
        if s == p.pp - 1:
            act += 2 * 4.0 * T * a.vocab / p.tp
        local = dense + expert
        weights = local * w_b
        grads = local * 4.0
        opt = dense * opt_b / p.dp + expert * opt_b / edp
        fq = quant_local * w_b                 # one shared copy per step (fake_quant_cache)
        total = (weights + grads + opt + fq + act) / GB + OVERHEAD_GB
        m = TrainingMemory(stage=s, local_params_b=local / 1e9, weights_gb=weights / GB,
                           grads_gb=grads / GB, optimizer_gb=opt / GB, fake_quant_gb=fq / GB,
                           activations_gb=act / GB, overhead_gb=OVERHEAD_GB, total_gb=total,
                           microbatches=n_micro,
                           fits={k: total <= cap for k, cap in GPU_MEMORY_GB.items()})
        if best is None or m.total_gb > best.total_gb:
            best = m
    return best


# ------------------------------------------------------------------------------- export
#: the streaming exporter's work-item sizes (int4_qat/export/pipeline.py; a test checks they agree)
CHUNK_BYTES = 256 << 20
INFLIGHT_BYTES = 64 << 20
EXPORT_WORKERS = 2
_IMPORTS_GB = 0.45          # RSS after imports + planning, measured (bench/bench_export_ckpt.py)
_MEGATRON_IMPORT_GB = 0.15  # load_arch imports Megatron for gpt-oss's activation
_METADATA_BYTES_PER_ENTRY = 3000.0
_PACK_TEMP_FACTOR = {"int4": 6.0, "mxfp4": 14.0, "nvfp4": 14.0}


def _model_keys(a: ArchShape) -> tuple[int, int]:
    """(tensor keys, Linear modules) of a quantized local-spec checkpoint of ``a`` (GLU fc1 as two
    keys, one key per expert)."""
    per_expert = 3 + (3 if a.expert_bias else 0)
    n_moe = sum(a.moe_layers)
    attn = 8 if a.mla else 6
    keys = (a.layers * (attn + 2) + n_moe * (a.num_experts * per_expert + 2 + (3 if a.shared_experts else 0))
            + (a.layers - n_moe) * 3 + 3)
    linears = a.layers * (5 if a.mla else 2) + n_moe * (2 * a.num_experts + (2 if a.shared_experts else 0)) \
        + (a.layers - n_moe) * 2 + 1
    return keys, linears


def export_plan(a: ArchShape, fmt: str, group: int, scope: str, *, weight_bytes: float = 2.0, tp: int = 1,
                processes: int = 1, optimizer_entries: int = 3) -> dict[str, Any]:
    """RAM per export process and disk of exporting a training checkpoint of ``a`` (see the
    module docstring). ``weight_bytes``: 2 (bf16 GPU runs) or 4 (fp32 CPU runs); ``tp``: the
    training TP (the embedding is stored in ``tp`` row chunks)."""
    h = a.hidden
    emb = a.vocab * h * weight_bytes
    read = max(min(emb, CHUNK_BYTES), emb / tp)
    mats = [2 * a.moe_intermediate * h if a.num_experts else 0,
            2 * a.dense_intermediate * h if a.dense_layer_count else 0,
            2 * a.shared_experts * a.shared_intermediate * h,
            (a.heads * (a.mla["qk_nope"] + a.mla["v_head_dim"]) * a.mla["kv_lora_rank"]) if a.mla else a.qkv_out * h]
    read = max(read, max(mats) * weight_bytes)
    q = [(2 if a.family == "gpt_oss" else 1) * a.moe_intermediate * h] if a.num_experts else []
    if scope == "all-linear" or not a.num_experts:
        q += [m // 2 for m in mats[1:3]] + [mats[3], a.q_dim * h]
    q_mat = max(q or [0]) * 2.0            # the quantizer works on bf16 / fp32 inputs alike
    keys, linears = _model_keys(a)
    entries = keys * (1 + optimizer_entries) + 2 * linears
    imports = (_IMPORTS_GB + (_MEGATRON_IMPORT_GB if a.family == "gpt_oss" else 0)) * GB
    metadata = entries * _METADATA_BYTES_PER_ENTRY
    work = read + INFLIGHT_BYTES + EXPORT_WORKERS * _PACK_TEMP_FACTOR[fmt] * q_mat
    c = count_params(a)
    qp = quantized_params(c, scope) if a.num_experts or scope == "all-linear" else 0
    disk = (c.total - qp) * weight_bytes + qp * _bytes_per_quantized_param(fmt, group)
    per = imports + metadata + work
    return {"processes": processes, "ram_per_process_gb": round(per / GB, 2),
            "ram_total_gb": round(per * processes / GB, 1), "imports_gb": round(imports / GB, 2),
            "metadata_gb": round(metadata / GB, 2), "largest_read_gb": round(read / GB, 3),
            "working_gb": round(work / GB, 2), "input_gb": round(c.total * weight_bytes / GB, 1),
            "disk_gb": round(disk / GB, 1), "disk_bytes": int(disk), "checkpoint_entries": int(entries)}


def plan(recipe) -> dict[str, Any]:
    """Everything the planner reports for one recipe, as a JSON-able dict."""
    cfg = recipe.model.hf_config()
    a = arch_shape(cfg, str(recipe.model.config_json()))
    c = count_params(a)
    scope = recipe.quant.scope.value
    world = recipe.parallel.world_size
    serving = {}
    for fmt in SERVING_FORMATS + ((f"int4-g{recipe.quant.group_size}",)
                                  if recipe.quant.format.value == "int4" else ()):
        b = serving_bytes(c, fmt, scope)
        serving[fmt] = {"bytes": int(b), "gb": round(b / GB, 1),
                        **{f"gpus_{k}": math.ceil(b / (cap * GB * SERVING_HEADROOM))
                           for k, cap in GPU_MEMORY_GB.items()},
                        "fits_8x141GB": b <= 8 * 141 * GB * SERVING_HEADROOM}
    tm = training_memory(a, c, recipe.parallel, recipe.train, scope)
    return {
        "recipe": recipe.name, "model_type": a.model_type,
        "params": {"total": c.total, "active": c.active,
                   "total_b": round(c.total / 1e9, 2), "active_b": round(c.active / 1e9, 2),
                   **{k: round(v / 1e9, 3) for k, v in asdict(c).items()
                      if k in ("embedding", "lm_head", "attention", "dense_mlp", "routed_experts",
                               "shared_experts", "router", "norms")}},
        "quant": {"format": recipe.quant.format.value, "group_size": recipe.quant.group_size, "scope": scope},
        "layout": {"tp": recipe.parallel.tp, "pp": recipe.parallel.pp, "ep": recipe.parallel.ep,
                   "etp": recipe.parallel.etp, "dp": recipe.parallel.dp, "gpus": world,
                   "stages": stage_layers(a.layers, recipe.parallel.pp, recipe.parallel.first_stage_layers,
                                          recipe.parallel.last_stage_layers)},
        "training_per_gpu": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(tm).items()},
        "serving": serving,
        "export": export_plan(a, recipe.quant.format.value, recipe.quant.group_size, scope,
                              weight_bytes=4.0 if recipe.train.precision.value == "fp32" else 2.0,
                              tp=recipe.parallel.tp, processes=recipe.export.processes),
    }


# ------------------------------------------------------------------------------- launch checks
#: Marlin's INT4 MoE limits, as SGLang/vLLM check them before choosing the Marlin MoE kernel
#: (vllm/model_executor/layers/quantization/utils/marlin_utils.py, check_moe_marlin_supports_layer;
#: SGLang vendors the same function): group in {-1, 32, 64, 128}, hidden % 128 == 0,
#: intermediate_size_per_partition % max(64, group) == 0.
MARLIN_GROUPS = (32, 64, 128)


def marlin_problems(a: ArchShape, group: int, serving_tp: int, serving_ep: int,
                    scope: str = "experts") -> list[str]:
    """Why an INT4 g``group`` export cannot be served by Marlin at this serving layout. With
    ``all-linear`` the row-parallel dense Linears (o_proj, dense/shared down_proj) split K over
    serving_tp too, and each rank's K must hold whole groups."""
    out = []
    if scope == "all-linear" and group in MARLIN_GROUPS:
        for what, k in (("o_proj", a.q_dim), ("dense down_proj", a.dense_intermediate),
                        ("shared-expert down_proj", a.shared_experts * a.shared_intermediate)):
            if k and (k % serving_tp or (k // serving_tp) % group):
                out.append(f"quant.group_size / export.serving_tp: scope all-linear quantizes {what} "
                           f"(in_features {k}); {k} / serving_tp {serving_tp} = {k / serving_tp:g} per rank "
                           f"is not a multiple of group {group}; fix: a smaller quant.group_size or "
                           f"export.serving_tp, or quant.scope: experts")
    if group not in MARLIN_GROUPS:
        out.append(f"quant.group_size: Marlin serves INT4 groups {list(MARLIN_GROUPS)} only, got {group}; "
                   f"fix: quant.group_size: 128 (or 64/32)")
    if a.num_experts and a.hidden % 128:
        out.append(f"model.config: Marlin MoE needs hidden_size % 128 == 0, hidden_size={a.hidden}; "
                   f"fix: serve this model in another format (e.g. mxfp4) or drop int4 from export.formats")
    if a.num_experts and group in MARLIN_GROUPS:
        moe_tp = serving_tp // serving_ep
        I = a.moe_intermediate
        need = max(64, group)
        if I % moe_tp or (I // moe_tp) % need:
            groups = [g for g in MARLIN_GROUPS if I % moe_tp == 0 and (I // moe_tp) % max(64, g) == 0]
            eps = [e for e in range(1, serving_tp + 1) if serving_tp % e == 0
                   and I % (serving_tp // e) == 0 and (I // (serving_tp // e)) % need == 0]
            fixes = []
            if groups:
                fixes.append(f"quant.group_size: {groups[-1]}")
            if eps:
                fixes.append(f"export.serving_ep: {eps[0]} (serving expert parallel: each rank holds "
                             f"{I // (serving_tp // eps[0])}-wide experts)")
            fixes.append("a smaller export.serving_tp")
            out.append(f"quant.group_size / export.serving_tp: Marlin MoE needs (moe_intermediate_size / "
                       f"(serving_tp / serving_ep)) % max(64, group) == 0, but {I} / {moe_tp} = "
                       f"{I / moe_tp:g} is not a multiple of {need} (group {group} at serving_tp "
                       f"{serving_tp}, serving_ep {serving_ep}); fix: " + " or ".join(fixes))
    return out


def _fp4_serving_problems(a: ArchShape, fmt: str, block: int, serving_tp: int, serving_ep: int) -> list[str]:
    moe_tp = serving_tp // serving_ep
    I = a.moe_intermediate
    if a.num_experts and (I % moe_tp or (I // moe_tp) % block):
        return [f"export.serving_tp: {fmt} down_proj in_features {I} / {moe_tp} = {I / moe_tp:g} per "
                f"serving rank is not a multiple of the {block}-block; fix: a serving_tp / serving_ep "
                f"whose split keeps whole blocks"]
    return []


def check_recipe(path, cpu: bool = False, structure: bool = False) -> list[str]:
    """Every problem that would stop ``path`` from training, exporting or serving, one line each
    (``<file>: <key>: <problem>; fix: ...``). Empty list = launchable. Runs before anything is
    launched or queued: schema, model config, layout (int4_qat.parallel.validate_layout), groups vs
    TP shards, export format vs trained format, serving limits, memory plan, name vs file.
    ``cpu=True`` also rejects layouts that only run on GPUs (validate_layout's ``cpu``).
    ``structure=True``: when all of that passes, also build the model at the recipe's layout on
    meta tensors and apply the scheme (:mod:`int4_qat.structure`, a subprocess, ~10-40 s), so a
    refusal by Megatron's or ModelOpt's modules surfaces here."""
    from pathlib import Path as _P

    from int4_qat.recipe import Recipe, RecipeError
    src = str(path)
    try:
        r = Recipe.load(path)
    except RecipeError as e:
        return str(e).splitlines()
    probs: list[str] = []
    if _P(path).stem != r.name and _P(path).name != "recipe.yaml":
        probs.append(f"{src}: name: {r.name!r} differs from the file name {_P(path).stem!r} (make "
                     f"targets use the file name); fix: name: {_P(path).stem}")
    try:
        cfg = r.model.hf_config()
        a = arch_shape(cfg, str(r.model.config_json()))
    except ValueError as e:
        return probs + [f"{src}: {e}"]
    try:
        scheme = r.quant.scheme()
    except Exception as e:                                      # noqa: BLE001 - report, don't crash
        return probs + [f"{src}: quant: cannot build the QuantScheme: {e}"]
    from int4_qat.parallel import validate_layout
    layout_ok = True
    try:
        validate_layout(r.parallel, r.parallel.world_size, cfg, scheme, train=r.train, cpu=cpu)
    except ValueError as e:
        lines = str(e).splitlines()[1:] or [str(e)]
        probs += [f"{src}: parallel: {ln.strip()}" for ln in lines]
        layout_ok = False                                       # the memory plan needs a valid layout
    trained = r.quant.format.value
    for fmt in r.export.formats:
        if fmt.value != trained:
            probs.append(f"{src}: export.formats: {fmt.value!r} is not the trained format quant.format="
                         f"{trained!r}: that export would not be what training simulated; fix: "
                         f"export.formats: [{trained}]")
        elif fmt.value == "int4":
            probs += [f"{src}: {p}" for p in marlin_problems(a, r.quant.group_size, r.export.serving_tp,
                                                            r.export.serving_ep, r.quant.scope.value)]
        else:
            probs += [f"{src}: {p}" for p in _fp4_serving_problems(a, fmt.value, r.quant.group_size,
                                                                   r.export.serving_tp, r.export.serving_ep)]
    if not layout_ok:
        return probs
    tm = training_memory(a, count_params(a), r.parallel, r.train, r.quant.scope.value)
    if not tm.fits["141GB"]:
        probs.append(f"{src}: parallel: the plan needs {tm.total_gb:.0f} GB per GPU (stage {tm.stage}), "
                     f"more than a 141 GB GPU; fix: raise parallel.ep / pp / nodes or lower "
                     f"train.micro_batch / seq_length (python tools/plan_memory.py {src})")
    if structure and not probs:
        from int4_qat.structure import run_checks

        probs += run_checks([src])[src].problems
    return probs


__all__ += ["MARLIN_GROUPS", "marlin_problems", "check_recipe", "quantized_params"]
