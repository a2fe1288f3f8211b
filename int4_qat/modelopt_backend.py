"""ModelOpt integration: the project's numerics as a ModelOpt quantization backend.

How fake quant reaches a weight
-------------------------------
``mtq.quantize`` swaps every supported linear for a "quant module" with an ``input_quantizer``,
a ``weight_quantizer`` and an ``output_quantizer`` (``TensorQuantizer``). In the forward, the
quant module passes its weight through ``weight_quantizer`` before the matmul. A quantizer whose
config names a ``backend`` calls the function registered under that name
(``modelopt/torch/quantization/nn/modules/tensor_quantizer.py``: ``TensorQuantizer._fake_quantize``
→ ``_QUANT_FUNCTIONAL_BACKENDS[backend](inputs, quantizer)``) and ``backend_extra_args`` reach it
as ``quantizer.backend_extra_args``. Our backend, :func:`fake_quant_backend`, reads
``{"format", "group_size", "scale_rule", "name"}`` from there and calls
``int4_qat.formats.<fmt>.fake_quantize``: no amax buffer, no calibrator, no CUDA extension.

Choices, and why
----------------
* ``block_sizes`` is **not** set in the quantizer config: with static ``block_sizes`` ModelOpt
  reshapes the weight to ``[-1, G]`` *before* calling the backend, which would hide ``[N, K]``
  from our numerics (and break NVFP4's per-tensor global scale). The group size travels in
  ``backend_extra_args`` instead, and the backend sees the weight exactly as the module holds it.
* ``num_bits`` is 4 for every format. ModelOpt skips ``num_bits`` validation for backend
  quantizers and the backend ignores it; 4 keeps ModelOpt's own bookkeeping (``maxbound``) sane.
* ``algorithm: None``: ``mtq.calibrate`` does nothing, so no ``_amax`` is collected or needed
  (``max`` calibration would run every weight through a MaxCalibrator for a number nobody uses).
* Input and output quantizers stay disabled: W4A16.
* NVFP4's per-matrix global scale under tensor parallelism: a TP-sharded weight (Column/Row
  parallel linears at TP > 1, experts at ETP > 1) must take its global scale from the amax of the
  *whole* matrix, which the exporter sees gathered (``int4_qat/formats/nvfp4.py``: "a shard must
  pass its TP-group max"). :func:`apply_scheme` tags such quantizers with
  ``backend_extra_args["tp_amax"] = "tp" | "etp"`` (which Megatron group splits the weight);
  :func:`_backend_entry`, the function registered with ModelOpt, max-reduces
  ``nvfp4.matrix_amax`` over that group and passes it as ``global_amax``. The group is looked up
  when the forward runs, so a model restored at another layout (export at TP 1) needs no change.
  The reduce is one asynchronous all-reduce of a scalar per weight per forward (no host sync);
  every rank of the group runs the same weights in the same order (SequentialMLP calls every
  local expert, even one with no tokens), so it cannot deadlock.
* The expert module is Megatron's ``SequentialMLP`` with our quant module
  (:mod:`int4_qat.modelopt_modules`: ModelOpt's refuses TP x EP; ours needs no amax sync).

Supported layouts (what the weight quantizer sees)
--------------------------------------------------
* Megatron-Core ``ColumnParallelLinear`` / ``RowParallelLinear`` (local spec; SequentialMLP
  experts, shared experts, attention, MLA projections): the local ``[N/TP, K]`` or
  ``[N, K/TP]`` shard. With expert-TP = 1 expert groups line up with the HF layout; a row-parallel
  shard must hold whole groups (K/TP divisible by the group) — the format raises otherwise.
* TE ``TEGroupedMLP`` (``TEColumnParallelGroupedLinear``): ModelOpt gives each local expert its
  own quantizer (``weight_quantizer.{i}`` applied to ``weight{i}``, 2-D ``[N, K]``). Needs
  Transformer-Engine, so it is exercised on GPU machines only.
* Legacy Megatron ``GroupedMLP`` (``weight1`` = ``[H, E·F]``, transposed and fused): ModelOpt has
  no quant module for it; :func:`apply_scheme` refuses it with a ValueError.
* HF ``nn.Linear`` experts, transformers-5 fused experts (``gate_up_proj_weight_quantizers.{e}``
  on the per-expert 2-D slice) and gpt-oss ``GptOssExperts`` (ModelOpt quantizes the 3-D
  ``[E, K, N]`` parameter transposed, so the backend sees ``[E, N, K]``).

Ours vs ModelOpt's built-in INT4 block quantizer (``INT4_BLOCKWISE_WEIGHT_ONLY_CFG``)
-----------------------------------------------------------------------------------
ModelOpt (CPU path, ``modelopt/torch/quantization/tensor_quant.py`` ``_tensor_quant``):
``w' = clamp(round(w * 7/amax), -8, 7) / (7/amax)`` in float32, cast to ``w.dtype``, with ``amax``
per group taken by *max calibration once* and then frozen. Ours (rule ``amax/7``):
``s = bf16(max(amax/7, 1e-5))`` from the live weight every forward,
``w' = bf16(clamp(round(w / s), -7, 7) * s)``. Measured on N(0, 0.02) weights, g128, 256x1024
(tests/test_modelopt_integration.py): identical when every group's amax is ``7 * 2^k``; otherwise
the scales differ by <= 2^-8 relative (bf16 rounding), ~0.3% of codes flip by exactly 1, values
with the same code differ by <= 2^-7 relative (84% of fp32 elements differ by that; 6% of bf16),
and no difference exceeds 1.03 quantization steps. After a weight update ModelOpt's stale amax
saturates the weight (and starts using the -8 level, ``-8/7 * amax``); ours follows the weight.
Both round half to even; both map an all-zero group to zeros.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any

import torch

from int4_qat.formats import QuantFormat, fused
from int4_qat.formats._common import straight_through

if TYPE_CHECKING:  # pragma: no cover
    from int4_qat.scheme import QuantScheme

__all__ = [
    "BACKEND_NAME",
    "apply_scheme",
    "build_modelopt_config",
    "enabled_weight_quantizers",
    "fake_quant_backend",
    "fake_quant_cache",
    "fake_quantized_weights",
    "register_backend",
]

BACKEND_NAME = "int4_qat"


def fake_quant_backend(inputs: torch.Tensor, quantizer, *, global_amax=None) -> torch.Tensor:
    """ModelOpt backend entry point: ``fn(inputs, quantizer) -> fake-quantized inputs``.

    ``global_amax`` (NVFP4 only): the TP-group max of ``matrix_amax``, see :func:`_backend_entry`."""
    args = quantizer.backend_extra_args or {}
    try:
        fmt = QuantFormat(args["format"])
        group_size = int(args["group_size"])
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"quantizer uses backend {BACKEND_NAME!r} but backend_extra_args={args!r} lack a "
            "valid 'format'/'group_size' (build the config with QuantScheme.modelopt_config())"
        ) from exc
    rule = {k: args[k] for k in ("scale_rule", "served") if args.get(k)}  # INT4 only
    if global_amax is not None:
        rule["global_amax"] = global_amax
    # fused kernels: the oracle's bits (int4_qat.formats.fused), the oracle where none exists
    return fused.fake_quantize(fmt, inputs, group_size, name=args.get("name", "weight"), **rule)


def _amax_group(kind: str | None):
    """The Megatron group a ``tp_amax`` tag names, or None when there is nothing to reduce."""
    if kind is None:
        return None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    if kind == "tp":
        group = ps.get_tensor_model_parallel_group()
    elif kind == "etp":
        group = ps.get_expert_tensor_parallel_group()
    else:
        raise ValueError(f"backend_extra_args tp_amax={kind!r}: expected 'tp' or 'etp'")
    return group if group is not None and group.size() > 1 else None


_STEP_CACHE: dict | None = None      # set inside fake_quant_cache(): id(quantizer) -> (key, weight)


@contextlib.contextmanager
def fake_quant_cache():
    """Reuse each weight's fake quant across the micro-batches of one step.

    Inside one call of Megatron's forward-backward schedule the weights do not change (the
    optimizer steps after it), so every micro-batch would recompute the same fake-quantized
    weight. Within this context the first computation of each weight quantizer is kept and later
    calls return it (a new tensor object on the same storage, behind the same straight-through
    node, so each micro-batch's graph is its own and the gradient still reaches the parameter).
    A hit also requires the same parameter storage, version counter, shape and dtype, so an
    in-place change of the weight inside the context recomputes. Memory: one fake-quantized copy
    of the local quantized weights for the duration of the step -- what autograd keeps for the
    backward anyway (and less than one copy per in-flight micro-batch under pipeline parallel).
    ``int4_qat.train.Trainer`` wraps each schedule call in it; outside it nothing is cached."""
    global _STEP_CACHE
    outer, _STEP_CACHE = _STEP_CACHE, {}
    try:
        yield
    finally:
        _STEP_CACHE = outer


def _backend_entry(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """What ModelOpt calls: :func:`fake_quant_backend` (once per weight and step inside
    :func:`fake_quant_cache`), given the TP-group ``global_amax`` for an NVFP4 weight tagged
    ``tp_amax`` (see "Choices" in the module docstring)."""
    cache = _STEP_CACHE
    if cache is None or not isinstance(inputs, torch.nn.Parameter):
        return _compute(inputs, quantizer)
    key = (inputs.data_ptr(), inputs._version, tuple(inputs.shape), inputs.dtype)
    hit = cache.get(id(quantizer))
    if hit is None or hit[0] != key:
        out = _compute(inputs, quantizer)
        cache[id(quantizer)] = (key, out.detach())
        return out
    kept = hit[1]
    return straight_through(inputs, lambda _w: kept.detach())


def _compute(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    group = _amax_group((quantizer.backend_extra_args or {}).get("tp_amax"))
    if group is None:
        return fake_quant_backend(inputs, quantizer)
    import torch.distributed as dist

    from int4_qat.formats.nvfp4 import matrix_amax

    amax = matrix_amax(inputs.detach())
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return fake_quant_backend(inputs, quantizer, global_amax=amax)


def register_backend() -> None:
    """Register our backend with ModelOpt under ``BACKEND_NAME`` and put our quant modules in
    ModelOpt's registry (:mod:`int4_qat.modelopt_modules`). Idempotent; call it before
    ``mtq.quantize`` and before restoring a ModelOpt state."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        _QUANT_FUNCTIONAL_BACKENDS,
        register_quant_backend,
    )

    from int4_qat import modelopt_modules

    if _QUANT_FUNCTIONAL_BACKENDS.get(BACKEND_NAME) is not _backend_entry:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overwriting existing backend" after a reload
            register_quant_backend(BACKEND_NAME, _backend_entry)
    try:
        import megatron.core  # noqa: F401
    except ImportError:  # pragma: no cover - HF-only use of the backend
        return
    modelopt_modules.install()


def _tp_amax_kind(owner: torch.nn.Module) -> str | None:
    """``"tp"`` / ``"etp"``: the Megatron group that splits ``owner``'s weight; None: not split
    (HF modules, TE ``duplicated`` linears). Local spec: Column/RowParallelLinear (experts on the
    expert-TP group); TE: ``parallel_mode`` column/row, grouped expert linears."""
    try:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:  # pragma: no cover
        return None
    mode = getattr(owner, "parallel_mode", "absent")
    if isinstance(owner, (ColumnParallelLinear, RowParallelLinear)) or mode in ("column", "row"):
        return "etp" if getattr(owner, "is_expert", False) else "tp"
    return None


def _quantizer_glob(weight_glob: str) -> str:
    # Fused 3-D expert parameters (HF "...mlp.experts.gate_up_proj") own a quantizer named
    # "<param>_weight_quantizer(s)" on the experts module; linears own "<module>.weight_quantizer".
    # ModelOpt normalises "weight_quantizers.3" / "weight_quantizer.3" (per-expert lists) to
    # "weight_quantizer" before matching (modelopt/torch/quantization/conversion.py).
    from int4_qat.scheme import HF_FUSED_EXPERT_GLOBS

    if weight_glob in HF_FUSED_EXPERT_GLOBS:
        return weight_glob + "_weight_quantizer"
    return weight_glob + ".weight_quantizer"


def build_modelopt_config(scheme: "QuantScheme") -> dict[str, Any]:
    """``{"quant_cfg": [...], "algorithm": None}`` for ``mtq.quantize``.

    Order matters (later entries win): disable everything, enable the scheme's weight globs
    (Megatron and HF names both, so one config serves either model), then re-disable the
    never-quantized globs so no enable pattern can reach a router, embedding, norm or head.
    """
    from int4_qat.scheme import NEVER_QUANTIZED_GLOBS

    attrs = {
        "num_bits": 4,
        "backend": BACKEND_NAME,
        "backend_extra_args": {
            "format": scheme.format.value,
            "group_size": scheme.group_size,
            **scheme.rule_kwargs,
        },
    }
    globs = scheme._enable_globs(hf=False) + scheme._enable_globs(hf=True)
    quant_cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    quant_cfg += [{"quantizer_name": _quantizer_glob(g), "cfg": dict(attrs)} for g in globs]
    quant_cfg += [{"quantizer_name": g, "enable": False} for g in NEVER_QUANTIZED_GLOBS]
    return {"quant_cfg": quant_cfg, "algorithm": None}


def enabled_weight_quantizers(model: torch.nn.Module) -> dict[str, Any]:
    """``{quantizer module name: TensorQuantizer}`` for every enabled weight quantizer."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, TensorQuantizer) and "weight_quantizer" in name and mod.is_enabled
    }


def _refuse_unsupported(scheme: "QuantScheme", model: torch.nn.Module) -> None:
    try:
        from megatron.core.transformer.moe.experts import GroupedMLP
    except ImportError:  # pragma: no cover - megatron is a hard requirement, but be tolerant
        return
    for name, mod in model.named_modules():
        if isinstance(mod, GroupedMLP) and scheme.quantizes_megatron(name + ".linear_fc1"):
            raise ValueError(
                f"{name}: legacy Megatron GroupedMLP (fused transposed weight1 [H, E*F]) cannot be "
                "fake-quantized per expert; build the model with moe_grouped_gemm=False "
                "(SequentialMLP) or with Transformer-Engine (TEGroupedMLP)"
            )


def _weight_name(quantizer_name: str) -> str:
    """Quantizer module name -> name of the weight it quantizes (the ``quantizes_*`` input)."""
    parent, _, last = quantizer_name.rpartition(".")
    if last.isdigit():  # per-expert list entry: TE grouped "weight_quantizer.3", HF "..._quantizers.3"
        base, _, _ = parent.rpartition(".")
        owner = parent.rpartition(".")[2]
        if owner == "weight_quantizer":  # TEGroupedLinear: weight{i}
            return f"{base}.weight{last}"
        return f"{base}.{owner.removesuffix('_weight_quantizers')}"
    if last == "weight_quantizer":
        return f"{parent}.weight"
    return f"{parent}.{last.removesuffix('_weight_quantizer')}"  # gpt-oss fused parameter


def apply_scheme(scheme: "QuantScheme", model: torch.nn.Module) -> torch.nn.Module:
    """``register_backend()`` + ``mtq.quantize(model, scheme.modelopt_config())`` + checks."""
    import modelopt.torch.quantization as mtq

    register_backend()
    _refuse_unsupported(scheme, model)
    if not any(scheme.quantizes_megatron(n) or scheme.quantizes_hf(n)
               for n, _ in model.named_parameters()):
        raise ValueError(
            f"{scheme.describe()}: no parameter of {type(model).__name__} is in scope (expected "
            "names like decoder.layers.N.mlp.experts.local_experts.E.linear_fc1.weight or "
            "model.layers.N.mlp.experts.E.gate_proj.weight; see the globs in int4_qat/scheme.py)"
        )
    model = mtq.quantize(model, scheme.modelopt_config(), forward_loop=None)
    for qname, quantizer in enabled_weight_quantizers(model).items():
        wname = _weight_name(qname)
        if not (scheme.quantizes_megatron(wname) or scheme.quantizes_hf(wname)):
            raise RuntimeError(
                f"ModelOpt enabled {qname} but {scheme.describe()} does not quantize {wname}; "
                "the glob lists in int4_qat/scheme.py and the quant_cfg disagree"
            )
        # Give each quantizer its own args dict carrying the weight's name, so a format error
        # (non-finite value, K not divisible by the group) names the tensor; NVFP4 weights split
        # over a TP group say which group shares their global scale.
        extra = {"name": wname}
        if scheme.format is QuantFormat.NVFP4:
            kind = _tp_amax_kind(model.get_submodule(wname.rpartition(".")[0]))
            if kind is not None:
                extra["tp_amax"] = kind
        quantizer.backend_extra_args = {**quantizer.backend_extra_args, **extra}
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, mod in model.named_modules():  # ...and the other direction: claimed => enabled
        wq = getattr(mod, "weight_quantizer", None)
        if isinstance(wq, TensorQuantizer) and not wq.is_enabled and (
            scheme.quantizes_megatron(name) or scheme.quantizes_hf(name)
        ):
            raise RuntimeError(
                f"{scheme.describe()} quantizes {name} but its ModelOpt weight quantizer is "
                "disabled; the glob lists in int4_qat/scheme.py and the quant_cfg disagree"
            )
    from int4_qat.modelopt_modules import check_no_amax_in_experts

    check_no_amax_in_experts(model, BACKEND_NAME)
    return model


@torch.no_grad()
def fake_quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The exact fake-quantized weights the quantized ``model`` computes with, by weight name.

    Keys are parameter names as in ``model.named_parameters()`` (e.g.
    ``decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight``, TE grouped
    ``...linear_fc1.weight3``, HF fused ``...mlp.experts.gate_up_proj``); values have the
    parameter's own shape and dtype and are produced by the module's own weight quantizer, so they
    are what the forward used. Only weights with an enabled weight quantizer are returned.
    """
    out: dict[str, torch.Tensor] = {}
    for qname, quantizer in enabled_weight_quantizers(model).items():
        wname = _weight_name(qname)
        owner_name, _, attr = wname.rpartition(".")
        owner = model.get_submodule(owner_name)
        parent_q = qname.rpartition(".")[0]
        if attr.startswith("weight") and attr != "weight":  # TE grouped weight{i}
            out[wname] = quantizer(getattr(owner, attr)).detach()
        elif attr == "weight":
            out[wname] = quantizer(owner.weight).detach()
        elif parent_q.endswith("_weight_quantizers"):  # HF fused: one quantizer per expert
            e = int(qname.rpartition(".")[2])
            piece = quantizer(owner._parameters[attr][e]).detach()
            full = out.setdefault(wname, torch.empty_like(owner._parameters[attr]))
            full[e] = piece
        else:  # gpt-oss: [E, K, N] parameter quantized transposed
            w = owner._parameters[attr]
            out[wname] = quantizer(w.transpose(-1, -2).contiguous()).transpose(-1, -2).detach()
    return out
