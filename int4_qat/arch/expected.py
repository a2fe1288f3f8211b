"""What an architecture's HF checkpoint must hold: every tensor name and shape its config implies.

Derived from the architecture's one name table (each :class:`~int4_qat.arch.base.Rule` names the
Megatron tensor, its HF tensors, the layers it lives in and the full Megatron shape as a function
of the model's sizes), so there is no second list of names to drift: the HF shapes are what the
rule's own ``to_hf`` converter makes of a tensor of that shape (evaluated on the ``meta`` device,
no memory). Used to check inputs *before* anything is written or trained:

* ``tools/export.py`` / ``tools/verify_export.py``: an HF checkpoint missing an expert, holding an
  expert beyond ``num_experts``, a tensor of the wrong shape or a non-float weight is refused,
  naming the tensor;
* the streaming reader of training checkpoints: the checkpoint's tensors against its config.json.

Optional tensors (present or not, never required): the architecture's ``ignore_hf`` patterns
(a tied ``lm_head``, DeepSeek's multi-token-prediction extras) and decoder-layer tensors of the
``num_nextn_predict_layers`` MTP layers after the last decoder layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from int4_qat.arch.base import Arch, Rule

__all__ = ["ExpectedTensors", "expected_hf_tensors", "rule_layers"]


def rule_layers(rule: Rule, arch: Arch) -> list:
    """Global decoder-layer indices that hold ``rule``'s tensor ([None] for non-layer tensors)."""
    if not rule.is_layer:
        return [None]
    moe = arch.shape.moe_layers
    if rule.layers == "moe":
        return [i for i, m in enumerate(moe) if m]
    if rule.layers == "dense":
        return [i for i, m in enumerate(moe) if not m]
    return list(range(arch.shape.layers))


def _hf_shapes(rule: Rule, arch: Arch) -> list[tuple[int, ...]]:
    if rule.shape is None:
        raise ValueError(f"{arch.model_type}: Rule {rule.mcore[0]} has no shape (add shape= to the "
                         f"rule in int4_qat/arch/{arch.definition.model_type}.py)")
    full = torch.empty(rule.shape(arch.shape), device="meta")
    return [tuple(t.shape) for t in rule.separate(arch, full)]


@dataclass
class ExpectedTensors:
    """``required``: HF name -> shape. ``optional``: patterns of names that may also be present."""
    required: dict[str, tuple[int, ...]]
    optional: list[re.Pattern] = field(default_factory=list)

    def is_optional(self, name: str) -> bool:
        return any(p.match(name) for p in self.optional)

    def problems(self, present: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], where: str,
                 limit: int = 8) -> list[str]:
        """One line per problem (missing, unexpected, wrong shape, non-float) of the tensor set
        ``present`` (name -> (dtype, shape)); at most ``limit`` lines per kind, then a count."""
        out: list[str] = []

        def report(kind: str, lines: list[str]) -> None:
            out.extend(lines[:limit])
            if len(lines) > limit:
                out.append(f"{where}: ... and {len(lines) - limit} more {kind}")

        missing = [n for n in self.required if n not in present]
        report("missing tensors", [f"{where}: tensor {n} {list(self.required[n])} is missing (the "
                                   f"config.json implies it)" for n in missing])
        extra = [n for n in present if n not in self.required and not self.is_optional(n)]
        report("unexpected tensors", [f"{where}: tensor {n} {list(present[n][1])} is not part of "
                                      f"this architecture's config (beyond num_experts / "
                                      f"num_hidden_layers, or a foreign name)" for n in sorted(extra)])
        bad_shape, bad_dtype = [], []
        for n, want in self.required.items():
            if n not in present:
                continue
            dtype, shape = present[n]
            if tuple(shape) != tuple(want):
                bad_shape.append(f"{where}: tensor {n} has shape {list(shape)}, the config.json "
                                 f"implies {list(want)}")
            if not dtype.is_floating_point:
                bad_dtype.append(f"{where}: tensor {n} has dtype {str(dtype).replace('torch.', '')}; "
                                 f"weights must be floating point (bf16/fp16/fp32)")
        report("shape mismatches", bad_shape)
        report("non-float tensors", bad_dtype)
        return out


def expected_hf_tensors(arch: Arch) -> ExpectedTensors:
    """Every HF tensor (name -> shape) that ``arch``'s config implies, from its Rule table."""
    required: dict[str, tuple[int, ...]] = {}
    s = arch.shape
    for rule in arch.rules():
        if not rule.export:           # e.g. a tied lm_head: the HF name is the embedding's own
            continue
        shapes = _hf_shapes(rule, arch)
        experts: Iterable = range(s.num_experts) if rule.is_expert else [None]
        for layer in rule_layers(rule, arch):
            if rule.stacked:
                for name, shp in zip(rule.hf_names(layer, None), shapes, strict=True):
                    required[name] = (s.num_experts, *shp)
                continue
            for expert in experts:
                for name, shp in zip(rule.hf_names(layer, expert), shapes, strict=True):
                    required[name] = shp
    optional = [re.compile(p) for p in arch.definition.ignore_hf]
    if s.extra_layers:
        idx = "|".join(str(s.layers + i) for i in range(s.extra_layers))
        optional.append(re.compile(rf"^model\.layers\.(?:{idx})\."))
    return ExpectedTensors(required, optional)
