"""Two ModelOpt post-training baselines that run on a CPU, for the demo's comparison table.

* **INT4 AWQ** (``mtq.INT4_AWQ_CFG``, method ``awq_lite``): per-input-channel smoothing scales
  ``s`` searched on calibration activations (here: training text), weights quantized as
  ``Q(W · diag(s))`` in groups of 128 along in_features, activations multiplied by ``1/s`` (ModelOpt's
  ``pre_quant_scale`` on each Linear's input quantizer). It runs on CPU in ModelOpt 0.47 (INT4 has a
  pure-torch fake-quant path). It is evaluated on the *training side only*: for a routed expert the
  ``1/s`` lives on the expert's input, which is the shared post-attention RMSNorm output that the
  router and every other expert also read -- it cannot be folded into the norm weight per expert,
  so an AWQ'd MoE is not expressible as a plain W4A16 ``pack-quantized`` checkpoint without an
  activation-scale tensor that the serving kernels do not apply.
* **FP8 E4M3 weight-only, per output channel** (``num_bits=(4, 3)``, ``axis=0``, max calibration =
  the channel's amax / 448): the common serving baseline. ModelOpt's FP8 fake quant runs on CPU
  (pure-torch fallback, no CUDA extension needed), so that is what is used; no compressed-tensors
  FP8 export is written (``tools/export.py`` packs the 4-bit formats only), hence training-side.

Both quantize the same weights as the demo's scheme scope (routed experts by default): the globs
come from :mod:`int4_qat.scheme` (``MEGATRON_EXPERT_GLOBS`` / ``MEGATRON_NON_EXPERT_GLOBS``), so the
comparison is like for like.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

__all__ = ["scope_quantizer_globs", "awq_int4", "fp8_weight_only", "enabled_weight_quantizers"]


def scope_quantizer_globs(scope: str) -> list[str]:
    """ModelOpt weight-quantizer name globs for the scheme scope ``experts`` / ``all-linear``."""
    from int4_qat.scheme import MEGATRON_EXPERT_GLOBS, MEGATRON_NON_EXPERT_GLOBS

    if scope not in ("experts", "all-linear"):
        raise ValueError(f"scope {scope!r}: choose experts or all-linear")
    globs = list(MEGATRON_EXPERT_GLOBS)
    if scope == "all-linear":
        globs += list(MEGATRON_NON_EXPERT_GLOBS)
    return [g + ".weight_quantizer" for g in globs]


def _quant_cfg(weight_cfg: dict, scope: str, algorithm) -> dict:
    # ModelOpt 0.47 list-form quant_cfg: later entries win; everything else stays disabled, so the
    # router, embeddings, norms and output layer are never touched.
    entries = [{"quantizer_name": "*", "enable": False}]
    entries += [{"quantizer_name": g, "cfg": copy.deepcopy(weight_cfg), "enable": True}
                for g in scope_quantizer_globs(scope)]
    return {"quant_cfg": entries, "algorithm": algorithm}


def enabled_weight_quantizers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if n.endswith("weight_quantizer") and getattr(m, "is_enabled", False)]


def _forward_loop(batches: Iterable[torch.Tensor]) -> Callable[[torch.nn.Module], None]:
    from int4_qat.compat.cpu import causal_attention_mask

    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of token ids")

    @torch.no_grad()
    def loop(model):
        for tokens in batches:
            b, s = tokens.shape
            pos = torch.arange(s).unsqueeze(0).expand(b, s)
            model(tokens, pos, causal_attention_mask(s))
    return loop


def awq_int4(model: torch.nn.Module, calib: Iterable[torch.Tensor], *, scope: str = "experts",
             group_size: int = 128) -> torch.nn.Module:
    """ModelOpt INT4 AWQ-lite (``INT4_AWQ_CFG``'s weight config and algorithm), restricted to
    ``scope``, calibrated by running ``calib`` token batches through the Megatron ``model``."""
    import modelopt.torch.quantization as mtq

    base = mtq.INT4_AWQ_CFG
    wcfg = next(e["cfg"] for e in base["quant_cfg"]
                if isinstance(e, dict) and e.get("quantizer_name") == "*weight_quantizer")
    wcfg = {**copy.deepcopy(wcfg), "block_sizes": {-1: group_size, "type": "static"}}
    cfg = _quant_cfg(wcfg, scope, copy.deepcopy(base["algorithm"]))
    model = mtq.quantize(model, cfg, _forward_loop(calib))
    if not enabled_weight_quantizers(model):
        raise RuntimeError("awq_int4: ModelOpt enabled no weight quantizer (scope globs matched nothing)")
    return model


def fp8_weight_only(model: torch.nn.Module, calib: Iterable[torch.Tensor], *,
                    scope: str = "experts") -> torch.nn.Module:
    """ModelOpt FP8 E4M3 per-output-channel weight-only fake quant (max calibration)."""
    import modelopt.torch.quantization as mtq

    cfg = _quant_cfg({"num_bits": (4, 3), "axis": 0}, scope, "max")
    model = mtq.quantize(model, cfg, _forward_loop(calib))
    if not enabled_weight_quantizers(model):
        raise RuntimeError("fp8_weight_only: ModelOpt enabled no weight quantizer")
    return model
