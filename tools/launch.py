#!/usr/bin/env python
"""Launch a recipe: train with torchrun here, write/submit a Slurm job, export, or check recipes.

    python tools/launch.py check recipes/*.yaml           # every problem, one line each; exit 1 if any
    python tools/launch.py train recipes/tiny-moe.yaml     # torchrun --nproc-per-node G -m int4_qat.train --recipe R
    python tools/launch.py slurm recipes/kimi-k2-int4.yaml # writes runs/<name>/slurm.sbatch, sbatch it if present
    python tools/launch.py export recipes/tiny-moe.yaml    # tools/export.py for each of export.formats
    DRY_RUN=1 python tools/launch.py train ...             # print the commands, run nothing

(``make recipe-<name>`` / ``slurm-<name>`` / ``export-<name>`` / ``check-recipes`` call this.)
Arguments after ``--`` are passed on to the launched program (``int4_qat.train`` or
``tools/export.py``), e.g. ``launch.py train recipes/tiny-moe.yaml -- --steps 4``.

Every subcommand first runs the same checks as ``check`` (int4_qat.planner.check_recipe: schema,
layout via int4_qat.parallel.validate_layout, group vs TP shard, Marlin servability, memory
plan), so a job that would fail on its layout or its export is never started or queued. ``check``,
``train`` and ``slurm`` (not under DRY_RUN) then build the model at the recipe's real layout on
meta tensors and apply the scheme (int4_qat.structure): a refusal by Megatron's or ModelOpt's
modules (e.g. a quant module that does not support TP x EP) fails here, not at step 0.

Input paths (``model.checkpoint``, ``model.tokenizer``, ``train.data``): ``check`` lists each
one missing on this machine on its own ``note:`` line without failing (the shipped recipes name
cluster paths, and ``make check-recipes`` must stay useful on a laptop and in CI); ``train`` and
``slurm`` refuse to launch (exit 2) while one is missing; ``DRY_RUN=1`` prints them as notes and
then the commands.

Without CUDA a ``train`` run is a CPU run: it is refused (exit 2) when the memory planner says
``gpus_per_node`` fp32 CPU processes of this recipe cannot fit this host's RAM; ``DRY_RUN=1`` then
prints the GPU command instead. A multi-node ``DRY_RUN`` without ``MASTER_ADDR`` / ``NODE_RANK``
prints the per-node command with ``"$MASTER_ADDR"`` / ``"$NODE_RANK"`` placeholders.

Errors: one line, exit 2 for bad input, 1 for failed checks (``int4_qat.cli``; ``--debug`` for
the stack). ``train`` ends with the worker's own error line and exit code when torchrun fails.

The Slurm job: one task per node (``--ntasks-per-node=1``); each task runs torchrun with
``--nproc-per-node`` GPUs and a c10d rendezvous on the first node of the allocation
(``--rdzv-endpoint $head:<slurm.port> --rdzv-id $SLURM_JOB_ID``). ``--requeue`` lets Slurm restart
a preempted job; ``int4_qat.train`` resumes from ``<checkpoint_dir>/latest`` when it exists (that
file is written last, so it always names a complete checkpoint).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from int4_qat.cli import add_debug_flag, cli_main, read_torchelastic_error  # noqa: E402
from int4_qat.recipe import Recipe  # noqa: E402  (light: pydantic + yaml only)


def _dry_run() -> bool:
    return os.environ.get("DRY_RUN", "").strip().lower() not in ("", "0", "false", "no")


def _fmt(cmd: list[str]) -> str:
    def q(c: str) -> str:        # placeholders stay expandable: "$NODE_RANK", "$MASTER_ADDR":29500
        if any(c.startswith(p) for p in PLACEHOLDERS.values()):
            return c
        return shlex.quote(c)
    return " ".join(q(str(c)) for c in cmd)


def _run(cmd: list[str], env: dict | None = None) -> int:
    """Print the command; run it unless DRY_RUN. Returns its exit status."""
    prefix = "DRY_RUN: " if _dry_run() else "+ "
    print(prefix + _fmt(cmd), flush=True)
    if _dry_run():
        return 0
    return subprocess.call([str(c) for c in cmd], cwd=REPO, env=env)


def _venv_bin(name: str) -> str:
    """``name`` next to this interpreter (the venv's torchrun), else on PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _missing_inputs(path: str) -> list[str]:
    """``<file>: <key>: <path> does not exist`` for the recipe's absent input paths (or [])."""
    try:
        return [f"{path}: {m}" for m in Recipe.load(path).missing_inputs()]
    except ValueError:
        return []           # the recipe's own problems are reported by check_recipe


def check(paths: list[str], build: bool = True) -> int:
    """Validate every recipe; one line per problem; 0 when all pass. ``build``: recipes that pass
    the formula checks are then built at their layout on meta tensors with the scheme applied
    (int4_qat.structure, one subprocess for all), and the ok line says what was built. Input paths
    missing on this machine are listed as notes (they do not fail a check; train / slurm refuse them)."""
    from int4_qat.planner import check_recipe, plan
    problems = {p: check_recipe(p) for p in paths}
    reports = {}
    if build:
        from int4_qat.structure import run_checks
        reports = run_checks([p for p in paths if not problems[p]])
        for p, rep in reports.items():
            problems[p] += rep.problems
    bad = 0
    for p in paths:
        for line in problems[p]:
            print(line)
        if problems[p]:
            bad += 1
            continue
        e = plan(Recipe.load(p))["export"]
        notes = [f"export: {e['processes']} process(es) x {e['ram_per_process_gb']:.1f} GB RAM, "
                 f"{_bytes(e['disk_bytes'])} disk"]
        if p in reports:
            s = reports[p].stages
            notes.insert(0, f"built pipeline stage(s) {','.join(str(x.stage) for x in s)}: "
                            f"{'/'.join(str(x.layers) for x in s)} layers, {s[0].local_experts} local "
                            f"experts with fc1 {s[0].expert_fc1} fc2 {s[0].expert_fc2}, "
                            f"{'/'.join(str(x.quantizers) for x in s)} weight quantizers")
        print(f"ok  {p}  ({'; '.join(notes)})")
        for m in _missing_inputs(p):
            print(f"  note: {m} here (train / slurm refuse to launch until it does)")
    if bad:
        print(f"{bad} of {len(paths)} recipe(s) have problems", file=sys.stderr)
    return 1 if bad else 0


def _bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _load_checked(path: str, cpu: bool = False, build: bool = False, inputs: bool = True) -> Recipe:
    """The recipe if it passes check_recipe (else the problems and exit 1); ``build``: also the
    structural model check (int4_qat.structure; not under DRY_RUN); ``inputs``: also refuse input
    paths missing on this machine (train / slurm; not export, which reads the trained checkpoint only)."""
    from int4_qat.planner import check_recipe
    problems = check_recipe(path, cpu=cpu, structure=build and not _dry_run())
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"refusing to launch {path}: fix the problems above (python tools/launch.py check {path})",
              file=sys.stderr)
        raise SystemExit(1)
    r = Recipe.load(path)
    missing = _missing_inputs(path) if inputs else []
    if missing and _dry_run():
        for m in missing:
            print(f"note: {m} here (a real launch refuses it)", file=sys.stderr)
    elif missing:
        raise ValueError(f"refusing to launch {path}: input path(s) missing on this machine:\n  "
                         + "\n  ".join(missing) + "\nfix: create or copy them, or point the recipe "
                         "at where they are")
    return r


def host_memory_gb() -> float:
    """Physical memory of this machine, GB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def cpu_run_gb(r: Recipe) -> tuple[float, float]:
    """``(per process, all processes of this node)`` host GB of a CPU run of ``r``: the planner's
    per-GPU training memory (int4_qat.planner.training_memory) at fp32 — CPU runs are fp32 with
    the plain optimizer — without its GPU overhead (CUDA context, NCCL buffers), plus ~1 GB for
    the Python / torch / Megatron process itself."""
    from int4_qat.planner import OVERHEAD_GB, arch_shape, count_params, training_memory
    from int4_qat.recipe import Precision

    a = arch_shape(r.model.hf_config(), str(r.model.config_json()))
    t = r.train.model_copy(update={"precision": Precision.FP32})
    per = training_memory(a, count_params(a), r.parallel, t, r.quant.scope.value).total_gb - OVERHEAD_GB + 1.0
    return per, per * r.parallel.gpus_per_node


def _host_fit_problem(r: Recipe, path: str) -> str | None:
    per, total = cpu_run_gb(r)
    have = host_memory_gb()
    if total <= have:
        return None
    return (f"{path}: no CUDA here, and a CPU run of {r.name} needs about {total:,.0f} GB of host memory "
            f"({r.parallel.gpus_per_node} process(es) x {per:,.1f} GB, fp32; int4_qat.planner), this "
            f"machine has {have:,.0f} GB; fix: run it on GPU nodes (make slurm-{r.name}), or train a "
            f"smaller recipe here")


#: Shown in a DRY_RUN multi-node command when the rendezvous variables are not set.
PLACEHOLDERS = {"NODE_RANK": '"$NODE_RANK"', "MASTER_ADDR": '"$MASTER_ADDR"'}


def train_command(r: Recipe, recipe_path: str, extra: list[str], cpu: bool,
                  env: dict | None = None) -> list[str]:
    """torchrun for this node. Multi-node without Slurm: run the same make target on every node
    with MASTER_ADDR (the head node) and NODE_RANK set; torchrun's c10d rendezvous joins them.
    Unset variables appear as :data:`PLACEHOLDERS` (only a DRY_RUN prints such a command)."""
    cmd = [_venv_bin("torchrun")]
    if r.parallel.nodes > 1:
        env = os.environ if env is None else env
        port = env.get("MASTER_PORT", "29500")
        rank, addr = (env.get(k, PLACEHOLDERS[k]) for k in ("NODE_RANK", "MASTER_ADDR"))
        cmd += ["--nnodes", str(r.parallel.nodes), "--node-rank", rank,
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr}:{port}",
                "--rdzv-id", env.get("RDZV_ID", r.name)]
    cmd += ["--nproc-per-node", str(r.parallel.gpus_per_node),
            "-m", "int4_qat.train", "--recipe", str(Path(recipe_path).resolve())]
    return cmd + (["--cpu"] if cpu and "--cpu" not in extra else []) + extra


def _no_cuda() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return True
    try:
        import torch
        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return True


def train(path: str, extra: list[str]) -> int:
    cpu = _no_cuda()
    if cpu:
        # A run here is a CPU run: refuse one the host cannot hold (the planner's estimate) before
        # anything else. DRY_RUN prints the GPU command instead (printing on a login node).
        try:
            problem = _host_fit_problem(Recipe.load(path), path)
        except ValueError:
            problem = None          # an invalid recipe: _load_checked reports every problem below
        if problem and not _dry_run():
            raise ValueError(problem)
        if problem:
            print(f"note: {problem.split(': ', 1)[1].split('; fix:')[0]}: printing the command for the "
                  f"GPU nodes", file=sys.stderr)
            cpu = False
    # On a machine without CUDA a real run is a CPU run: refuse GPU-only layouts (MoE + TP) up
    # front. DRY_RUN only prints, so it keeps the GPU view (printing commands on a login node).
    r = _load_checked(path, cpu=cpu and not _dry_run(), build=True)
    need = [k for k in ("MASTER_ADDR", "NODE_RANK") if k not in os.environ]
    if r.parallel.nodes > 1 and need:
        how = (f"a multi-node run needs either Slurm (make slurm-{r.name}) or this target run on "
               f"each of the {r.parallel.nodes} nodes with MASTER_ADDR=<head node> and "
               f"NODE_RANK=0..{r.parallel.nodes - 1} set")
        if not _dry_run():
            raise ValueError(f"{path}: parallel.nodes = {r.parallel.nodes}: {how} ({', '.join(need)} "
                             f"not set)")
        print(f"note: {how}; the command below shows {' and '.join(need)} as placeholders", file=sys.stderr)
    if cpu and r.parallel.gpus_per_node > 1:
        print(f"note: no CUDA here: {r.parallel.gpus_per_node} CPU processes (gloo)", file=sys.stderr)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return _run_torchrun(train_command(r, path, extra, cpu, env), env)


def _run_torchrun(cmd: list[str], env: dict) -> int:
    """Run torchrun; when it fails because a worker failed through int4_qat.cli, end with that
    worker's one line and exit code (torchrun itself always exits 1, after its own report)."""
    if _dry_run() or "TORCHELASTIC_ERROR_FILE" in env:
        return _run(cmd, env=env)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="int4qat-launch-") as tmp:
        env = {**env, "TORCHELASTIC_ERROR_FILE": os.path.join(tmp, "error.json")}
        rc = _run(cmd, env=env)
        found = read_torchelastic_error(env["TORCHELASTIC_ERROR_FILE"]) if rc else None
    if found is None:
        return rc
    code, line = found
    print(line, file=sys.stderr)
    return code


def sbatch_script(r: Recipe, recipe_path: str, extra: list[str] | None = None) -> str:
    """The batch script for ``r`` (one torchrun per node, c10d rendezvous on the head node)."""
    p, s = r.parallel, r.slurm
    run_dir = REPO / "runs" / r.name
    logs = run_dir / "logs"
    ckpt = r.train.checkpoint_dir
    torchrun = _venv_bin("torchrun")
    train_args = ["-m", "int4_qat.train", "--recipe", str(Path(recipe_path).resolve())] + list(extra or [])
    lines = [
        "#!/bin/bash",
        f"# Generated by tools/launch.py slurm {recipe_path} — regenerate rather than edit.",
        f"# {p.nodes} node(s) x {p.gpus_per_node} GPU(s): tp {p.tp}, pp {p.pp}, ep {p.ep}, etp {p.etp}, dp {p.dp}",
        f"#SBATCH --job-name=qat-{r.name}",
        f"#SBATCH --nodes={p.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={p.gpus_per_node}",
        f"#SBATCH --time={s.time}",
        f"#SBATCH --output={logs}/%x-%j.out",
        f"#SBATCH --error={logs}/%x-%j.err",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
    ]
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        f"mkdir -p {shlex.quote(str(logs))} {shlex.quote(str(ckpt))}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}",
        "# The rendezvous host is the allocation's first node. No pipe into `head`: under pipefail",
        "# scontrol would die of SIGPIPE (exit 141) when head exits first, killing the job silently.",
        ': "${SLURM_JOB_NODELIST:?is not set: submit this script with sbatch}"',
        'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || {',
        '    echo "error: scontrol show hostnames $SLURM_JOB_NODELIST failed; cannot pick the rendezvous node" >&2',
        "    exit 1; }",
        "head=${nodes%%$'\n'*}",
        'if [[ -z "$head" ]]; then',
        '    echo "error: scontrol listed no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1',
        "fi",
        "",
        "# Resume: int4_qat.train continues from <checkpoint_dir>/latest (written last, so it always",
        "# names a complete iteration); a requeued job therefore picks up where the last one saved.",
        f"CKPT={shlex.quote(str(ckpt))}",
        'if [[ -f "$CKPT/latest" ]]; then echo "resuming from $CKPT/$(cat "$CKPT/latest")"; '
        'else echo "no checkpoint in $CKPT yet: starting from model.checkpoint"; fi',
        "",
        f"srun --kill-on-bad-exit=1 {shlex.quote(torchrun)} \\",
        '    --nnodes "$SLURM_NNODES" \\',
        f"    --nproc-per-node {p.gpus_per_node} \\",
        "    --rdzv-backend c10d \\",
        f'    --rdzv-endpoint "$head:{s.port}" \\',
        '    --rdzv-id "$SLURM_JOB_ID" \\',
        "    " + _fmt(train_args),
        "",
    ]
    return "\n".join(lines)


def slurm(path: str, extra: list[str]) -> int:
    r = _load_checked(path, build=True)
    out = REPO / "runs" / r.name / "slurm.sbatch"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(sbatch_script(r, path, extra))
    out.chmod(0o755)
    print(f"wrote {out}")
    if shutil.which("sbatch") is None and not _dry_run():
        print(f"sbatch not found on this machine: submit it on the cluster with: sbatch {out}")
        return 0
    return _run(["sbatch", str(out)])


def export_commands(r: Recipe, recipe_path: str, extra: list[str]) -> list[list[str]]:
    """``tools/export.py`` per format; ``export.processes`` > 1 adds ``--nproc N`` (the exporter
    checks the checkpoint, then runs as N torchrun processes that split the output shards)."""
    cmds = []
    for fmt in r.export.formats:
        cmd = [sys.executable, str(REPO / "tools" / "export.py"), "--input", str(r.train.checkpoint_dir),
               "--output", str(r.export.output_dir / fmt.value), "--format", fmt.value,
               "--recipe", str(Path(recipe_path).resolve())]
        if r.export.processes > 1 and "--nproc" not in extra:
            cmd += ["--nproc", str(r.export.processes)]
        cmds.append(cmd + extra)
    return cmds


def export(path: str, extra: list[str]) -> int:
    r = _load_checked(path, inputs=False)
    ckpt = r.train.checkpoint_dir
    if not _dry_run() and not (ckpt / "latest").is_file():
        print(f"{path}: train.checkpoint_dir {ckpt} has no 'latest' checkpoint yet; train first: "
              f"make recipe-{r.name}", file=sys.stderr)
        return 1
    for cmd in export_commands(r, path, extra):
        rc = _run(cmd)
        if rc:
            return rc
    return 0


@cli_main("launch")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_debug_flag(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="validate recipes")
    chk.add_argument("recipes", nargs="+")
    chk.add_argument("--no-build", action="store_true",
                     help="skip the structural build at the real layout (formula checks only)")
    for name in ("train", "slurm", "export"):
        sub.add_parser(name, help=f"{name} one recipe").add_argument("recipe")
    a = ap.parse_args(argv)
    if a.cmd == "check":
        return check(a.recipes, build=not a.no_build)
    return {"train": train, "slurm": slurm, "export": export}[a.cmd](a.recipe, extra)


if __name__ == "__main__":
    sys.exit(main())
