"""Process groups from the launcher's environment, and the layout rules checked *before* building.

Megatron-Core's layout in one paragraph
---------------------------------------
The dense part of the model (attention, dense MLPs, embeddings) is laid out as
``TP × PP × DP = world size`` (no context parallel here): tensor parallel (TP) splits each Linear,
pipeline parallel (PP) splits the layer stack, data parallel (DP) replicates what is left. The MoE
part is *folded* onto the same ranks with its own factors (megatron/core/parallel_state.py,
``initialize_model_parallel``: ``world % (etp * ep * pp) == 0``): expert tensor parallel (ETP) splits
each expert's Linears, expert parallel (EP) spreads whole experts, and expert-DP is what remains —
so ``EP × ETP`` must divide ``TP × DP``. MoE layers with TP > 1 need sequence parallel in training
(megatron/core/transformer/moe/moe_layer.py raises otherwise), and sequence parallel needs TP > 1
(megatron/core/model_parallel_config.py).

Quantization versus layout
--------------------------
A group-wise format (INT4 group G, MXFP4 block 32, NVFP4 block 16) takes one scale per G
consecutive input features (the last dim, K). A *row-parallel* Linear splits K over ranks:
``linear_proj`` (attention output) and ``linear_fc2`` (dense MLP / shared experts) over TP, the
routed experts' ``linear_fc2`` (HF ``down_proj``) over ETP. Each rank fake-quantizes only its own
shard, so a group must not straddle two shards: ``(K / shard) % G == 0``. Otherwise training would
learn against groups that the exported (gathered, HF-layout) tensor does not have. The serving
engine has the same rule at *its* TP (tools/launch.py checks that with the Marlin limits).

:func:`validate_layout` is a pure function (no process groups): ``tools/launch.py``, the recipe
checker and :mod:`int4_qat.train` all call it, and it reports *every* violated rule at once.
:func:`init_parallel` then builds the groups: NCCL on GPU, gloo on CPU (with
``int4_qat.compat.cpu`` activated), reading ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` from torchrun, falling back to ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/
``SLURM_LAUNCH_NODE_IPADDR`` under ``srun``, and to a single local process otherwise.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "dist_env",
    "free_port",
    "validate_layout",
    "init_parallel",
    "init_process_group",
    "destroy_parallel",
    "megatron_layout_kwargs",
    "ROW_PARALLEL_PROBES",
]


# --------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (a local rendezvous: single-process gloo, torchrun on one node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Rank/world/master from torchrun (``RANK`` …), else Slurm (``SLURM_PROCID`` …), else 1 process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"),
                       _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")),
                       "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # srun without torchrun: one task per GPU. The head node's address comes from the launch
        # node (or MASTER_ADDR when the batch script exported it).
        addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        return DistEnv(_int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS"),
                       _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                       addr, int(env.get("MASTER_PORT", "29500")), "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


# --------------------------------------------------------------------------- layout checks
def _shape(arch: Any):
    """The :class:`int4_qat.arch.shape.ArchShape` of an arch (``load_arch`` result, which carries
    ``.shape``), an ``ArchShape`` itself, or a parsed config.json dict."""
    from int4_qat.arch.shape import ArchShape, arch_shape

    if isinstance(arch, ArchShape):
        return arch
    if isinstance(getattr(arch, "shape", None), ArchShape):
        return arch.shape
    if isinstance(arch, Mapping):
        return arch_shape(arch)
    raise ValueError(f"validate_layout: cannot read the model shape from {type(arch).__name__}; "
                     "pass the arch from int4_qat.arch.load_arch or the parsed config.json dict")


def _get(section: Any, key: str, default: Any = None) -> Any:
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


#: Row-parallel Linears (K split over ranks) probed with ``scheme.quantizes_megatron``:
#: (Megatron module name, which K of ArchShape, which parallel factor splits K).
ROW_PARALLEL_PROBES = (
    ("decoder.layers.0.self_attention.linear_proj", "q_dim", "tp"),
    ("decoder.layers.0.mlp.linear_fc2", "dense_ffn", "tp"),
    ("decoder.layers.0.mlp.shared_experts.linear_fc2", "shared_ffn", "tp"),
    ("decoder.layers.0.mlp.experts.local_experts.0.linear_fc2", "moe_ffn", "etp"),
)


def _quantizes(scheme: Any, name: str) -> bool:
    fn = getattr(scheme, "quantizes_megatron", None)
    if fn is not None:
        return bool(fn(name))
    scope = str(getattr(getattr(scheme, "scope", None), "value", getattr(scheme, "scope", "experts")))
    return "experts.local_experts" in name or (scope == "all-linear" and "router" not in name)


def _group_size(scheme: Any) -> int:
    g = _get(scheme, "group_size")
    if not isinstance(g, int) or g < 1:
        raise ValueError(f"validate_layout: scheme has no positive integer group_size ({g!r})")
    return g


def validate_layout(parallel_section: Any, world_size: int, arch: Any = None, scheme: Any = None,
                    *, train: Any = None, cpu: bool = False) -> None:
    """Check a layout before anything is built; ``ValueError`` lists every violated rule.

    ``parallel_section``: the recipe's ``parallel`` section (or a dict with tp/pp/ep/etp/dp/
    sequence_parallel). ``arch``: ``int4_qat.arch.load_arch(...)`` result or the config.json dict
    (model-size rules are skipped without it). ``scheme``: the ``QuantScheme`` (group/shard rules
    skipped without it). ``train``: the recipe's ``train`` section (batch rules). ``cpu``: also
    reject layouts that only run on GPUs here: MLA at TP > 1 (MoE + TP runs on CPU with the
    ``int4_qat.compat.cpu`` sequence-parallel norm).
    ``parallel.sequence_parallel`` is the flag ``int4_qat.arch.build_model`` builds with (the
    trainer passes it), so the sequence-parallel rules here check what will run.
    """
    tp, pp, ep = (int(_get(parallel_section, k, 1)) for k in ("tp", "pp", "ep"))
    etp, dp = int(_get(parallel_section, "etp", 1)), int(_get(parallel_section, "dp", 1))
    sp = bool(_get(parallel_section, "sequence_parallel", False))
    errors: list[str] = []
    for k, v in (("tp", tp), ("pp", pp), ("ep", ep), ("etp", etp), ("dp", dp)):
        if v < 1:
            errors.append(f"parallel.{k}={v} must be >= 1")
    if errors:
        raise ValueError("invalid parallel layout:\n  " + "\n  ".join(errors))
    if tp * pp * dp != world_size:
        errors.append(f"tp={tp} × pp={pp} × dp={dp} = {tp * pp * dp} != world size {world_size} "
                      f"(set parallel.dp = {world_size // (tp * pp) if world_size % (tp * pp) == 0 else '?'}"
                      f" or change the process count)")
    if (tp * dp) % (ep * etp):
        errors.append(f"ep={ep} × etp={etp} = {ep * etp} does not divide tp={tp} × dp={dp} = {tp * dp} "
                      f"(Megatron folds experts onto the dense ranks: world % (etp·ep·pp) == 0)")
    if sp and tp == 1:
        errors.append("parallel.sequence_parallel=true needs tp > 1 (Megatron model_parallel_config.py); "
                      "set it to false")
    dims = _shape(arch) if arch is not None else None
    if dims is not None:
        errors.extend(_pipeline_errors(dims.layers, pp, _get(parallel_section, "first_stage_layers"),
                                       _get(parallel_section, "last_stage_layers")))
        if dims.heads % tp:
            errors.append(f"num_attention_heads={dims.heads} is not divisible by tp={tp}")
        if dims.query_groups % tp:
            errors.append(f"num_key_value_heads (query groups)={dims.query_groups} is not divisible "
                          f"by tp={tp}")
        if dims.num_experts:
            if dims.num_experts % ep:
                errors.append(f"num_experts={dims.num_experts} is not divisible by ep={ep}")
            if tp > 1 and not sp:
                errors.append(f"MoE with tp={tp} needs parallel.sequence_parallel: true "
                              f"(megatron/core/transformer/moe/moe_layer.py)")
            if dims.moe_ffn and dims.moe_ffn % etp:
                errors.append(f"moe_intermediate_size={dims.moe_ffn} is not divisible by etp={etp}")
        if cpu and tp > 1 and dims.mla is not None:
            errors.append(f"MLA with tp={tp} is GPU-only here (the local spec shards "
                          f"linear_q_down_proj / linear_kv_down_proj, which the TE spec and "
                          f"the HF layout keep whole); on CPU use tp=1")
        for k, name in ((dims.dense_ffn, "intermediate_size"), (dims.shared_ffn, "shared expert size")):
            if k and k % tp:
                errors.append(f"{name}={k} is not divisible by tp={tp}")
        if scheme is not None:
            errors.extend(_group_errors(dims, scheme, {"tp": tp, "etp": etp}))
    if train is not None:
        gb, mb, sl = (int(_get(train, k)) for k in ("global_batch", "micro_batch", "seq_length"))
        if gb % (mb * dp):
            errors.append(f"train.global_batch={gb} is not a multiple of micro_batch × dp = {mb} × {dp} "
                          f"= {mb * dp}")
        if sp and sl % tp:
            errors.append(f"train.seq_length={sl} is not divisible by tp={tp} (sequence parallel)")
    if errors:
        raise ValueError("invalid parallel layout:\n  " + "\n  ".join(errors))


def megatron_layout_kwargs(parallel_section: Any) -> dict:
    """TransformerConfig kwargs the layout fixes beyond the group sizes: the uneven pipeline split
    (``num_layers_in_{first,last}_pipeline_stage``). The trainer and ``int4_qat.structure`` pass
    them to ``build_model`` as ``config_overrides``."""
    out = {}
    for key, kw in (("first_stage_layers", "num_layers_in_first_pipeline_stage"),
                    ("last_stage_layers", "num_layers_in_last_pipeline_stage")):
        v = _get(parallel_section, key)
        if v:
            out[kw] = int(v)
    return out


def _pipeline_errors(layers: int, pp: int, first: int | None, last: int | None) -> list[str]:
    """Megatron's split (TransformerConfig num_layers_in_{first,last}_pipeline_stage): the stages
    not pinned by first/last share the remaining layers evenly."""
    if pp == 1:
        return []
    pinned = [x for x in (first, last) if x]
    rest, stages = layers - sum(pinned), pp - len(pinned)
    if rest < 0 or (stages == 0 and rest != 0) or (stages > 0 and (rest % stages or rest == 0)):
        what = f"num_hidden_layers={layers}"
        if pinned:
            what += f" minus first/last_stage_layers {pinned} = {rest}"
        return [f"{what} is not divisible by the {stages} remaining pipeline stages (pp={pp}); "
                f"set parallel.first_stage_layers / last_stage_layers or change pp"]
    return []


def _group_errors(dims: Any, scheme: Any, factors: dict[str, int]) -> list[str]:
    g = _group_size(scheme)
    out = []
    # Column-parallel Linears (linear_qkv, linear_fc1) keep K = hidden_size whole on every rank.
    col = ["decoder.layers.0.self_attention.linear_qkv", "decoder.layers.0.mlp.linear_fc1",
           "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1"]
    if dims.hidden % g and any(_quantizes(scheme, n) for n in col):
        out.append(f"hidden_size={dims.hidden} (K of linear_fc1/linear_qkv) is not a multiple of "
                   f"group_size={g}; use a group size dividing {dims.hidden}")
    for name, dim_attr, factor in ROW_PARALLEL_PROBES:
        k = getattr(dims, dim_attr)
        if not k or not _quantizes(scheme, name):
            continue
        n = factors[factor]
        shard = k // n if k % n == 0 else k / n
        if k % n or (k // n) % g:
            ok = [d for d in (16, 32, 64, 128) if k % n == 0 and (k // n) % d == 0]
            fix = (f"use quant.group_size in {ok}" if ok else "use a smaller group size") + \
                  f" or a smaller {factor}" + (" (etp=1 keeps expert groups whole)" if factor == "etp" else "")
            out.append(f"{name.split('layers.0.')[1]}: in_features {k} / {factor}={n} = {shard} per shard "
                       f"is not a multiple of group_size={g}, so a quantization group would straddle "
                       f"two shards; {fix}")
    return out


# --------------------------------------------------------------------------- process groups
def init_parallel(parallel_section: Any, *, cpu: bool | None = None, seed: int = 1234,
                  timeout_minutes: int = 30) -> DistEnv:
    """torch.distributed + Megatron ``parallel_state`` for ``parallel_section`` (tp/pp/ep/etp).

    ``cpu=None`` picks CPU (gloo, ``int4_qat.compat.cpu`` activated) when CUDA is unavailable.
    On GPU: NCCL, ``torch.cuda.set_device(LOCAL_RANK)``, Megatron's CUDA RNG tracker seeded.
    Idempotent when the process group already exists (tests, in-process demo).
    """
    from megatron.core import parallel_state as ps

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    env = dist_env()
    tp, pp, ep = (int(_get(parallel_section, k, 1)) for k in ("tp", "pp", "ep"))
    etp = int(_get(parallel_section, "etp", 1))
    if not dist.is_initialized():
        if env.source != "torchrun":
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        if not cpu:
            torch.cuda.set_device(env.local_rank)
        init_process_group("gloo" if cpu else "nccl", init_method="env://", rank=env.rank,
                           world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_minutes))
    if cpu:
        from int4_qat.compat import cpu as compat_cpu

        # activates the shims; reuses our process group; (re)builds parallel_state; seeds torch
        compat_cpu.init_model_parallel(tp, pp, ep, etp, seed=seed, force=torch.cuda.is_available())
    else:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                     distributed_timeout_minutes=timeout_minutes)
        from megatron.core import tensor_parallel

        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.master_addr,
                   env.master_port, env.source)


def init_process_group(backend: str, **kwargs) -> None:
    """``torch.distributed.init_process_group``, the one way this project creates the default group.

    ``torch.distributed.nn.functional`` is imported first: its functions take ``group=group.WORLD``
    as a default argument, evaluated when the module is first imported. Imported later -- it is
    pulled in by ``torch._dynamo``, hence by compressed-tensors, which the exporter imports lazily --
    it captures the live default group, which ``destroy_process_group`` then cannot free: its gloo
    worker threads outlive the interpreter and abort the process at exit (SIGABRT, "terminate
    called without an active exception") after the command succeeded. Imported before the group
    exists, the default is ``None`` (meaning WORLD at call time) and nothing keeps the group alive.
    """
    import torch.distributed.nn.functional  # noqa: F401  (see the docstring)

    dist.init_process_group(backend, **kwargs)


def destroy_parallel(process_group: bool = False) -> None:
    """Destroy Megatron's groups (and the default process group when ``process_group``)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
