#!/usr/bin/env python
"""Memory plan of a recipe: parameter counts, per-GPU QAT training memory, serving sizes.

    python tools/plan_memory.py recipes/kimi-k2-int4.yaml            # human-readable
    python tools/plan_memory.py recipes/kimi-k2-int4.yaml --json     # machine-readable
    python tools/plan_memory.py --readme-table recipes/*.yaml        # README "Recipes" table

A recipe that does not load or plan: one line ``plan_memory: error: ...``, exit 2.

The formulas (and what they leave out) are in int4_qat/planner.py's docstring.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from int4_qat.cli import add_debug_flag, cli_main  # noqa: E402
from int4_qat.planner import GPU_MEMORY_GB, plan  # noqa: E402
from int4_qat.recipe import Recipe  # noqa: E402


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _size(b: int) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def _yn(b: bool) -> str:
    return "fits" if b else "does not fit"


def render(p: dict) -> str:
    pr, lay, t = p["params"], p["layout"], p["training_per_gpu"]
    q = p["quant"]
    out = [f"{p['recipe']}  ({p['model_type']})",
           f"  params: {_count(pr['total'])} total, {_count(pr['active'])} active  "
           f"[embedding {pr['embedding']:.2f}, lm_head {pr['lm_head']:.2f}, attention {pr['attention']:.2f}, "
           f"dense MLP {pr['dense_mlp']:.2f}, routed experts {pr['routed_experts']:.2f}, shared experts "
           f"{pr['shared_experts']:.2f}, router {pr['router']:.3f} B]",
           f"  quant: {q['format']} g{q['group_size']} scope {q['scope']}",
           f"  layout: {lay['gpus']} GPUs = tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}; experts ep {lay['ep']} "
           f"x etp {lay['etp']}; layers per stage {lay['stages']}",
           f"  training, per GPU (worst stage {t['stage']}, {t['local_params_b']:.2f} B local params, "
           f"{t['microbatches']} micro-batches/step):",
           f"    weights {t['weights_gb']:.1f} GB + fp32 grads {t['grads_gb']:.1f} + optimizer {t['optimizer_gb']:.1f}"
           f" + fake-quant copies {t['fake_quant_gb']:.1f} + activations {t['activations_gb']:.1f}"
           f" + overhead {t['overhead_gb']:.1f} = {t['total_gb']:.1f} GB",
           "    " + "; ".join(f"{lay['gpus']} x {k}: {_yn(v)}" for k, v in t["fits"].items()),
           "  serving checkpoint (scope " + q["scope"] + "; rest BF16):"]
    for fmt, s in p["serving"].items():
        out.append(f"    {fmt:<10} {_size(s['bytes']):>10}   needs {s['gpus_80GB']:>3} x 80 GB or "
                   f"{s['gpus_141GB']:>3} x 141 GB; one 8 x 141 GB node: {_yn(s['fits_8x141GB'])}")
    e = p["export"]
    out += [f"  export (tools/export.py, streamed from the training checkpoint, no GPU): "
            f"{e['processes']} process(es) x {e['ram_per_process_gb']:.2f} GB RAM = {e['ram_total_gb']:g} GB;"
            f" disk {_size(e['disk_bytes'])} (the output only)",
            f"    per process: imports {e['imports_gb']:.2f} + checkpoint metadata {e['metadata_gb']:.2f} "
            f"({e['checkpoint_entries']} entries) + working set {e['working_gb']:.2f} GB (largest read "
            f"{e['largest_read_gb']:.2f} GB); reads {e['input_gb']:g} GB of weights"]
    return "\n".join(out)


def readme_table(plans: list[dict]) -> str:
    rows = ["| recipe | model | format | layout (tp/pp/ep/etp/dp) | GPUs | training GB/GPU | "
            "fits 80 GB / 141 GB | served checkpoint |",
            "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        lay, t, q = p["layout"], p["training_per_gpu"], p["quant"]
        fmt = f"{q['format']} g{q['group_size']} ({q['scope']})"
        key = f"int4-g{q['group_size']}" if q["format"] == "int4" else q["format"]
        fits = " / ".join("yes" if t["fits"][k] else "no" for k in GPU_MEMORY_GB)
        rows.append(f"| `{p['recipe']}` | {p['model_type']} {_count(p['params']['total'])} "
                    f"({_count(p['params']['active'])} active) | {fmt} | "
                    f"{lay['tp']}/{lay['pp']}/{lay['ep']}/{lay['etp']}/{lay['dp']} | {lay['gpus']} | "
                    f"{t['total_gb']:.1f} | {fits} | {_size(p['serving'][key]['bytes'])} |")
    return "\n".join(rows)


@cli_main("plan_memory")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="+")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON")
    g.add_argument("--readme-table", action="store_true", help="print the README 'Recipes' markdown table")
    add_debug_flag(ap)
    a = ap.parse_args(argv)
    plans = []
    for path in a.recipes:
        try:
            plans.append(plan(Recipe.load(path)))
        except ValueError as e:      # -> one line, exit 2 (int4_qat.cli)
            raise ValueError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    if a.readme_table:
        print(readme_table(plans))
    elif a.json:
        print(json.dumps(plans[0] if len(plans) == 1 else plans, indent=2))
    else:
        print("\n\n".join(render(p) for p in plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
