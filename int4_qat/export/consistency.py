"""Train–infer consistency: does the served export compute what training computed?

RL and QAT pipelines measure this on the *same* tokens: the training side (Megatron-Core with
ModelOpt fake quant) and the serving side (the exported checkpoint as a consumer loads it) each
give next-token log-probabilities; we report

- ``mean_abs_dlogprob`` / ``max_abs_dlogprob``: |log p_train(x_{t+1}) − log p_serve(x_{t+1})|
  over every position (the SGLang RL blog's "train–rollout |Δ logprob|"; BF16 ≈ 0.018 and INT4
  QAT ≈ 0.019 on Qwen3-30B-A3B there, where the serving engine's kernels differ);
- ``kl_mean`` / ``kl_max``: KL(p_train ‖ p_serve) over the vocabulary, per position, in nats;
- ``top1_agree``: fraction of positions whose argmax agrees.

With one scheme driving both fake quant and export, the weights are identical, so on CPU in fp32
the numbers are ~1e-6 (summation order only); a scheme mismatch (e.g. amax/7 vs amax/7.5, fp32 vs
bf16 scale) shows up here immediately.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["ConsistencyReport", "compare_logits", "megatron_logits", "export_logits", "train_infer_consistency"]


@dataclass(frozen=True)
class ConsistencyReport:
    mean_abs_dlogprob: float
    max_abs_dlogprob: float
    kl_mean: float
    kl_max: float
    top1_agree: float
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"|Δ logprob| mean {self.mean_abs_dlogprob:.3g} max {self.max_abs_dlogprob:.3g}, "
                f"KL mean {self.kl_mean:.3g} max {self.kl_max:.3g}, top-1 agree {self.top1_agree:.3f} "
                f"({self.positions} positions)")


def compare_logits(train_logits: torch.Tensor, serve_logits: torch.Tensor, tokens: torch.Tensor) -> ConsistencyReport:
    """Compare ``[B, S, V]`` logits of the two sides on ``tokens [B, S]`` (targets = tokens shifted)."""
    if train_logits.shape != serve_logits.shape:
        raise ValueError(f"logit shapes differ: train {tuple(train_logits.shape)} vs serve {tuple(serve_logits.shape)}")
    if train_logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(train_logits.shape)} do not match tokens {tuple(tokens.shape)}")
    lp_t = F.log_softmax(train_logits[:, :-1].double(), -1)
    lp_s = F.log_softmax(serve_logits[:, :-1].double(), -1)
    tgt = tokens[:, 1:].unsqueeze(-1)
    d = (lp_t.gather(-1, tgt) - lp_s.gather(-1, tgt)).abs()
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1).clamp_min(0)
    agree = (lp_t.argmax(-1) == lp_s.argmax(-1)).double()
    return ConsistencyReport(float(d.mean()), float(d.max()), float(kl.mean()), float(kl.max()),
                             float(agree.mean()), int(d.numel()))


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Training-side logits ``[B, S, V]`` of a Megatron-Core ``GPTModel`` (TP=PP=1), as training
    runs it: explicit boolean causal mask (int4_qat.compat.cpu), fake quant active."""
    from int4_qat.compat.cpu import causal_attention_mask

    b, s = tokens.shape
    pos = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    was = model.training
    model.eval()
    try:
        out = model(tokens, pos, causal_attention_mask(s))
    finally:
        model.train(was)
    if out.shape[:2] != (b, s):
        out = out.transpose(0, 1)
    return out.float()


@torch.no_grad()
def export_logits(export_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Serving-side logits: transformers loads the export (dequantizing on CPU), fp32 compute."""
    from int4_qat.export.verify import _restore_nvfp4_experts, load_export_model

    model = load_export_model(export_dir, dtype=torch.float32)
    _restore_nvfp4_experts(model, export_dir)
    return model(input_ids=tokens).logits.float()


def train_infer_consistency(model, export_dir: str, tokens: torch.Tensor) -> ConsistencyReport:
    """Megatron model with fake quant vs the exported dir, on the same ``tokens [B, S]``."""
    return compare_logits(megatron_logits(model, tokens), export_logits(export_dir, tokens), tokens)
