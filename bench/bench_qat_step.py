"""QAT vs BF16 training step time on CPU, measured side by side in one run.

    .venv/bin/python bench/bench_qat_step.py [--steps 20] [--rounds 3] [--recipe recipes/tiny-moe.yaml]

Trains the recipe's model (Megatron-Core on CPU, fp32, one process) for ``--steps`` steps with no
quantizer and with each fake-quant format (INT4 at the recipe's group, MXFP4, NVFP4), interleaving
the formats over ``--rounds`` rounds so that load on a shared machine hits every case alike, and
prints the median step time (warm-up steps excluded) and its ratio to the unquantized run. On a
model this small re-quantizing the expert weights every forward dominates a step; the ratio says
nothing about GPU cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=os.path.join(REPO, "recipes", "tiny-moe.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the median")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from int4_qat.recipe import Recipe
    from int4_qat.train import train

    cases = [("bf16 (no quant)", None), ("int4", "int4"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")]
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for rnd in range(a.rounds):
        for name, fmt in cases:
            r = Recipe.load(a.recipe)
            d = r.to_dict()
            d["train"].update(steps=a.steps, eval_interval=10 ** 6, save_interval=10 ** 6, log_interval=10 ** 6)
            if fmt is not None:
                d["quant"] = {"format": fmt, "scope": d["quant"]["scope"]}
                if fmt == "int4":
                    d["quant"].update(group_size=r.quant.group_size, scale_rule=r.quant.scale_rule)
                d["export"]["formats"] = [fmt]
            rr = Recipe.from_dict(d)
            with tempfile.TemporaryDirectory() as out:
                res = train(rr, cpu=True, out=out, save=False, quant=fmt is not None, log=lambda s: None)
            times[name] += res.step_times[a.warmup:]
        print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
    ref = statistics.median(times["bf16 (no quant)"])
    print(f"\nmedian training step, {os.path.basename(a.recipe)}, CPU fp32, 1 thread, "
          f"{a.rounds} rounds x {a.steps - a.warmup} timed steps")
    print(f"{'case':<18}{'median ms':>10}{'ratio':>8}")
    for name, _ in cases:
        m = statistics.median(times[name])
        print(f"{name:<18}{m * 1e3:>10.1f}{m / ref:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
