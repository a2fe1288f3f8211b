"""Architecture plumbing shared by every model family: HF config.json -> Megatron-Core GPTModel.

An architecture is a small module (see ``qwen3.py``) that registers, per HF ``model_type``:

* ``parse(cfg: HFConfig) -> ArchParts`` -- read config.json through :class:`HFConfig` (which
  records every key read and refuses unknown ones) into TransformerConfig kwargs, GPTModel kwargs
  and the MoE layer pattern;
* ``rules(arch) -> list[Rule]`` -- the ONE HF<->Megatron name-mapping table, used by
  ``import_hf_checkpoint`` (HF -> Megatron) and ``export_hf_state_dict`` (Megatron -> HF);
* optionally ``layer_spec(arch, config, use_te) -> spec`` (default: Megatron's
  ``get_gpt_decoder_block_spec``, which honours ``moe_layer_freq`` and slices the layers of the
  current pipeline stage).

How a :class:`Rule` moves one tensor.  Megatron names are templates relative to the GPTModel,
with ``{layer}`` (the *global* decoder layer index) and ``{expert}`` (the *global* expert index);
HF names use the same placeholders. A rule converts the HF tensors into the *full* Megatron tensor
(the TP=1 layout) with ``to_mcore`` and back with ``to_hf``; the tensor-parallel slicing is then
described separately by ``split``:

* ``None``      replicated (norms, router);
* ``"column"``  dim 0 is cut in TP equal chunks (ColumnParallelLinear, VocabParallelEmbedding,
                output layer; also the fused QKV, whose TP=1 layout is interleaved per query group
                ``[q_g0 k_g0 v_g0 | q_g1 k_g1 v_g1 | ...]`` so a contiguous chunk is whole groups);
* ``"row"``     dim 1 is cut (RowParallelLinear: attention output, fc2);
* ``"glu"``     dim 0 is ``[gate; up]`` and *each half* is cut, shard r = ``[gate_r; up_r]``
                (Megatron's SwiGLU fc1, megatron/core/transformer/mlp.py ``glu`` / its
                sharded_state_dict ``apply_swiglu_sharded_factory``).

Expert rules (templates containing ``{expert}``) use the expert-TP group for slicing and the EP
rank for the expert index: rank r of EP=n holds experts ``[r*E/n, (r+1)*E/n)`` as
``local_experts.{0..E/n-1}`` (megatron/core/transformer/moe/experts.py SequentialMLP).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from int4_qat.arch.shape import ArchShape

__all__ = [
    "HFConfig",
    "ArchParts",
    "Arch",
    "ArchDefinition",
    "Rule",
    "register_arch",
    "registered_model_types",
    "get_arch_definition",
    "qkv_to_mcore",
    "qkv_to_hf",
    "glu_to_mcore",
    "glu_to_hf",
    "output_layer_rule",
    "COMMON_IGNORED_FIELDS",
]

# Keys transformers writes into every config.json that do not change the forward pass.
COMMON_IGNORED_FIELDS = frozenset({
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_router_logits",
    "return_dict", "output_hidden_states", "output_attentions", "tie_encoder_decoder",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "_name_or_path", "_attn_implementation_autoset", "auto_map",
    "model_type",
})


class HFConfig:
    """Read-tracking view of an HF ``config.json``.

    Every access is recorded; :meth:`finish` raises ``ValueError`` naming the file and the keys
    that nobody read and that are not declared ignorable -- so a field that would change the
    model (an unknown rope scaling, a sliding window, a bias flag) cannot be silently dropped.
    """

    def __init__(self, data: dict, path: Path | str):
        self.data = dict(data)
        self.path = Path(path)
        self.model_type = str(self.data.get("model_type"))
        self._read: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def _fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.path}: {msg} (model_type={self.model_type!r})")

    def require(self, key: str, typ: type | tuple = (int, float, str, bool, list, dict),
                *, aliases: Sequence[str] = ()) -> Any:
        """Value of ``key`` (or the first present alias); ValueError if absent or mistyped."""
        for k in (key, *aliases):
            if k in self.data:
                self._read.update((key, *aliases))
                v = self.data[k]
                if typ is float and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                    raise self._fail(f"field {k!r} must be {getattr(typ, '__name__', typ)}, got {v!r}")
                return v
        raise self._fail(f"required field {key!r} is missing")

    def get(self, key: str, default: Any, typ: type | tuple = object, *,
            aliases: Sequence[str] = ()) -> Any:
        if any(k in self.data and self.data[k] is not None for k in (key, *aliases)):
            return self.require(key, typ, aliases=aliases)
        self._read.update((key, *aliases))
        return default

    def expect(self, key: str, allowed: Sequence[Any], default: Any = None, *, why: str = "") -> Any:
        """Value of ``key`` (default if absent) that must be one of ``allowed``."""
        v = self.get(key, default)
        if v not in allowed:
            reason = f": {why}" if why else ""
            raise self._fail(f"field {key!r}={v!r} is not supported (supported: {list(allowed)}){reason}")
        return v

    def ignore(self, *keys: str) -> None:
        """Declare keys that do not change the forward pass."""
        self._read.update(keys)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._read - COMMON_IGNORED_FIELDS)
        if unknown:
            raise self._fail(
                f"unknown config field(s) {unknown}: this architecture does not know whether they "
                "change the model; support them or declare them ignorable in its parse()")


@dataclass
class ArchParts:
    """What an architecture's ``parse`` returns (everything derived from config.json)."""
    tf_kwargs: dict            # TransformerConfig kwargs that describe the model (not the run)
    vocab_size: int
    max_position_embeddings: int
    gpt_kwargs: dict           # GPTModel kwargs: position_embedding_type, rotary_base, ...
    tie_embeddings: bool = False
    moe_layers: Optional[list[int]] = None   # per layer 1 = MoE, 0 = dense; None = no experts
    extras: dict = field(default_factory=dict)  # architecture-private facts for its rules


@dataclass(frozen=True)
class Rule:
    """One row of an architecture's HF<->Megatron name-mapping table (see the module docstring)."""
    mcore: tuple[str, ...]     # alternative Megatron name templates (local spec name first, TE name next)
    hf: tuple[str, ...]        # HF name templates consumed/produced together
    split: Optional[str] = None               # None | "column" | "row" | "glu"
    to_mcore: Optional[Callable[["Arch", list[torch.Tensor]], torch.Tensor]] = None
    to_hf: Optional[Callable[["Arch", torch.Tensor], list[torch.Tensor]]] = None
    export: bool = True        # False: imported but not exported (e.g. tied lm_head)
    # (added for gpt_oss.py) True: each HF tensor holds *all* experts stacked on dim 0 (gpt-oss's
    # fused ``mlp.experts.gate_up_proj`` [E, H, 2I]); import takes slice [expert] before to_mcore,
    # export stacks the experts' to_hf outputs back. Only for expert rules.
    stacked: bool = False
    # Shape of the full (TP=1) Megatron tensor of one layer / one expert, from the model's sizes
    # (``int4_qat.arch.shape.ArchShape``): what a checkpoint must hold (see ``arch/expected.py``).
    shape: Optional[Callable[["ArchShape"], tuple[int, ...]]] = None
    # Which decoder layers have this tensor: "all", "dense" (dense-MLP layers only) or "moe".
    layers: str = "all"

    def __post_init__(self):
        if self.split not in (None, "column", "row", "glu"):
            raise ValueError(f"Rule {self.mcore[0]}: split must be None/column/row/glu, got {self.split!r}")
        if len(self.hf) != 1 and (self.to_mcore is None or self.to_hf is None):
            raise ValueError(f"Rule {self.mcore[0]}: several HF tensors need to_mcore and to_hf")
        if self.layers not in ("all", "dense", "moe"):
            raise ValueError(f"Rule {self.mcore[0]}: layers must be all/dense/moe, got {self.layers!r}")
        if self.stacked and (not self.is_expert or any("{expert}" in h for h in self.hf)):
            raise ValueError(f"Rule {self.mcore[0]}: stacked=True needs {{expert}} in the Megatron "
                             "template and none in the HF names")

    @property
    def is_expert(self) -> bool:
        return "{expert}" in self.mcore[0]

    @property
    def is_layer(self) -> bool:
        return "{layer}" in self.mcore[0]

    def hf_names(self, layer: Optional[int] = None, expert: Optional[int] = None) -> list[str]:
        return [h.format(layer=layer, expert=expert) for h in self.hf]

    def combine(self, arch: "Arch", tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if self.to_mcore is None else self.to_mcore(arch, tensors)

    def separate(self, arch: "Arch", full: torch.Tensor) -> list[torch.Tensor]:
        return [full] if self.to_hf is None else self.to_hf(arch, full)


@dataclass(frozen=True)
class ArchDefinition:
    model_type: str
    parse: Callable[[HFConfig], ArchParts]
    rules: Callable[["Arch"], list[Rule]]
    layer_spec: Optional[Callable[["Arch", Any, bool], Any]] = None
    ignore_hf: tuple[str, ...] = ()   # regexes of checkpoint tensors that import may skip


_REGISTRY: dict[str, ArchDefinition] = {}


def register_arch(definition: ArchDefinition) -> ArchDefinition:
    """Register an architecture under its HF ``model_type`` (one registration per type)."""
    if definition.model_type in _REGISTRY and _REGISTRY[definition.model_type] is not definition:
        raise ValueError(f"model_type {definition.model_type!r} is already registered")
    _REGISTRY[definition.model_type] = definition
    return definition


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_arch_definition(model_type: str, path: Path | str = "config.json") -> ArchDefinition:
    if model_type not in _REGISTRY:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported "
                         f"(supported: {registered_model_types()})")
    return _REGISTRY[model_type]


@dataclass
class Arch:
    """A parsed HF architecture: what ``load_arch`` returns and ``build_model`` consumes."""
    model_type: str
    hf_config: dict
    config_path: Path
    definition: ArchDefinition
    tf_kwargs: dict
    vocab_size: int
    max_position_embeddings: int
    gpt_kwargs: dict
    tie_embeddings: bool
    moe_layers: Optional[list[int]]
    extras: dict
    shape: "ArchShape" = None       # int4_qat.arch.shape.arch_shape(hf_config): the torch-free sizes

    @property
    def num_layers(self) -> int:
        return self.tf_kwargs["num_layers"]

    @property
    def num_experts(self) -> int:
        return self.tf_kwargs.get("num_moe_experts") or 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def rules(self) -> list[Rule]:
        return self.definition.rules(self)

    def replace(self, **changes) -> "Arch":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ tensor layout converters
def _qkv_dims(arch: Arch) -> tuple[int, int, int]:
    heads = arch.tf_kwargs["num_attention_heads"]
    groups = arch.tf_kwargs.get("num_query_groups") or heads
    head_dim = arch.tf_kwargs.get("kv_channels") or arch.tf_kwargs["hidden_size"] // heads
    return heads, groups, head_dim


def qkv_to_mcore(arch: Arch, tensors: list[torch.Tensor]) -> torch.Tensor:
    """HF ``q, k, v`` ([heads*d, ...], [groups*d, ...] x2) -> Megatron fused QKV, interleaved
    per query group: for each group g, its ``heads/groups`` query heads, then k_g, then v_g
    (megatron/core/transformer/attention.py SelfAttention.get_query_key_value_tensors splits it so).
    Works for weights ([out, in]) and biases ([out])."""
    q, k, v = tensors
    heads, groups, d = _qkv_dims(arch)
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_to_hf(arch: Arch, fused: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`qkv_to_mcore`."""
    heads, groups, d = _qkv_dims(arch)
    rest = fused.shape[1:]
    per = heads // groups * d
    g = fused.reshape(groups, per + 2 * d, *rest)
    q, k, v = torch.split(g, [per, d, d], dim=1)
    return [q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous()]


def glu_to_mcore(arch: Arch, tensors: list[torch.Tensor]) -> torch.Tensor:
    """HF ``gate_proj, up_proj`` -> Megatron fc1 ``[gate; up]`` (TP=1 layout; split="glu")."""
    return torch.cat(tensors, dim=0)


def glu_to_hf(arch: Arch, fc1: torch.Tensor) -> list[torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return [gate.contiguous(), up.contiguous()]


def output_layer_rule(arch: Arch, lm_head: str = "lm_head.weight",
                      embedding: str = "model.embed_tokens.weight") -> Rule:
    """The Megatron ``output_layer.weight`` rule every GPT-style architecture shares.

    Untied: from/to ``lm_head``. Tied: only a last pipeline stage without the embedding owns a
    separate ``output_layer.weight`` (a copy of the embedding that Megatron keeps in sync); it is
    read from the embedding and not exported (HF ties ``lm_head`` to it)."""
    vh = lambda s: (s.vocab, s.hidden)  # noqa: E731
    if arch.tie_embeddings:
        return Rule(("output_layer.weight",), (embedding,), "column", export=False, shape=vh)
    return Rule(("output_layer.weight",), (lm_head,), "column", shape=vh)


# ------------------------------------------------------------------ TP slicing helpers
def shard(full: torch.Tensor, split: Optional[str], rank: int, size: int, what: str) -> torch.Tensor:
    """This TP rank's slice of the full (TP=1 layout) Megatron tensor."""
    if split is None or size == 1:
        return full
    dim = 1 if split == "row" else 0
    if split == "glu":
        halves = torch.chunk(full, 2, dim=0)
        if halves[0].shape[0] % size:
            raise ValueError(f"{what}: GLU half of {halves[0].shape[0]} rows is not divisible by TP={size}")
        return torch.cat([h.chunk(size, dim=0)[rank] for h in halves], dim=0)
    if full.shape[dim] % size:
        raise ValueError(f"{what}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={size}")
    return full.chunk(size, dim=dim)[rank]


def unshard(parts: list[torch.Tensor], split: Optional[str]) -> torch.Tensor:
    """Inverse of :func:`shard`: the list of all TP ranks' slices -> the full tensor."""
    if split is None or len(parts) == 1:
        return parts[0]
    if split == "glu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=1 if split == "row" else 0)


def template_regex(template: str) -> re.Pattern:
    """``decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight`` -> regex
    with named groups ``layer`` and ``expert``."""
    out = re.escape(template)
    out = out.replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(out + "$")


__all__ += ["shard", "unshard", "template_regex"]


# ------------------------------------------------------------------ load_arch / build_model
_BUILTIN_MODULES = ("qwen3", "deepseek_v3", "gpt_oss")


def _load_builtin_archs() -> None:
    """Import the architecture modules shipped in int4_qat.arch so that they register."""
    import importlib
    import importlib.util

    for name in _BUILTIN_MODULES:
        mod = f"int4_qat.arch.{name}"
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def load_arch(hf_dir) -> Arch:
    """Parse ``<hf_dir>/config.json`` into an :class:`Arch` (ValueError naming the file and field
    for an unsupported model_type, an unsupported value or an unknown field)."""
    from int4_qat.arch.hf_io import read_config

    data, path = read_config(hf_dir)
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{path}: field 'model_type' is missing or not a string")
    if data.get("quantization_config") is not None:
        raise ValueError(f"{path}: has a 'quantization_config' -- import expects an unquantized "
                         "(BF16/FP32) checkpoint; give the BF16 original")
    _load_builtin_archs()
    definition = get_arch_definition(model_type, path)
    cfg = HFConfig(data, path)
    parts = definition.parse(cfg)
    cfg.finish()
    from int4_qat.arch.shape import arch_shape

    return Arch(model_type=model_type, hf_config=data, config_path=path, definition=definition,
                tf_kwargs=parts.tf_kwargs, vocab_size=parts.vocab_size,
                max_position_embeddings=parts.max_position_embeddings, gpt_kwargs=parts.gpt_kwargs,
                tie_embeddings=parts.tie_embeddings, moe_layers=parts.moe_layers, extras=parts.extras,
                shape=arch_shape(data, str(path)))


def build_model(arch: Arch, *, use_te: bool, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, params_dtype: torch.dtype = torch.float32,
                parallel_output: bool = True, vp_stage: Optional[int] = None,
                sequence_parallel: Optional[bool] = None,
                config_overrides: Optional[dict] = None):
    """Megatron-Core ``GPTModel`` for ``arch`` on the current ``parallel_state`` (TP/PP/EP/ETP).

    ``use_te=True``: Transformer-Engine spec (GPU). ``use_te=False``: Megatron's local spec with
    CPU-friendly settings (``use_cpu_initialization``, no fusions, ``allgather`` MoE dispatcher)
    -- call ``int4_qat.compat.cpu.activate()`` / ``init_model_parallel`` first (its norm shim is
    what lets the local spec run sequence parallel, so MoE + TP runs on a CPU too).

    ``sequence_parallel``: the recipe's ``parallel.sequence_parallel`` -- the one place it is
    decided (``int4_qat.parallel.validate_layout`` checks the same flag: MoE with TP > 1 needs
    it, and then ``seq_length % tp == 0``). ``None`` means "on whenever TP > 1".

    Experts are always a ``SequentialMLP`` (``moe_grouped_gemm=False``), on both specs: its
    ``local_experts.{i}`` are ordinary Column/RowParallelLinears that ModelOpt quantizes per
    expert, under any TP x EP x ETP once ``int4_qat.modelopt_backend.register_backend`` has put
    our SequentialMLP quant module in place (docs/DESIGN.md "The expert module" says why not
    ``TEGroupedMLP``). The router runs in fp32 (``moe_router_dtype``), as HF's softmax does.
    ``pre_process``/``post_process`` default to "first/last pipeline stage"; the decoder holds
    only this stage's layers (Megatron's ``get_transformer_layer_offset``). ``config_overrides``
    are applied last to the TransformerConfig kwargs (e.g. ``{"recompute_granularity": ...}``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer import TransformerConfig

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model: Megatron parallel_state is not initialised (use "
                           "int4_qat.compat.cpu.init_model_parallel on CPU, int4_qat.parallel on GPU)")
    tp = ps.get_tensor_model_parallel_world_size()
    if arch.vocab_size % tp:
        raise ValueError(f"{arch.config_path}: vocab_size {arch.vocab_size} is not divisible by TP={tp}")
    sp = tp > 1 if sequence_parallel is None else bool(sequence_parallel)
    if arch.is_moe and tp > 1 and not sp:
        raise ValueError(f"{arch.config_path}: MoE with TP={tp} needs sequence parallelism "
                         "(megatron/core/transformer/moe/moe_layer.py); set "
                         "parallel.sequence_parallel: true")
    if sp and tp == 1:
        sp = False                 # Megatron refuses SP without TP; a TP=1 rebuild (export) drops it
    if sp and not use_te:
        from int4_qat.compat import cpu as compat_cpu

        if not compat_cpu.is_active():
            raise RuntimeError("build_model: sequence parallel on the local spec needs the CPU "
                               "norm shim; call int4_qat.compat.cpu.activate() first")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    kw = dict(arch.tf_kwargs)
    kw.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        sequence_parallel=sp,
    )
    if arch.is_moe:
        kw.setdefault("moe_router_dtype", "fp32")     # an architecture may ask for fp64
        kw.update(moe_grouped_gemm=False,
                  moe_token_dispatcher_type="alltoall" if use_te else "allgather")
    if not use_te:
        kw.update(use_cpu_initialization=True, bias_activation_fusion=False,
                  masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                  gradient_accumulation_fusion=False, persist_layer_norm=False)
        if arch.is_moe:
            kw.update(moe_permute_fusion=False)
    kw.update(config_overrides or {})
    config = TransformerConfig(**kw)
    if arch.definition.layer_spec is not None:
        spec = arch.definition.layer_spec(arch, config, use_te)
    else:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                          normalization=config.normalization, vp_stage=vp_stage)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_embeddings, vp_stage=vp_stage,
        **arch.gpt_kwargs,
    )


__all__ += ["load_arch", "build_model"]
