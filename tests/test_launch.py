"""tools/launch.py: checks before launch, torchrun / Slurm / export commands under DRY_RUN."""
import importlib.util
import shutil
import subprocess

import pytest
import yaml

from int4_qat.planner import check_recipe
from int4_qat.recipe import REPO_ROOT

spec = importlib.util.spec_from_file_location("launch", REPO_ROOT / "tools" / "launch.py")
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)

RECIPES = sorted(str(p) for p in (REPO_ROOT / "recipes").glob("*.yaml"))


def _variant(tmp_path, base: str, name: str, edit) -> str:
    d = yaml.safe_load((REPO_ROOT / "recipes" / f"{base}.yaml").read_text())
    d["name"] = name
    edit(d)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)


def test_check_all_recipes_pass(capsys):
    # formula checks only; the structural build of every recipe: tests/test_structure_check.py
    assert launch.main(["check", "--no-build", *RECIPES]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([ln for ln in out if ln.startswith("ok  ")]) == len(RECIPES)
    # the rest: one note per input path this machine lacks (cluster paths), never a failure
    assert all(ln.startswith("ok  ") or (ln.startswith("  note: ") and "does not exist here" in ln)
               for ln in out)


@pytest.mark.parametrize("base, edit, expected", [
    # layout does not divide the world size
    ("qwen3-30b-a3b-int4", lambda d: d["parallel"].update(dp=1),
     ["parallel: tp=4 × pp=1 × dp=1 = 4 != world size 8 (set parallel.dp = 2"]),
    # the expert grid does not fold onto the dense ranks
    ("qwen3-30b-a3b-int4", lambda d: d["parallel"].update(ep=16),
     ["parallel: ep=16 × etp=1 = 16 does not divide tp=4 × dp=2 = 8"]),
    # INT4 group straddles an expert-TP shard (768 / etp 8 = 96 per shard, group 128)
    ("qwen3-30b-a3b-int4", lambda d: d["parallel"].update(etp=8, ep=1),
     ["parallel: mlp.experts.local_experts.0.linear_fc2: in_features 768 / etp=8 = 96 per shard is "
      "not a multiple of group_size=128, so a quantization group would straddle two shards"]),
    # Marlin: Qwen3-30B-A3B (I = 768) g128 at serving TP 4 without expert parallel
    ("qwen3-30b-a3b-int4", lambda d: d["export"].update(serving_ep=1),
     ["quant.group_size / export.serving_tp: Marlin MoE needs", "768 / 4 = 192 is not a multiple of 128",
      "fix: quant.group_size: 64 or export.serving_ep: 2"]),
    ("qwen3-30b-a3b-int4", lambda d: d["export"].update(serving_tp=8, serving_ep=1),
     ["768 / 8 = 96 is not a multiple of 128", "fix: export.serving_ep: 4"]),
    ("qwen3-30b-a3b-int4", lambda d: d["quant"].update(group_size=256),
     ["quant.group_size: Marlin serves INT4 groups [32, 64, 128] only, got 256"]),
    # hidden 2880 % 128 != 0: gpt-oss cannot be served as INT4 by Marlin
    ("gpt-oss-120b-mxfp4", lambda d: (d["quant"].update(format="int4", group_size=32, scale_rule="amax/7"),
                                      d["export"].update(formats=["int4"])),
     ["model.config: Marlin MoE needs hidden_size % 128 == 0, hidden_size=2880"]),
    # all-linear: o_proj is row-parallel at serving TP too (tiny: 4 heads x 32 = 128 in_features)
    ("tiny-moe", lambda d: (d["quant"].update(scope="all-linear", group_size=64),
                            d["export"].update(serving_tp=4)),
     ["scope all-linear quantizes o_proj (in_features 128); 128 / serving_tp 4 = 32 per rank is not "
      "a multiple of group 64"]),
    # exporting a format that training did not simulate
    ("tiny-moe", lambda d: d["export"].update(formats=["int4", "nvfp4"]),
     ["export.formats: 'nvfp4' is not the trained format quant.format='int4'"]),
    # FP4 block split by the serving TP: 2880 / 4 = 720 is not a multiple of 32
    ("gpt-oss-120b-mxfp4", lambda d: d["export"].update(serving_tp=4),
     ["export.serving_tp: mxfp4 down_proj in_features 2880 / 4 = 720"]),
    # uneven pipeline without first/last stage layers
    ("kimi-k2-int4", lambda d: d["parallel"].update(first_stage_layers=None, last_stage_layers=None),
     ["num_hidden_layers=61 is not divisible by the 4 remaining pipeline stages (pp=4)"]),
    # does not fit: Kimi-K2 QAT on 64 GPUs (PP 1)
    ("kimi-k2-int4", lambda d: d["parallel"].update(pp=1, nodes=8, dp=8, first_stage_layers=None,
                                                    last_stage_layers=None),
     ["parallel: the plan needs", "more than a 141 GB GPU"]),
    # schema errors come through the same path, naming file and key
    ("tiny-moe", lambda d: d["quant"].update(group=32), ["quant.group: unknown key (allowed: format, group_size"]),
])
def test_check_problems(tmp_path, capsys, base, edit, expected):
    path = _variant(tmp_path, base, "variant", edit)
    problems = check_recipe(path)
    text = "\n".join(problems)
    for e in expected:
        assert e in text, f"{e!r} not in:\n{text}"
    assert all(line.startswith(path) for line in problems)
    assert launch.main(["check", path]) == 1
    assert text in capsys.readouterr().out


def test_layout_and_serving_problems_reported_together(tmp_path):
    path = _variant(tmp_path, "qwen3-30b-a3b-int4", "variant",
                    lambda d: (d["parallel"].update(dp=1), d["export"].update(serving_ep=1)))
    text = "\n".join(check_recipe(path))
    assert "!= world size 8" in text and "quant.group_size / export.serving_tp" in text


def test_cpu_run_refuses_gpu_only_layout(tmp_path, monkeypatch, capsys):
    """Without CUDA, a real (not DRY_RUN) train refuses MLA + TP before starting torchrun (a small
    model, so that the host-memory check, which comes first, passes)."""
    monkeypatch.delenv("DRY_RUN", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = _variant(tmp_path, "tiny-moe", "variant", lambda d: (
        d["model"].update(config="recipes/models/tiny-deepseek-v3"),
        d["parallel"].update(tp=2, sequence_parallel=True, gpus_per_node=2)))
    with pytest.raises(SystemExit) as ei:
        launch.main(["train", path])
    assert ei.value.code == 1
    cap = capsys.readouterr()
    assert "MLA with tp=2 is GPU-only here" in cap.err and "+ " not in cap.out


def test_name_must_match_file(tmp_path):
    d = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-moe.yaml").read_text())
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(d))
    assert check_recipe(p) == [f"{p}: name: 'tiny-moe' differs from the file name 'other' (make targets "
                               f"use the file name); fix: name: other"]


def test_dry_run_train_tiny(monkeypatch, capsys):
    monkeypatch.setenv("DRY_RUN", "1")
    assert launch.main(["train", str(REPO_ROOT / "recipes" / "tiny-moe.yaml"), "--", "--steps", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("DRY_RUN: ") and "torchrun --nproc-per-node 1 -m int4_qat.train --recipe" in line
    assert line.endswith("--steps 3") or "--steps 3 --cpu" in line or line.endswith("--cpu --steps 3")
    assert str(REPO_ROOT / "recipes" / "tiny-moe.yaml") in line


def test_dry_run_train_single_node_gpus(monkeypatch, capsys):
    monkeypatch.setenv("DRY_RUN", "1")
    assert launch.main(["train", str(REPO_ROOT / "recipes" / "qwen3-30b-a3b-int4.yaml")]) == 0
    assert "torchrun --nproc-per-node 8 -m int4_qat.train" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen3-235b-a22b-int4", "kimi-k2-int4"])
def test_multi_node_dry_run_prints_the_per_node_command(monkeypatch, capsys, name):
    """DRY_RUN without MASTER_ADDR / NODE_RANK prints what each node would run, with placeholders."""
    monkeypatch.setenv("DRY_RUN", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)   # the default rendezvous port is what is shown
    assert launch.main(["train", str(REPO_ROOT / "recipes" / f"{name}.yaml")]) == 0
    cap = capsys.readouterr()
    assert f"make slurm-{name}" in cap.err and "placeholders" in cap.err
    line = [ln for ln in cap.out.splitlines() if ln.startswith("DRY_RUN: ")][-1]
    assert '--node-rank "$NODE_RANK"' in line and '--rdzv-endpoint "$MASTER_ADDR":29500' in line
    assert "--cpu" not in line            # no CUDA here, but the model cannot fit: the GPU command


def test_refuses_to_launch_invalid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DRY_RUN", "1")
    path = _variant(tmp_path, "qwen3-30b-a3b-int4", "variant", lambda d: d["export"].update(serving_ep=1))
    for cmd in ("train", "slurm", "export"):
        with pytest.raises(SystemExit) as ei:
            launch.main([cmd, path])
        assert ei.value.code == 1
        cap = capsys.readouterr()
        assert "DRY_RUN:" not in cap.out and "refusing to launch" in cap.err
        assert "quant.group_size / export.serving_tp" in cap.err
    assert not (REPO_ROOT / "runs" / "variant" / "slurm.sbatch").exists()


@pytest.mark.parametrize("name, nodes, gpn", [("qwen3-235b-a22b-int4", 8, 8), ("kimi-k2-int4", 32, 8),
                                              ("gpt-oss-120b-mxfp4", 4, 8)])
def test_dry_run_slurm_script(monkeypatch, capsys, name, nodes, gpn):
    monkeypatch.setenv("DRY_RUN", "1")
    assert launch.main(["slurm", str(REPO_ROOT / "recipes" / f"{name}.yaml")]) == 0
    script_path = REPO_ROOT / "runs" / name / "slurm.sbatch"
    out = capsys.readouterr().out
    assert f"wrote {script_path}" in out and f"DRY_RUN: sbatch {script_path}" in out
    s = script_path.read_text()
    for directive in (f"#SBATCH --nodes={nodes}", f"#SBATCH --gpus-per-node={gpn}",
                      "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --time=",
                      f"#SBATCH --output={REPO_ROOT}/runs/{name}/logs/%x-%j.out",
                      f"#SBATCH --error={REPO_ROOT}/runs/{name}/logs/%x-%j.err"):
        assert directive in s, directive
    for piece in ('--nnodes "$SLURM_NNODES"', f"--nproc-per-node {gpn}", "--rdzv-backend c10d",
                  '--rdzv-endpoint "$head:29500"', '--rdzv-id "$SLURM_JOB_ID"',
                  f"-m int4_qat.train --recipe {REPO_ROOT}/recipes/{name}.yaml",
                  f"CKPT={REPO_ROOT}/runs/{name}/ckpt", '"$CKPT/latest"', "srun "):
        assert piece in s, piece
    # nodes x gpus-per-node = the layout's world size
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", str(script_path)], capture_output=True).returncode == 0


def test_dry_run_export(monkeypatch, capsys):
    monkeypatch.setenv("DRY_RUN", "1")
    assert launch.main(["export", str(REPO_ROOT / "recipes" / "qwen3-30b-a3b-int4.yaml")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("DRY_RUN:")]
    assert len(lines) == 1
    run = f"{REPO_ROOT}/runs/qwen3-30b-a3b-int4"
    assert (f"tools/export.py --input {run}/ckpt --output {run}/export/int4 --format int4 --recipe "
            f"{REPO_ROOT}/recipes/qwen3-30b-a3b-int4.yaml") in lines[0]
    # the recipe's export.serving_tp / serving_ep reach the exporter through --recipe, not flags
    assert "--serving-tp" not in lines[0]


def test_export_without_checkpoint(tmp_path, capsys):
    path = _variant(tmp_path, "tiny-moe", "variant", lambda d: d["train"].update(
        checkpoint_dir=str(tmp_path / "ckpt")))
    assert launch.main(["export", path]) == 1
    assert "has no 'latest' checkpoint yet; train first: make recipe-variant" in capsys.readouterr().err


def test_make_targets_dry_run():
    """The Makefile's pattern target + alias (slurm-qwen3-235b) reaches launch.py; DRY_RUN=1 runs nothing."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    r = subprocess.run(["make", "-s", "slurm-qwen3-235b"], cwd=REPO_ROOT,
                       env={**__import__("os").environ, "DRY_RUN": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"DRY_RUN: sbatch {REPO_ROOT}/runs/qwen3-235b-a22b-int4/slurm.sbatch" in r.stdout


def test_sbatch_script_runs_with_stub_slurm(tmp_path, monkeypatch, capsys):
    """Execute the generated script with stub scontrol/srun: the head node, node count and job id
    reach torchrun's rendezvous flags, and a checkpoint's ``latest`` is announced as the resume point."""
    monkeypatch.setenv("DRY_RUN", "1")
    name = "qwen3-235b-a22b-int4"
    assert launch.main(["slurm", str(REPO_ROOT / "recipes" / f"{name}.yaml")]) == 0
    capsys.readouterr()
    script = REPO_ROOT / "runs" / name / "slurm.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/srun.args\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    text = script.read_text().replace(f"CKPT={REPO_ROOT}/runs/{name}/ckpt", f"CKPT={tmp_path}/ckpt")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("iter_0000050\n")
    (tmp_path / "job.sbatch").write_text(text)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-node-[07-14]",
           "SLURM_NNODES": "8", "SLURM_JOB_ID": "4242", "HOME": str(tmp_path)}
    r = subprocess.run([shutil.which("bash"), str(tmp_path / "job.sbatch")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {tmp_path}/ckpt/iter_0000050" in r.stdout
    args = (tmp_path / "srun.args").read_text().split("\n")
    assert args[0] == "--kill-on-bad-exit=1" and args[1].endswith("torchrun")
    joined = " ".join(args)
    assert "--nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu-node-07:29500 " \
           "--rdzv-id 4242 -m int4_qat.train --recipe" in joined


def test_dry_run_multinode_train_with_torchrun_env(monkeypatch, capsys):
    """`make recipe-qwen3-235b` on each node: NODE_RANK + MASTER_ADDR give a c10d rendezvous."""
    monkeypatch.setenv("DRY_RUN", "1")
    monkeypatch.setenv("MASTER_ADDR", "head-0")
    monkeypatch.setenv("NODE_RANK", "3")
    monkeypatch.delenv("MASTER_PORT", raising=False)   # the default rendezvous port is what is shown
    rc = launch.main(["train", str(REPO_ROOT / "recipes" / "qwen3-235b-a22b-int4.yaml")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--nnodes 8 --node-rank 3 --rdzv-backend c10d --rdzv-endpoint head-0:29500" in out
    assert "--nproc-per-node 8" in out


def test_multinode_train_without_env_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DRY_RUN", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    path = _variant(tmp_path, "tiny-moe", "variant", lambda d: d["parallel"].update(nodes=2, dp=2))
    rc = launch.main(["train", path])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launch: error: ") and "NODE_RANK" in err[0]
