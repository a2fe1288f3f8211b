"""``make demo``: the whole pipeline on one CPU in minutes.

BF16 training of a tiny Qwen3-MoE on Megatron-Core (CPU) → PTQ vs QAT for INT4 g32 / g128, MXFP4,
NVFP4 (+ ModelOpt INT4 AWQ and FP8 baselines) → export to compressed-tensors → independent reload
with transformers → held-out loss, train-infer mismatch; the BF16 / INT4 g32 / MXFP4 exports also
as GGUF run by llama.cpp (loss column, tokens/s table) → ``summary.md`` / ``summary.json`` / plots.

Modules: :mod:`.config` (:class:`DemoConfig`, model config, recipes), :mod:`.pipeline` (stages,
:func:`run_demo`), :mod:`.evaluate` (both sides on the same tokens; the extra-evaluator seam),
:mod:`.baselines` (ModelOpt AWQ / FP8 on CPU), :mod:`.stats` (paired bootstrap intervals),
:mod:`.compare` (which row against which, significance wording), :mod:`.report` (table and plots),
:mod:`.llama_cpp` (the llama.cpp column and tokens/s table).
Entry point: ``tools/demo.py`` (``make demo DEMO_ARGS="--steps 2400"``).
"""
from int4_qat.demo.config import VARIANTS, DemoConfig, ci_config
from int4_qat.demo.pipeline import DemoResult, run_demo

__all__ = ["VARIANTS", "DemoConfig", "DemoResult", "ci_config", "run_demo"]
