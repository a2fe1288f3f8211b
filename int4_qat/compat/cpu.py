"""Megatron-Core on a CPU: every shim this project needs, in one place, activated explicitly.

Megatron-Core 0.16.1 is written for CUDA. Its *local* (non Transformer-Engine) module spec runs on
a CPU with torch + gloo, except where it reaches for a GPU. This module patches those places and
only after ``activate()`` is called. It is meant for tests, the CPU demo and CPU recipe runs; GPU
runs never call it. ``activate()`` refuses to run when a CUDA device is available (pass
``force=True`` to run the CPU path on a GPU machine anyway, e.g. the CPU test-suite on a GPU node;
:func:`deactivate` undoes shims 1-3 then). Training-side shims (DDP buffers, optimizer, dist
checkpointing) are installed by :func:`activate_training` (section at the end).

What is patched (megatron/core paths are relative to site-packages/megatron/core, 0.16.1):

1. ``torch.cuda.current_device()`` answers ``torch.device("cpu")``. Megatron places tensors with
   ``device=torch.cuda.current_device()`` in ~60 files; the ones a CPU forward/backward reaches are
   ``models/common/embeddings/rotary_pos_embedding.py:160-162`` (``RotaryEmbedding.get_emb`` moves
   ``inv_freq``), ``utils.py:631`` (``GlobalMemoryBuffer.get_tensor``, the ``baddbmm`` scratch of
   ``transformer/dot_product_attention.py:189``), ``transformer/moe/router.py:88-92``
   (``Router.gating`` moves the router weight), ``tensor_parallel/mappings.py:91,141,148,181``
   (TP / EP all-gathers: ``parallel_output=False`` logits, the ``allgather`` MoE dispatcher) and
   ``transformer/moe/experts.py:184-192``. One patch of the lookup, instead of one per call site.
   On a CPU-only torch build the original raises ("Torch not compiled with CUDA enabled"), so
   nothing that worked before changes meaning.
2. ``fusions/fused_softmax.py:327`` -> ``transformer/utils.py:33-35`` -- with no attention mask,
   ``FusedScaleMaskSoftmax.forward_torch_softmax`` builds the causal mask with ``device="cuda"``.
   We rebind the name imported into ``fused_softmax`` to a CPU version. Callers may also pass an
   explicit mask from :func:`causal_attention_mask` (what Megatron's own CPU tests do).
3. ``transformer/moe/moe_utils.py:22-39, 1192, 1225`` -- ``RouterGatingLinearFunction`` tests
   ``te_general_gemm is not None``, a name that is only bound when Transformer-Engine imports
   (NameError otherwise). We bind it to ``None`` so the plain ``torch.mm`` branch runs for every
   ``moe_router_dtype`` (the alternative, ``moe_router_dtype="fp64"``, changes numerics).
4. ``tensor_parallel/random.py:286-340`` -- dropout and weight init fork the "model-parallel-rng"
   CUDA RNG tracker, whose ``add``/``fork`` call ``torch.cuda.get_rng_state``. On a CPU we install
   the *inference* tracker (``initialize_rng_tracker(inference_rng_tracker=True)``): ``fork`` is a
   no-op context, so dropout and init draw from torch's CPU generator, seeded by
   :func:`seed_everything`. (With ``use_cpu_initialization=True`` Megatron initialises the full
   master weight on CPU from the default generator and slices it, so weights do not depend on TP.)

5. ``transformer/torch_norm.py:32`` -- ``WrappedTorchNorm`` (the local spec's norm) asserts
   ``not config.sequence_parallel``, and MoE layers with TP > 1 need sequence parallel
   (``transformer/moe/moe_layer.py``), so MoE + TP could not run without Transformer-Engine.
   A norm is per token, so it computes the same thing on a sequence shard; what sequence parallel
   adds is that each TP rank sees only its shard's tokens, so its weight gradient is partial. TE's
   norms mark their parameters ``sequence_parallel = True`` (transformer_engine/pytorch/module/
   rmsnorm.py, layernorm.py) and Megatron sums the gradients of such parameters over the TP group
   (``distributed/finalize_model_grads.py`` ``_allreduce_non_tensor_model_parallel_grads``). The
   shim builds the torch norm and sets the same flag: :func:`_sp_torch_norm`. The rest of sequence
   parallel (all-gather / reduce-scatter along the sequence) runs on gloo as it is.

Things this module does *not* fix (see docs/CPU-NOTES.md): the ``alltoall`` token dispatcher
(creates a ``torch.cuda.Stream``; use ``allgather``). MLA and gpt-oss attention: see the section
at the end.
"""
from __future__ import annotations

import contextlib
import math as _math
import copy
import datetime
import importlib
import os
import types
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule as _MegatronModule

from int4_qat.parallel import free_port, init_process_group

__all__ = [
    "activate",
    "activate_training",
    "PROXIED_MODULES",
    "deactivate",
    "is_active",
    "causal_attention_mask",
    "seed_everything",
    "init_single_process_gloo",
    "init_distributed_gloo",
    "init_model_parallel",
    "destroy_model_parallel",
    "structure_only",
    "structure_only_active",
]

_ACTIVE = False
_ORIGINALS: dict[str, object] = {}


def is_active() -> bool:
    """True once :func:`activate` has installed the shims in this process."""
    return _ACTIVE


def activate(*, force: bool = False) -> None:
    """Install the Megatron-Core CPU shims (idempotent).

    Raises ``RuntimeError`` if a CUDA device is available, unless ``force=True``: the shims make
    Megatron place its tensors, masks and RoPE tables on the CPU, which must never happen in a
    GPU run.
    """
    global _ACTIVE
    if _ACTIVE:
        return
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "int4_qat.compat.cpu.activate() refused: a CUDA device is available "
            f"({torch.cuda.device_count()} visible). The CPU shims are for CPU runs and tests only; "
            "use the Transformer-Engine spec on GPU, or pass force=True to run the CPU path anyway."
        )
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if torch.cuda.current_device is not _cpu_current_device:      # keep the true originals
        _ORIGINALS["current_device"] = torch.cuda.current_device
    if fused_softmax.get_default_causal_mask is not _cpu_default_causal_mask:
        _ORIGINALS["causal_mask"] = fused_softmax.get_default_causal_mask
    if WrappedTorchNorm.__dict__["__new__"] is not _SP_NORM_NEW:
        _ORIGINALS["torch_norm_new"] = WrappedTorchNorm.__dict__["__new__"]
    # shim 1: torch.cuda.current_device (see the module docstring for the call sites)
    torch.cuda.current_device = _cpu_current_device
    # shim 2: megatron/core/fusions/fused_softmax.py:8 imports the name; line 327 calls it
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    # shim 3: megatron/core/transformer/moe/moe_utils.py:34 binds te_general_gemm only under TE
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _install_rng_tracker()                        # shim 4
    WrappedTorchNorm.__new__ = _SP_NORM_NEW       # shim 5
    _ACTIVE = True


def deactivate() -> None:
    """Undo shims 1, 2 and 5 and reset the RNG tracker (for tests that forced the CPU path on a
    GPU machine and hand the process back). A no-op when not active."""
    global _ACTIVE
    if not _ACTIVE:
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    torch.cuda.current_device = _ORIGINALS["current_device"]
    fused_softmax.get_default_causal_mask = _ORIGINALS["causal_mask"]
    WrappedTorchNorm.__new__ = _ORIGINALS["torch_norm_new"]
    mrandom.initialize_rng_tracker(force_reset=True)
    _ACTIVE = False


_STRUCTURE_ONLY = False


@contextlib.contextmanager
def structure_only():
    """Within: models are built to inspect their structure (``int4_qat.structure``, meta
    tensors), never run. Builders may then skip refusals that are about CPU *numerics* (MLA's
    local-spec down projections at TP > 1)."""
    global _STRUCTURE_ONLY
    old, _STRUCTURE_ONLY = _STRUCTURE_ONLY, True
    try:
        yield
    finally:
        _STRUCTURE_ONLY = old


def structure_only_active() -> bool:
    return _STRUCTURE_ONLY


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean causal mask ``[1, 1, s, s]`` in Megatron's convention: ``True`` = masked out.

    Pass it as ``attention_mask`` to ``GPTModel.forward`` (the local spec's attention applies it
    with ``masked_fill(mask, -10000)``; see megatron/core/transformer/utils.py attention_mask_func).
    """
    if seq_len < 1:
        raise ValueError(f"causal_attention_mask: seq_len must be >= 1, got {seq_len}")
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
    return mask[None, None]


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    # CPU twin of megatron/core/transformer/utils.py:33 get_default_causal_mask (device="cuda" there).
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sp_torch_norm(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                   zero_centered_gamma=False, normalization="LayerNorm"):
    """Shim 5: ``WrappedTorchNorm(...)`` that accepts ``config.sequence_parallel``.

    Builds the same torch ``RMSNorm`` / ``LayerNorm`` (the original constructor, handed a copy of
    the config with the flag off) and marks every parameter ``sequence_parallel`` with the
    config's value, as TE's norms do, so ``finalize_model_grads`` sums their partial gradients
    over the TP group."""
    sp = bool(config.sequence_parallel)
    if sp:
        config = copy.copy(config)
        config.sequence_parallel = False
    norm = _ORIGINALS["torch_norm_new"](cls, config, hidden_size, eps, persist_layer_norm,
                                        zero_centered_gamma, normalization)
    for p in norm.parameters():
        p.sequence_parallel = sp
    return norm


_SP_NORM_NEW = staticmethod(_sp_torch_norm)


def _install_rng_tracker() -> None:
    # megatron/core/tensor_parallel/random.py:286 initialize_rng_tracker; the inference tracker's
    # fork() is contextlib.nullcontext() (random.py:336), so no CUDA RNG state is touched.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def seed_everything(seed: int) -> None:
    """Seed torch's CPU generator (the one Megatron's CPU init and dropout draw from here)."""
    torch.manual_seed(seed)


# ------------------------------------------------------------------------ distributed + parallel
def init_distributed_gloo(timeout_s: int = 300) -> tuple[int, int]:
    """Initialise torch.distributed with gloo from the torchrun environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), or as a 1-process group on a free local port when there is none.

    Returns ``(rank, world_size)``. A no-op (returning the current values) if already initialised.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_method = "env://"
    else:
        rank, world = 0, 1
        init_method = f"tcp://127.0.0.1:{free_port()}"
    init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world


def init_model_parallel(tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                        *, seed: int = 1234, force: bool = False) -> None:
    """Activate the shims, initialise gloo (see :func:`init_distributed_gloo`) and Megatron's
    ``parallel_state`` for the given TP/PP/EP (ETP defaults to 1), then seed.

    ``WORLD_SIZE`` must be divisible by ``tp * pp`` and by ``etp * ep * pp`` (Megatron's rule);
    the data-parallel size is what is left. Re-initialising with other sizes destroys the old
    groups first. ``force`` is passed to :func:`activate`.
    """
    from megatron.core import parallel_state as ps

    activate(force=force)
    _, world = init_distributed_gloo()
    etp = 1 if etp is None else etp
    for name, v in (("tp", tp), ("pp", pp), ("ep", ep), ("etp", etp)):
        if v < 1:
            raise ValueError(f"init_model_parallel: {name} must be >= 1, got {v}")
    if world % (tp * pp) or world % (etp * ep * pp):
        raise ValueError(
            f"init_model_parallel: world size {world} is not divisible by tp*pp={tp * pp} "
            f"and etp*ep*pp={etp * ep * pp} (tp={tp}, pp={pp}, ep={ep}, etp={etp})"
        )
    if ps.model_parallel_is_initialized():
        same = (ps.get_tensor_model_parallel_world_size() == tp
                and ps.get_pipeline_model_parallel_world_size() == pp
                and ps.get_expert_model_parallel_world_size() == ep
                and ps.get_expert_tensor_parallel_world_size() == etp)
        if same:
            seed_everything(seed)
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
    )
    _install_rng_tracker()
    seed_everything(seed)


def init_single_process_gloo(seed: int = 1234, *, force: bool = False) -> None:
    """One CPU process, TP=PP=EP=1: what unit tests and the CPU demo use."""
    init_model_parallel(1, 1, 1, 1, seed=seed, force=force)


def destroy_model_parallel() -> None:
    """Tear down Megatron's parallel groups (the gloo default group is kept for reuse)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


# --- MLA and gpt-oss shims (deepseek_v3.py, gpt_oss.py) ---
# Installed by install_mla_gpt_oss_shims(), which int4_qat.arch.deepseek_v3 / gpt_oss call from
# their layer_spec when building the local (CPU) spec; it requires activate() to have run, so a
# GPU process never gets them. Paths are relative to site-packages/megatron/core (0.16.1).
#
# a. transformer/multi_latent_attention.py:55-65,181-185 -- without Transformer-Engine the
#    ``extensions.transformer_engine`` import succeeds with TE mocked, so ``HAVE_TE`` is True and
#    ``isinstance(self.linear_proj, TELinear)`` raises TypeError (TELinear is a MagicMock, not a
#    class). When TELinear is not a class we set that module's ``HAVE_TE = False`` (its only use
#    is that fp8/fp4 check).
# b. transformer/dot_product_attention.py -- the local DotProductAttention refuses MLA's
#    ``k_channels``/``v_channels`` (multi_latent_attention.py:153-164), sizes its output from
#    ``kv_channels`` (wrong when v_head_dim differs), and builds the sliding-window mask with
#    ``device="cuda"`` (transformer/utils.py:38-45). :class:`LocalCoreAttention` is a plain-torch
#    core attention with TEDotProductAttention's constructor and parameter names; the arch modules
#    put it in the local spec (the TE spec keeps TEDotProductAttention).
# c. tensor_parallel/layers.py:1294 -- RowParallelLinear (TP=1, no expert parallelism) returns the
#    output of the identity autograd Function ``_ReduceFromModelParallelRegion`` (mappings.py:27-28
#    returns its input as-is), and transformer/mlp.py:247 adds a biased expert's fc2 bias to it
#    in place: autograd refuses ("a view ... is being modified inplace"), so gpt-oss cannot train on
#    the local spec. With one rank we skip the Function (it is the identity both ways).
# The CUDA placements MLA and gpt-oss also reach (YarnRotaryEmbedding built without
# use_cpu_initialization, multi_latent_attention.py:131 / yarn_rotary_pos_embedding.py:76,120-126;
# TopKRouter's expert_bias, moe/router.py:163-181) are covered by shim 1.
# Shims a and c are correct in any process without TE / with one rank, so deactivate() keeps them.
__all__ += ["install_mla_gpt_oss_shims", "use_local_core_attention", "LocalCoreAttention"]


def install_mla_gpt_oss_shims() -> None:
    """Install shims a and c (idempotent). Requires :func:`activate` (i.e. a CPU run)."""
    if not _ACTIVE:
        raise RuntimeError("install_mla_gpt_oss_shims: call int4_qat.compat.cpu.activate() first "
                           "(the local spec is the CPU path; on GPU build with use_te=True)")
    from megatron.core.tensor_parallel import layers as tp_layers
    from megatron.core.transformer import multi_latent_attention as mla

    if not isinstance(mla.TELinear, type):                                        # shim a
        mla.HAVE_TE = False
    if not getattr(tp_layers.reduce_from_tensor_model_parallel_region, "_int4_qat_cpu_shim", False):
        tp_layers.reduce_from_tensor_model_parallel_region = _reduce_unless_single_rank  # shim c


def _reduce_unless_single_rank(input_, group=None):
    from megatron.core.tensor_parallel import mappings

    group = mappings.get_tensor_model_parallel_group_if_none(group)
    if group.size() == 1:
        return input_
    return mappings.reduce_from_tensor_model_parallel_region(input_, group)


_reduce_unless_single_rank._int4_qat_cpu_shim = True


def use_local_core_attention(block_spec):
    """Install shims a and c and put :class:`LocalCoreAttention` into every layer of a *local*
    decoder block spec (``get_gpt_decoder_block_spec(..., use_transformer_engine=False)``)."""
    install_mla_gpt_oss_shims()
    for layer_spec in block_spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = LocalCoreAttention
    return block_spec


class LocalCoreAttention(_MegatronModule):
    """Core attention ``softmax(q k^T * scale + mask [, sink]) v`` in plain torch (shim b).

    Inputs follow Megatron's layout: query ``[sq, b, heads, dk]``, key ``[sk, b, groups, dk]``,
    value ``[sk, b, groups, dv]`` (GQA groups are repeated to the heads); output
    ``[sq, b, heads * dv]``. ``attention_mask`` is boolean with ``True`` = masked out
    (``[b|1, 1, sq, sk]``); with none, the causal mask is built here. On top of it:

    * sliding window (``config.window_size = (left, right)`` on the layers selected by
      ``window_attn_skip_freq``, Megatron/TE semantics): query i sees keys ``i-left .. i+right``;
    * ``config.softmax_type``: ``"vanilla"``; ``"off-by-one"`` (an extra zero logit) or
      ``"learnable"`` -- one logit per head, the parameter ``softmax_offset`` (gpt-oss's attention
      "sinks"), which joins every row's softmax and is then dropped, so the probabilities of the
      real keys sum to less than one.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.utils import is_layer_window_attention
        from megatron.core.utils import divide

        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("LocalCoreAttention: context parallelism needs the TE spec (use_te=True)")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.k_channels = k_channels or config.kv_channels
        self.softmax_scale = (1.0 / _math.sqrt(self.k_channels) if softmax_scale is None
                              else softmax_scale)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        use_window = is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                               layer_number)
        self.window = tuple(config.window_size) if use_window else None
        self.dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout)
        if config.softmax_type == "vanilla":
            self.softmax_offset = None
        elif config.softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", torch.zeros(self.heads, dtype=config.params_dtype),
                                 persistent=False)
        elif config.softmax_type == "learnable":
            self.softmax_offset = torch.nn.Parameter(torch.empty(self.heads, dtype=config.params_dtype))
            if config.perform_initialization:
                config.init_method(self.softmax_offset)
        else:
            raise ValueError(f"LocalCoreAttention: softmax_type {config.softmax_type!r} is not "
                             "supported (vanilla, off-by-one, learnable)")

    def _masked_out(self, attention_mask, sq: int, sk: int, device) -> torch.Tensor:
        q_pos = torch.arange(sq, device=device)[:, None] + (sk - sq)   # queries are the last sq keys
        k_pos = torch.arange(sk, device=device)[None, :]
        masked = k_pos > q_pos if attention_mask is None else attention_mask.bool()
        if self.window is not None:
            left, right = self.window
            if left >= 0:
                masked = masked | (k_pos < q_pos - left)
            if right >= 0:
                masked = masked | (k_pos > q_pos + right)
        return masked

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        from megatron.core import tensor_parallel

        if packed_seq_params is not None:
            raise ValueError("LocalCoreAttention: packed sequences need the TE spec (use_te=True)")
        sq, b = query.shape[:2]
        sk = key.shape[0]
        if self.heads != self.groups:
            key = key.repeat_interleave(self.heads // self.groups, dim=2)
            value = value.repeat_interleave(self.heads // self.groups, dim=2)
        scores = torch.matmul(query.permute(1, 2, 0, 3), key.permute(1, 2, 3, 0))  # [b, h, sq, sk]
        scores = scores * self.softmax_scale
        if attention_bias is not None:
            scores = scores + attention_bias
        if self.config.attention_softmax_in_fp32:
            scores = scores.float()
        masked = self._masked_out(attention_mask, sq, sk, scores.device)
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        if self.softmax_offset is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            sink = self.softmax_offset.to(scores.dtype).view(1, -1, 1, 1).expand(b, -1, sq, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        probs = probs.to(value.dtype)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            probs = self.dropout(probs)
        context = torch.matmul(probs, value.permute(1, 2, 0, 3))                   # [b, h, sq, dv]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """``softmax_offset`` is split over TP like the heads (TEDotProductAttention's layout)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = ({"softmax_offset": self.softmax_offset}
                 if isinstance(self.softmax_offset, torch.nn.Parameter) else {})
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"softmax_offset": 0}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"))

# --- Training-side shims (DDP buffers, optimizer, pipeline schedules, dist checkpointing) ---
# Megatron-Core *training* machinery on a CPU: DDP buffers, optimizer, schedules, dist checkpoints.
#
# Companion of :mod:`int4_qat.compat.cpu` (which makes the *model* run on a CPU). Written by the
# training owner because the training loop needs it; it follows the same rules: activated
# explicitly (:func:`activate`, called by ``int4_qat.train`` for ``--cpu`` runs and by tests), refuses
# to run when CUDA is usable, and patches only the modules listed here.
#
# Megatron-Core 0.16.1 writes ``device="cuda"`` / ``torch.cuda.current_device()`` /
# ``torch.cuda.synchronize()`` in the training-side modules below (paths relative to
# site-packages/megatron/core). Instead of editing each call, each of these modules gets its module-
# global ``torch`` replaced by :class:`_CpuTorch`, a proxy that forwards everything to the real
# ``torch`` except that tensor factories map a CUDA device to the CPU and ``torch.cuda`` answers
# ``current_device() -> "cpu"`` with no-op streams / synchronize / empty_cache:
#
# * ``distributed/param_and_grad_buffer.py:783-806`` grad (and param) buffers on ``current_device()``;
#   ``:417-529`` communication-stream waits.
# * ``distributed/distributed_data_parallel.py``, ``distributed/finalize_model_grads.py``.
# * ``optimizer/optimizer.py:473-485, 907, 1141`` ``found_inf`` / ``_scale`` / loss scale on CUDA.
# * ``optimizer/clip_grads.py:90-115`` grad-norm buffers; ``utils.py:1207``
#   ``local_multi_tensor_l2_norm`` returns its norm on CUDA (the no-Apex/TE fallback).
# * ``pipeline_parallel/schedules.py:596, 983, 2138`` token counter on CUDA;
#   ``pipeline_parallel/p2p_communication.py:190-321`` shape / receive buffers on
#   ``current_device()`` and ``torch.cuda.synchronize()`` (pipeline parallel over gloo).
# * ``transformer/moe/router.py:88-92`` ``TopKRouter.gating`` moves a CPU weight to
#   ``current_device()`` (a no-op on the proxy).
# * ``dist_checkpointing/strategies/{filesystem_async,async_utils,state_dict_saver}.py``,
#   ``dist_checkpointing/exchange_utils.py``: ``torch.cuda.synchronize()`` before writing, rank
#   liveness tensors and exchange buffers on CUDA.
#
# One function is replaced rather than proxied: ``clip_grad_by_total_norm_fp32``
# (``optimizer/clip_grads.py:167``) asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``; the
# twin here checks the dtype (fp32/bf16) instead and scales the grads in place the same way.
#: Megatron-Core modules whose module-global ``torch`` is replaced by the CPU proxy.
PROXIED_MODULES = (
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "modelopt.torch.opt.plugins.megatron",   # _modelopt_get_extra_state: torch.cuda.synchronize()
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "as_tensor")
_TRAINING_ACTIVE = False


def _cpu_device(kwargs: dict) -> dict:
    d = kwargs.get("device")
    if d is not None and (isinstance(d, int) or (isinstance(d, str) and d.startswith("cuda"))
                          or (isinstance(d, torch.device) and d.type == "cuda")):
        kwargs["device"] = "cpu"
    return kwargs


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: every operation is already ordered on a CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _cuda_namespace() -> types.ModuleType:
    ns = types.ModuleType("torch.cuda (int4_qat CPU proxy)")
    ns.__getattr__ = lambda name: getattr(torch.cuda, name)  # anything else: the real torch.cuda
    ns.current_device = lambda: "cpu"
    ns.is_available = lambda: False
    ns.device_count = lambda: 0
    ns.synchronize = lambda *a, **k: None
    ns.empty_cache = lambda *a, **k: None
    ns.memory_allocated = lambda *a, **k: 0
    ns.max_memory_allocated = lambda *a, **k: 0
    ns.Stream = _NoStream
    ns.default_stream = lambda *a, **k: _NoStream()
    ns.current_stream = lambda *a, **k: _NoStream()
    ns.stream = lambda *a, **k: contextlib.nullcontext()
    return ns


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by the proxied Megatron modules (see the module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cuda_namespace()
        for name in _FACTORIES:
            real = getattr(torch, name)
            setattr(self, name, (lambda f: lambda *a, **k: f(*a, **_cpu_device(k)))(real))

    def __getattr__(self, name):
        return getattr(torch, name)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # CPU twin of megatron/core/optimizer/clip_grads.py clip_grad_by_total_norm_fp32.
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is None:
            continue
        if g.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"clip_grad_by_total_norm_fp32: expected fp32/bf16 grads, got {g.dtype}")
        grads.append(to_local_if_dtensor(g).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def activate_training(*, force: bool = False) -> None:
    """Install the training-side shims too (idempotent); implies :func:`activate`."""
    global _TRAINING_ACTIVE
    if _TRAINING_ACTIVE:
        return
    if torch.cuda.is_available() and not force:
        raise RuntimeError("int4_qat.compat.cpu.activate_training() refused: a CUDA device is "
                           "available; GPU runs use Megatron's CUDA path (pass force=True to run "
                           "the CPU path anyway)")
    activate(force=force)
    proxy = _CpuTorch()
    for name in PROXIED_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    from megatron.core.optimizer import clip_grads, optimizer

    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _TRAINING_ACTIVE = True
