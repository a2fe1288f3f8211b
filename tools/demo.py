#!/usr/bin/env python
"""The whole int4-qat pipeline on one CPU: BF16 → PTQ vs QAT (INT4 g32/g128, MXFP4, NVFP4) → export
→ reload → llama.cpp.

    make demo                                   # == .venv/bin/python tools/demo.py
    make demo DEMO_ARGS="--steps 2400 --qat-steps 300 --scope experts"
    .venv/bin/python tools/demo.py --ci --out /tmp/demo   # the reduced configuration of the tests

Writes OUT/summary.md, OUT/summary.json, OUT/loss_curves.png, OUT/eval_loss.png,
OUT/checkpoint_size.png, OUT/llama_cpp_tokens_per_s.png, the exports under OUT/export/ (GGUF files
under OUT/gguf/) and prints the table. See int4_qat/demo/.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from int4_qat.cli import add_debug_flag, cli_main, positive_float, positive_int  # noqa: E402  (stdlib only)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--ci", action="store_true", help="reduced configuration (tests; a few minutes)")
    p.add_argument("--steps", type=positive_int, help="stage-1 BF16 training steps (default 1200; --ci 60)")
    p.add_argument(
        "--qat-steps",
        type=positive_int,
        help="continuation budget in steps for BF16 and every "
        "QAT run (default 200; --ci 30); tokens = steps x global batch x seq length",
    )
    p.add_argument("--hidden", type=positive_int, help="hidden size (default 128; g128 needs a multiple of 128)")
    p.add_argument("--moe-intermediate", type=positive_int, help="expert intermediate size (default = hidden)")
    p.add_argument("--layers", type=positive_int, help="decoder layers (default 2)")
    p.add_argument("--experts", type=positive_int, help="routed experts (default 8, top-2)")
    p.add_argument("--heads", type=positive_int, help="attention heads (default 4; KV heads = heads/2)")
    p.add_argument("--seq-length", type=positive_int, help="tokens per sample (default 128)")
    p.add_argument("--global-batch", type=positive_int, help="samples per step (default 8)")
    p.add_argument("--micro-batch", type=positive_int, help="samples per micro-batch (default 8)")
    p.add_argument("--lr", type=positive_float, help="stage-1 peak LR (default 3e-3)")
    p.add_argument("--qat-lr", type=positive_float, help="continuation peak LR (default 5e-4)")
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        help="held-out windows evaluated (default all: 706 "
        "at seq length 128; --ci 64); every Δ gets a paired bootstrap interval over them",
    )
    p.add_argument("--formats", help="comma list of int4-g32,int4-g128,mxfp4,nvfp4 (default all)")
    p.add_argument("--scope", choices=["experts", "all-linear"], help="quantized weights (default all-linear)")
    p.add_argument("--no-baselines", action="store_true", help="skip the ModelOpt AWQ / FP8 rows")
    p.add_argument(
        "--no-llama-cpp",
        action="store_true",
        help="skip the llama.cpp column (GGUF "
        "exports of the BF16 / INT4 g32 / MXFP4 rows run in llama.cpp) and its tokens/s table",
    )
    p.add_argument("--seed", type=int, help="seed (default 1234)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default 1: tiny matmuls, shared CPU)")
    p.add_argument("--verbose", action="store_true", help="keep library warnings and progress bars")
    add_debug_flag(p)
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace):
    """The validated ``DemoConfig`` of the parsed flags (``ValueError`` naming the flag)."""
    from int4_qat.demo import DemoConfig, ci_config

    kw = {
        k: v
        for k, v in vars(a).items()
        if v is not None and k not in ("ci", "out", "formats", "no_baselines", "no_llama_cpp", "verbose", "debug")
    }
    if a.formats:
        kw["formats"] = tuple(f.strip() for f in a.formats.split(",") if f.strip())
    if a.no_baselines:
        kw["baselines"] = False
    if a.no_llama_cpp:
        kw["llama_cpp"] = False
    return ci_config(a.out, **kw) if a.ci else DemoConfig(out=a.out, **kw)


@cli_main("demo")
def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.verbose:  # Megatron/ModelOpt/transformers warn about TE, Apex, CUDA on every import
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from int4_qat.demo import run_demo

    cfg = config_from_args(a)  # ValueError -> one line, exit 2 (int4_qat.cli)
    t0 = time.perf_counter()
    res = run_demo(cfg)
    print()
    print(res.table)
    for h in res.headlines:
        print(f"  - {h}")
    for sec in res.sections:
        if sec.text:
            print(f"\n{sec.text}")
    print(
        f"\n* = training-side model (no export). Wall time {time.perf_counter() - t0:.0f} s "
        f"(CPU {time.process_time():.0f} s). "
        f"Report: {res.paths['summary.md']}"
    )
    return 0


if __name__ == "__main__":  # the guard matters: Megatron's checkpoint writer may spawn processes
    sys.exit(main())
