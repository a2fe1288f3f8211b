"""Held-out evaluation of both sides of the pipeline on the *same* tokens.

* the **training side**: a Megatron-Core ``GPTModel`` on CPU (with ModelOpt fake quant when the
  model was quantized), run exactly as training runs it -- ``model(tokens, position_ids,
  attention_mask)`` with an explicit boolean causal mask (``int4_qat.compat.cpu``);
* the **serving side**: the exported checkpoint reloaded from disk by transformers
  (``AutoModelForCausalLM.from_pretrained``; compressed-tensors decompresses the packed weights).

compressed-tensors decompresses the packed experts into bf16 parameters (the served weight is a bf16
value, see int4_qat/formats), while the rest of an fp32 checkpoint loads in fp32. The reloaded model
is upcast with ``.float()`` before evaluation: the *values* are unchanged (a bf16 value is exact in
fp32), and both sides then compute in fp32, so a difference in loss measures the checkpoint, not
bf16 activations (the demo separately runs the export in bf16 to show that effect).

Loss = mean next-token cross entropy (nats) over every eval token. The train-infer mismatch uses
the exporter's own metric (``int4_qat.export.consistency.compare_logits``) on both sides' logits.

**Extra evaluators** (the seam for further consumers of the exports; llama.cpp serving a GGUF
conversion is one: :mod:`int4_qat.demo.llama_cpp`): an object with a ``name`` (its table
column), ``accepts(format, method)`` and ``window_losses(export_dir, evalset) -> [n]`` per-window
mean next-token losses (nats) on the same eval windows; ``export_dir`` is what transformers
reloads (the compressed-tensors export, or the HF checkpoint of a BF16 row).
:func:`int4_qat.demo.run_demo` takes a list of them; each result lands in ``Row.extra[name]`` and
the report adds a ``<name> loss`` / ``<name> Δ [95% CI]`` column pair, the Δ paired against the
same evaluator's loss on the BF16 reference row (when it accepts it). Two optional hooks:
``check(model_config: dict)`` runs before any training (raise ``ValueError`` to refuse a model
the evaluator cannot run), ``section(rows) -> report.ExtraSection | None`` after the last row
(its own part of ``summary.md`` / ``summary.json`` / the terminal, e.g. a benchmark).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "EvalSet",
    "ExtraEvaluator",
    "LogitStats",
    "megatron_logits",
    "served_logits",
    "load_served_model",
    "logit_stats",
    "mismatch",
]


@dataclass(frozen=True)
class EvalSet:
    """Held-out ``tokens`` / ``labels`` ``[n, seq]`` int64 (from ``int4_qat.data``), evaluated in
    micro-batches of ``batch`` samples."""

    tokens: torch.Tensor
    labels: torch.Tensor
    batch: int = 8

    def __post_init__(self) -> None:
        if self.tokens.shape != self.labels.shape or self.tokens.dim() != 2:
            raise ValueError(f"EvalSet: tokens {tuple(self.tokens.shape)} and labels "
                             f"{tuple(self.labels.shape)} must be equal [n, seq] shapes")
        if self.batch < 1:
            raise ValueError(f"EvalSet: batch must be >= 1, got {self.batch}")

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()

    def head(self, n: int) -> "EvalSet":
        """The first ``n`` windows (all of them when ``n`` is larger)."""
        return EvalSet(self.tokens[:n], self.labels[:n], self.batch)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.tokens.shape[0], self.batch):
            yield self.tokens[i:i + self.batch], self.labels[i:i + self.batch]


@dataclass(frozen=True)
class LogitStats:
    """Logits ``[n, seq, V]`` (fp32) of one side and the targets' log-probs ``[n, seq]``."""

    logits: torch.Tensor
    target_logprobs: torch.Tensor

    @property
    def loss(self) -> float:
        return float(-self.target_logprobs.double().mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def head(self, n: int) -> "LogitStats":
        """The first ``n`` windows (matches :meth:`EvalSet.head`)."""
        return LogitStats(self.logits[:n], self.target_logprobs[:n])


class ExtraEvaluator(Protocol):
    """A further evaluator of the exported checkpoints, shown as its own column (module docstring)."""

    name: str

    def accepts(self, fmt: str, method: str) -> bool:
        """Whether this evaluator runs on the export of row ``(fmt, method)`` (``fmt`` is ``bf16``
        for the unquantized HF checkpoints)."""
        ...

    def window_losses(self, export_dir: Path, evalset: EvalSet) -> torch.Tensor:
        """Per-window mean next-token loss ``[n]`` in nats on ``evalset`` (same order)."""
        ...

    # optional (the pipeline calls them when present; module docstring):
    # def check(self, model_config: dict) -> None
    # def section(self, rows: list[Row]) -> ExtraSection | None


def logit_stats(logits: torch.Tensor, labels: torch.Tensor) -> LogitStats:
    """Keep the logits; the targets' log-probs from an fp32 log-softmax."""
    lp = F.log_softmax(logits.float(), dim=-1)
    return LogitStats(logits.float(), lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1))


def megatron_logits(model, evalset: EvalSet) -> LogitStats:
    """Training-side forward of a Megatron ``GPTModel`` (TP=PP=1 on CPU) over the eval set, run as
    training runs it (``int4_qat.export.consistency.megatron_logits``: explicit causal mask, fake
    quant active)."""
    from int4_qat.export.consistency import megatron_logits as one_batch

    outs = [one_batch(model, tokens) for tokens, _ in evalset.batches()]
    return logit_stats(torch.cat(outs), evalset.labels)


def load_served_model(export_dir, *, upcast: bool = True) -> tuple[Any, str]:
    """The exported checkpoint as a consumer loads it -> ``(model, note)``.

    Uses the exporter's own loader (``int4_qat.export.verify.load_export_model``: transformers
    ``AutoModelForCausalLM`` with compressed-tensors dequantizing on CPU). For NVFP4 MoE experts
    transformers 5.24 drops ``weight_global_scale`` on load; the exporter's workaround rebuilds those
    stacks with compressed-tensors' own ``decompress`` and ``note`` says so. ``upcast`` → fp32.
    """
    from int4_qat.export import verify as V

    export_dir = str(export_dir)
    with open(os.path.join(export_dir, "config.json")) as f:
        quantized = "quantization_config" in json.load(f)
    note = ""
    if quantized:
        model = V.load_export_model(export_dir, dtype=torch.float32)
        restore = getattr(V, "_restore_nvfp4_experts", None)
        if restore is not None and restore(model, export_dir):
            note = ("transformers 5.24 drops NVFP4 MoE weight_global_scale on load; experts "
                    "rebuilt with compressed-tensors decompress (int4_qat.export.verify)")
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    if upcast:
        model = model.float()
    return model.eval(), note


@torch.no_grad()
def served_logits(model, evalset: EvalSet) -> LogitStats:
    """Serving-side forward of a transformers causal LM over the eval set."""
    outs = [model(input_ids=tokens).logits.float() for tokens, _ in evalset.batches()]
    return logit_stats(torch.cat(outs), evalset.labels)


def mismatch(train: LogitStats, served: LogitStats, evalset: EvalSet, chunk: int = 64) -> dict[str, float]:
    """Train-infer mismatch on the eval tokens, by the exporter's own metric
    (``int4_qat.export.consistency.compare_logits``: mean / max |Δ logprob| of the next token,
    mean KL(train || served) over the vocabulary, in nats), ``chunk`` windows at a time (it works
    in float64 on ``[n, seq, V]``: chunks bound the memory) and combined token-weighted."""
    from int4_qat.export.consistency import compare_logits

    n = evalset.tokens.shape[0]
    if train.logits.shape[0] != n or served.logits.shape[0] != n:
        raise ValueError(f"mismatch: logits of {train.logits.shape[0]} / {served.logits.shape[0]} "
                         f"windows for an eval set of {n}")
    reps = [compare_logits(train.logits[i:i + chunk], served.logits[i:i + chunk],
                           evalset.tokens[i:i + chunk]) for i in range(0, n, chunk)]
    total = sum(r.positions for r in reps)
    return {"mean_abs_dlogprob": sum(r.mean_abs_dlogprob * r.positions for r in reps) / total,
            "max_abs_dlogprob": max(r.max_abs_dlogprob for r in reps),
            "kl": sum(r.kl_mean * r.positions for r in reps) / total}
