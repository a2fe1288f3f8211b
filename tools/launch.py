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
plan), so a job that would fail on its layout or its export is never started or queued.

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

from int4_qat.recipe import Recipe  # noqa: E402  (light: pydantic + yaml only)


def _dry_run() -> bool:
    return os.environ.get("DRY_RUN", "").strip().lower() not in ("", "0", "false", "no")


def _fmt(cmd: list[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


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


def check(paths: list[str]) -> int:
    """Validate every recipe; one line per problem; 0 when all pass."""
    from int4_qat.planner import check_recipe, plan
    bad = 0
    for p in paths:
        problems = check_recipe(p)
        for line in problems:
            print(line)
        if problems:
            bad += 1
        else:
            e = plan(Recipe.load(p))["export"]
            print(f"ok  {p}  (export: {e['processes']} process(es) x {e['ram_per_process_gb']:.1f} GB RAM, "
                  f"{_bytes(e['disk_bytes'])} disk)")
    if bad:
        print(f"{bad} of {len(paths)} recipe(s) have problems", file=sys.stderr)
    return 1 if bad else 0


def _bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _load_checked(path: str, cpu: bool = False) -> Recipe:
    from int4_qat.planner import check_recipe
    problems = check_recipe(path, cpu=cpu)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"refusing to launch {path}: fix the problems above (python tools/launch.py check {path})",
              file=sys.stderr)
        raise SystemExit(1)
    return Recipe.load(path)


def train_command(r: Recipe, recipe_path: str, extra: list[str], cpu: bool,
                  env: dict | None = None) -> list[str]:
    """torchrun for this node. Multi-node without Slurm: run the same make target on every node
    with MASTER_ADDR (the head node) and NODE_RANK set; torchrun's c10d rendezvous joins them."""
    cmd = [_venv_bin("torchrun")]
    if r.parallel.nodes > 1:
        env = os.environ if env is None else env
        port = env.get("MASTER_PORT", "29500")
        cmd += ["--nnodes", str(r.parallel.nodes), "--node-rank", env["NODE_RANK"],
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{env['MASTER_ADDR']}:{port}",
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
    # On a machine without CUDA a real run is a CPU run: refuse GPU-only layouts (MoE + TP) up
    # front. DRY_RUN only prints, so it keeps the GPU view (printing commands on a login node).
    r = _load_checked(path, cpu=cpu and not _dry_run())
    if r.parallel.nodes > 1 and not all(k in os.environ for k in ("MASTER_ADDR", "NODE_RANK")):
        print(f"{path}: parallel.nodes = {r.parallel.nodes}: a multi-node run needs either Slurm "
              f"(make slurm-{r.name}) or this target run on each of the {r.parallel.nodes} nodes "
              f"with MASTER_ADDR=<head node> and NODE_RANK=0..{r.parallel.nodes - 1} set",
              file=sys.stderr)
        return 2
    if cpu and r.parallel.gpus_per_node > 1:
        print(f"note: no CUDA here: {r.parallel.gpus_per_node} CPU processes (gloo)", file=sys.stderr)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return _run(train_command(r, path, extra, cpu), env=env)


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
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
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
    r = _load_checked(path)
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
    r = _load_checked(path)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="validate recipes").add_argument("recipes", nargs="+")
    for name in ("train", "slurm", "export"):
        sub.add_parser(name, help=f"{name} one recipe").add_argument("recipe")
    a = ap.parse_args(argv)
    if a.cmd == "check":
        return check(a.recipes)
    return {"train": train, "slurm": slurm, "export": export}[a.cmd](a.recipe, extra)


if __name__ == "__main__":
    sys.exit(main())
