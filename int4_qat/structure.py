"""Structural check: build a recipe's model at its real TP / PP / EP / ETP and apply its scheme,
on a laptop, without GPUs and without weights.

Why: a layout that the formulas of ``int4_qat.parallel.validate_layout`` accept can still be
refused by the modules themselves when they are built -- Megatron-Core's layer constructors,
ModelOpt's quant modules (ModelOpt 0.47's ``QuantSequentialMLP`` refused every TP x EP layout the
GPU recipes use), or our own ``build_model``. Those refusals only showed up at step 0 on the
cluster. This check makes them show up in ``make check-recipes``.

How, for one recipe (``check(recipe)``, in a process of its own -- see :func:`run_checks`):

1. A *fake* process group of the recipe's world size (``torch.testing._internal.distributed.
   fake_pg``: collectives are no-ops, group creation is real) and Megatron's
   ``initialize_model_parallel`` with the recipe's tp / pp / ep / etp (no gloo side groups), as
   the rank that owns TP rank 0 / EP rank 0 of each distinct pipeline stage (first, last, one
   middle one).
2. ``int4_qat.arch.build_model`` exactly as the trainer calls it (the recipe's
   ``sequence_parallel`` and uneven pipeline split, bf16 params) under ``torch.device("meta")``:
   every parameter is a meta tensor, so Qwen3-235B or Kimi-K2 stages take no memory; the CPU shims
   of ``int4_qat.compat.cpu`` are active (the local spec's norms run sequence parallel).
3. ``scheme.apply(model)``: ModelOpt converts every module and inserts the quantizers.
4. The result must be what the layout promises: the stage's layer count, ``E / ep`` local experts
   per MoE layer, each expert's fc1 ``[2I/etp, H]`` and fc2 ``[H, I/etp]`` shard, and an enabled
   weight quantizer on every routed-expert linear (plus every decoder linear for ``all-linear``).

What it does not build: the Transformer-Engine modules (TE cannot be installed here). The GPU run
uses the TE spec; the MoE layer, the router, the expert container (``SequentialMLP`` with our
quant module) and Megatron's ``TransformerConfig`` validation are the same in both specs, while
the linears inside (TE vs local Column/RowParallelLinear), attention and norms differ. The
TE-side fixes (gpt-oss sinks' TP sharding, the TE version pin) are covered by unit tests of their
plain parts and by the device check (``tools/gpu_check.py``), not here. DeepSeek-V3 / Kimi-K2
(MLA) at TP > 1 are built with the local spec's sharded down projections (the TE spec duplicates
them), which the CPU *trainer* refuses (``int4_qat.arch.deepseek_v3``) but which builds for this
check (``compat.cpu.structure_only``).

Memory: meta tensors only; Kimi-K2's first stage (15 layers x 6 local experts) builds in a few
seconds and well under 1 GB of host memory. Each recipe runs in a subprocess because a process
can hold one default process group (the caller may hold a real one).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["StageReport", "Report", "check", "run_checks", "main"]


@dataclass
class StageReport:
    stage: int
    rank: int
    layers: int
    moe_layers: int
    local_experts: int
    expert_fc1: list[int] | None       # local shard shape of one expert's fc1 weight
    expert_fc2: list[int] | None
    quantizers: int                    # enabled weight quantizers on this stage
    expert_quantizers: int


@dataclass
class Report:
    path: str
    stages: list[StageReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _stages(pp: int) -> list[int]:
    return sorted({0, pp - 1, pp // 2}) if pp > 1 else [0]


def _init_fake_world(rank: int, world: int, p) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from int4_qat.parallel import init_process_group

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep, expert_tensor_parallel_size=p.etp,
        create_gloo_process_groups=False)


def _stage_report(model, stage: int, rank: int, arch, scheme) -> StageReport:
    from megatron.core.transformer.moe.experts import SequentialMLP

    from int4_qat.modelopt_backend import enabled_weight_quantizers

    layers = len(model.decoder.layers)
    moes = [m for m in model.modules() if isinstance(m, SequentialMLP)]
    local = {len(m.local_experts) for m in moes}
    fc1 = fc2 = None
    if moes:
        e0 = moes[0].local_experts[0]
        fc1, fc2 = list(e0.linear_fc1.weight.shape), list(e0.linear_fc2.weight.shape)
    qs = enabled_weight_quantizers(model)
    return StageReport(stage, rank, layers, len(moes), max(local) if local else 0, fc1, fc2,
                       len(qs), sum("local_experts" in q for q in qs))


def _expect(rep: StageReport, recipe, arch, stage_layers: int) -> list[str]:
    p = recipe.parallel
    out = []
    if rep.layers != stage_layers:
        out.append(f"stage {rep.stage} built {rep.layers} layers, the plan says {stage_layers}")
    if arch.is_moe and rep.moe_layers:
        H = arch.tf_kwargs["hidden_size"]
        I = arch.tf_kwargs.get("moe_ffn_hidden_size") or arch.tf_kwargs["ffn_hidden_size"]
        glu = 2 if arch.tf_kwargs.get("gated_linear_unit", True) else 1
        want = (arch.num_experts // p.ep, [glu * I // p.etp, H], [H, I // p.etp])
        got = (rep.local_experts, rep.expert_fc1, rep.expert_fc2)
        if got != want:
            out.append(f"stage {rep.stage}: local experts / fc1 / fc2 shard {got} != {want} "
                       f"(E={arch.num_experts}, ep={p.ep}, etp={p.etp})")
        if rep.expert_quantizers != rep.moe_layers * rep.local_experts * 2:
            out.append(f"stage {rep.stage}: {rep.expert_quantizers} enabled expert quantizers, "
                       f"expected {rep.moe_layers} MoE layers x {rep.local_experts} experts x 2")
    return out


def check(recipe_path: str | Path) -> Report:
    """Build every distinct pipeline stage of the recipe (see the module docstring). Needs a
    process without a default process group; :func:`run_checks` provides one."""
    import torch

    from int4_qat.arch import build_model, load_arch
    from int4_qat.compat import cpu as compat_cpu
    from int4_qat.parallel import megatron_layout_kwargs
    from int4_qat.planner import stage_layers
    from int4_qat.recipe import Recipe

    rep = Report(str(recipe_path))
    recipe = Recipe.load(recipe_path)
    p = recipe.parallel
    arch = load_arch(recipe.model.config_json().parent)
    scheme = recipe.quant.scheme()
    per_stage = stage_layers(arch.num_layers, p.pp, p.first_stage_layers, p.last_stage_layers)
    compat_cpu.activate(force=True)          # meta tensors only, in a process of its own
    for stage in _stages(p.pp):
        rank = stage * (p.world_size // p.pp)      # TP rank 0, EP rank 0 of that stage
        where = f"{recipe_path}: structure: stage {stage} of pp={p.pp} (rank {rank} of {p.world_size})"
        try:
            _init_fake_world(rank, p.world_size, p)
            with torch.device("meta"), compat_cpu.structure_only():
                model = build_model(arch, use_te=False, params_dtype=torch.bfloat16,
                                    sequence_parallel=p.sequence_parallel,
                                    config_overrides={**megatron_layout_kwargs(p),
                                                      "perform_initialization": False})
                model = scheme.apply(model)
            sr = _stage_report(model, stage, rank, arch, scheme)
        except Exception as e:                                      # noqa: BLE001 - reported
            msg = str(e).strip().splitlines()
            rep.problems.append(f"{where}: {type(e).__name__}: {msg[0] if msg else ''}"
                                + (f" [...{len(msg) - 1} more lines]" if len(msg) > 1 else ""))
            break
        rep.stages.append(sr)
        rep.problems += [f"{where}: {x}" for x in _expect(sr, recipe, arch, per_stage[stage])]
    return rep


def run_checks(paths: list[str | Path], timeout: float = 900) -> dict[str, Report]:
    """:func:`check` for each recipe, in one subprocess (``python -m int4_qat.structure --json``)."""
    if not paths:
        return {}
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "int4_qat.structure", "--json", *map(str, paths)]
    env = {**__import__("os").environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:                       # exit 1 with a JSON line = problems found, reported
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {str(x): Report(str(x), problems=[f"{x}: structure: the check itself failed "
                                                 f"(exit {p.returncode}): {' | '.join(tail)}"])
                for x in paths}
    data = json.loads(line)
    return {k: Report(k, [StageReport(**s) for s in v["stages"]], v["problems"])
            for k, v in data.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import warnings

    ap = argparse.ArgumentParser(prog="python -m int4_qat.structure", description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--json", action="store_true", help="one JSON line {path: report} on stdout")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging
    logging.disable(logging.WARNING)
    out = {}
    for path in a.recipes:
        try:
            out[path] = check(path)
        except Exception as e:                                      # noqa: BLE001
            out[path] = Report(path, problems=[f"{path}: structure: {type(e).__name__}: {e}"])
    if a.json:
        print(json.dumps({k: {"stages": [asdict(s) for s in r.stages], "problems": r.problems}
                          for k, r in out.items()}))
    else:
        for r in out.values():
            for s in r.stages:
                print(f"{r.path}: stage {s.stage} rank {s.rank}: {s.layers} layers, {s.moe_layers} MoE "
                      f"x {s.local_experts} local experts fc1 {s.expert_fc1} fc2 {s.expert_fc2}, "
                      f"{s.quantizers} weight quantizers")
            print("\n".join(r.problems) or f"ok  {r.path}")
    return 1 if any(r.problems for r in out.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
