"""Our ModelOpt quant modules for the Megatron-Core modules whose stock quant module is wrong for us.

``mtq.quantize`` swaps every Megatron module type registered in ModelOpt's ``QuantModuleRegistry``
for its "quant module" (modelopt/torch/quantization/plugins/megatron.py). Two of ModelOpt 0.47's
stock entries break the recipes' layouts; :func:`install` (called by
``int4_qat.modelopt_backend.register_backend``, so by ``QuantScheme.apply`` and before any
ModelOpt restore) replaces them, under the *same registry keys*, so a saved ``modelopt_state``
restores into ours and old checkpoints keep their key layout.

The expert module: :class:`QuantSequentialMLP`
-----------------------------------------------
ModelOpt's ``_MegatronSequentialMLP._setup`` raises ``"TP+EP is not supported by
QuantSequentialMLP"`` whenever ``tensor_model_parallel_size > 1`` and
``expert_model_parallel_size > 1`` -- every GPU recipe here (TP 4-8 x EP 8-64). The refusal guards
ModelOpt's *calibration*: a static ``_amax`` per quantizer that ``max_calibrate`` must sync over
expert-TP / EP / expert-DP, and amax buffers whose sharded-state replica ids are only right at
TP = 1. Our quantizers have no amax: the backend (``int4_qat.modelopt_backend``) recomputes every
scale from the live weight in each forward, and the config has ``algorithm: None`` (no
calibration). With nothing to sync, TP x EP needs no special handling, and ours is ModelOpt's
class minus the refusal, plus a check at ``apply`` time that every enabled quantizer inside it
really is ours (an amax-calibrated quantizer would need the sync ModelOpt refused to do).

What a SequentialMLP's experts are, per rank: ``local_experts.{i}`` (global expert
``ep_rank * E_local + i``), each an ``MLP`` of a ``ColumnParallelLinear`` fc1 ``[2I/ETP, H]`` and a
``RowParallelLinear`` fc2 ``[H, I/ETP]`` on the expert-TP group (ETP = 1: whole experts). The
checkpoint keys this module writes (Megatron ``SequentialMLP.sharded_state_dict`` with ModelOpt's
``singleton_local_shards``), unchanged from ModelOpt's class:
``decoder.layers.{L}.mlp.experts.experts.{e}.linear_fc1.weight_w`` / ``..._v`` (gate / up halves,
``[I, H]`` each), ``...experts.experts.{e}.linear_fc2.weight`` (``[H, I]``), plus a
``_extra_state`` object per linear. (A *BF16* model, not converted by ModelOpt, stacks all experts
into ``...mlp.experts.experts.linear_fc1.weight`` ``[E, 2I, H]``.)

gpt-oss sinks: :func:`sink_aware_sharded_state_dict`
----------------------------------------------------
ModelOpt's ``_QuantTEDotProductAttention.sharded_state_dict`` builds every tensor with an empty
TP-axis map, overriding Megatron's ``TEDotProductAttention.sharded_state_dict``
(``{'softmax_offset': 0}``, extensions/transformer_engine.py). At TP > 1 the learnable
``softmax_offset`` (gpt-oss attention sinks, one per head, heads split over TP) would be saved as a
replicated tensor -- only TP rank 0's slice -- and every rank would load that slice. Ours keeps
ModelOpt's quantizer entries and takes the module's own parameters from Megatron's method. Needs
Transformer-Engine, so the class exists only where TE imports; the merge itself
(:func:`sink_aware_sharded_state_dict`) is plain code, tested on CPU with the local spec's
``LocalCoreAttention`` (same ``{'softmax_offset': 0}`` map) at TP 2.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["install", "installed", "QuantSequentialMLP", "sink_aware_sharded_state_dict",
           "check_no_amax_in_experts"]

_INSTALLED = False


def sink_aware_sharded_state_dict(quant_sd: dict, own_sd: dict) -> dict:
    """ModelOpt's sharded state of a quant module (``quant_sd``, every tensor replicated) with the
    module's own parameters taken from Megatron's method (``own_sd``, TP-sharded as the module
    defines). Keys are the same; ``own_sd`` wins."""
    out = dict(quant_sd)
    out.update(own_sd)
    return out


def _stock_classes():
    import modelopt.torch.quantization.plugins.megatron as mo_megatron  # registers ModelOpt's

    return mo_megatron


def _make_sequential_mlp_cls():
    mo = _stock_classes()

    class QuantSequentialMLP(mo._MegatronSequentialMLP):
        """ModelOpt's SequentialMLP quant module without the TP+EP refusal (see module docstring)."""

        def _setup(self):
            from megatron.core import parallel_state as ps
            from modelopt.torch.utils.distributed import ParallelState

            if not hasattr(self, "parallel_state") or self.parallel_state is None:
                self.parallel_state = ParallelState(
                    ps.get_expert_data_parallel_group(),
                    tensor_parallel_group=ps.get_expert_tensor_parallel_group(),
                    expert_model_parallel_group=ps.get_expert_model_parallel_group(),
                )
            for expert in self.local_experts:       # as ModelOpt's _setup: the experts' linears
                expert.linear_fc1._parallel_state = self.parallel_state   # run on the expert groups
                expert.linear_fc2._parallel_state = self.parallel_state

    return QuantSequentialMLP


QuantSequentialMLP: Any = None   # the class, once install() ran (needs ModelOpt + Megatron)


def _replace(registry, nn_cls, key: str, dm_cls) -> None:
    if issubclass(registry[nn_cls], dm_cls):
        return
    registry.unregister(nn_cls)
    registry.register({nn_cls: key})(dm_cls)


def install() -> None:
    """Put our quant modules into ModelOpt's registry (idempotent; before ``mtq.quantize`` or a
    ModelOpt restore)."""
    global _INSTALLED, QuantSequentialMLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    mo = _stock_classes()
    if QuantSequentialMLP is None:
        QuantSequentialMLP = _make_sequential_mlp_cls()
    _replace(QuantModuleRegistry, SequentialMLP, "megatron_moe_SequentialMLP", QuantSequentialMLP)
    if getattr(mo, "HAS_TE", False):                        # pragma: no cover - needs TE (GPU)
        _replace(QuantModuleRegistry, mo.TEDotProductAttention, "TEDotProductAttention",
                 _make_te_attention_cls(mo))
    _INSTALLED = True


def installed() -> bool:
    return _INSTALLED


_TE_ATTENTION_CLS: Any = None


def _make_te_attention_cls(mo) -> type:                     # pragma: no cover - needs TE (GPU)
    global _TE_ATTENTION_CLS
    if _TE_ATTENTION_CLS is not None:
        return _TE_ATTENTION_CLS
    base: Callable = mo.TEDotProductAttention.sharded_state_dict

    class QuantTEDotProductAttention(mo._QuantTEDotProductAttention):
        """ModelOpt's TE attention quant module with Megatron's TP sharding of ``softmax_offset``."""

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            from modelopt.torch.opt.plugins.megatron import ensure_metadata_has_dp_cp_group

            metadata = ensure_metadata_has_dp_cp_group(metadata)
            quant_sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            return sink_aware_sharded_state_dict(quant_sd, base(self, prefix, sharded_offsets, metadata))

    _TE_ATTENTION_CLS = QuantTEDotProductAttention
    return _TE_ATTENTION_CLS


def check_no_amax_in_experts(model, backend_name: str) -> None:
    """Every enabled quantizer inside a SequentialMLP must be our backend's (no calibrated amax):
    that is what makes :class:`QuantSequentialMLP` correct under TP x EP (``RuntimeError``)."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, mod in model.named_modules():
        if not isinstance(mod, SequentialMLP):
            continue
        for qname, q in mod.named_modules():
            if isinstance(q, TensorQuantizer) and q.is_enabled and (
                    getattr(q, "backend", None) != backend_name or hasattr(q, "_amax")):
                raise RuntimeError(
                    f"{name}.{qname}: an enabled quantizer that is not int4_qat's backend (or holds "
                    "a calibrated amax) inside a SequentialMLP; our quant module does no amax sync "
                    "across expert-TP / EP, so only QuantScheme's recompute-every-forward "
                    "quantizers may run there")
