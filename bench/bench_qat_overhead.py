"""Where the QAT-step overhead goes: ModelOpt's quant wrappers vs our numerics, side by side.

    .venv/bin/python bench/bench_qat_overhead.py [--format int4] [--steps 14] [--rounds 3]

Trains the recipe's model (like bench/bench_qat_step.py: Megatron-Core on CPU, fp32, one thread)
with, interleaved over ``--rounds`` rounds:

``bf16``             no quantizer at all (the baseline);
``wrappers only``    ``mtq.quantize`` with our backend, but the backend returns the weight
                     unchanged: what ModelOpt's quant modules and TensorQuantizers cost alone;
``fused``            the real fake quant, fused kernels (what training uses);
``oracle``           the real fake quant, eager oracle (``INT4_QAT_FUSED=0``): the old cost.

It prints the median step time and its ratio to ``bf16``, and the number of weight-quantizer
calls per step, so that (fused - wrappers) / calls is our cost per fake quant and
(wrappers - bf16) is ModelOpt's. Step time is the process's CPU time (``time.process_time``,
one thread), which a busy shared machine inflates far less than wall time; ratios are measured
side by side in one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=os.path.join(REPO, "recipes", "tiny-moe.yaml"))
    p.add_argument("--format", default="int4", choices=["int4", "mxfp4", "nvfp4"])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from int4_qat import modelopt_backend
    from int4_qat.formats import fused
    from int4_qat.recipe import Recipe
    from int4_qat.train import train

    from int4_qat.train import Trainer

    real = fused.fake_quantize
    calls = {"n": 0}
    cpu_times: list[float] = []
    train_step = Trainer.train_step

    def timed_step(self):
        t0 = time.process_time()
        out = train_step(self)
        cpu_times.append(time.process_time() - t0)
        return out

    Trainer.train_step = timed_step

    def counting(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    def identity(fmt, w, *args, **kw):
        calls["n"] += 1
        return w.view_as(w)  # a view: gradients flow, nothing computed

    cases = {"bf16": (False, real, "1"), "wrappers only": (True, identity, "1"),
             "fused": (True, counting, "1"), "oracle": (True, counting, "0")}
    times: dict[str, list[float]] = {k: [] for k in cases}
    per_step: dict[str, float] = {}
    for rnd in range(a.rounds):
        for name, (quant, fn, fused_env) in cases.items():
            r = Recipe.load(a.recipe)
            d = r.to_dict()
            d["train"].update(steps=a.steps, eval_interval=10 ** 6, save_interval=10 ** 6, log_interval=10 ** 6)
            d["quant"] = {"format": a.format, "scope": d["quant"]["scope"]}
            if a.format == "int4":
                d["quant"].update(group_size=r.quant.group_size, scale_rule=r.quant.scale_rule)
            d["export"]["formats"] = [a.format]
            os.environ["INT4_QAT_FUSED"] = fused_env
            modelopt_backend.fused.fake_quantize = fn
            calls["n"] = 0
            cpu_times.clear()
            try:
                with tempfile.TemporaryDirectory() as out:
                    train(Recipe.from_dict(d), cpu=True, out=out, save=False, quant=quant, log=lambda s: None)
            finally:
                modelopt_backend.fused.fake_quantize = real
                os.environ.pop("INT4_QAT_FUSED", None)
            times[name] += cpu_times[a.warmup:]
            per_step[name] = calls["n"] / max(len(cpu_times), 1)
        print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
    ref = statistics.median(times["bf16"])
    print(f"\n{a.format}: median training step (CPU time), {os.path.basename(a.recipe)}, fp32, 1 thread, "
          f"{a.rounds} rounds x {a.steps - a.warmup} timed steps (fused: {fused.implementation('cpu')})")
    print(f"{'case':<16}{'median ms':>10}{'ratio':>8}{'fake quants/step':>18}")
    for name in cases:
        m = statistics.median(times[name])
        print(f"{name:<16}{m * 1e3:>10.1f}{m / ref:>8.2f}{per_step.get(name, 0):>18.0f}")
    n = per_step.get("fused") or 1
    wrap = statistics.median(times["wrappers only"])
    print(f"ModelOpt wrappers: {(wrap - ref) * 1e3:+.1f} ms/step; our fused fake quant: "
          f"{(statistics.median(times['fused']) - wrap) * 1e6 / n:+.0f} us per call "
          f"(oracle: {(statistics.median(times['oracle']) - wrap) * 1e6 / n:+.0f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
