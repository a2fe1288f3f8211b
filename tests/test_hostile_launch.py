"""Hostile / careless recipes and launches (issue 11, items 5-9) and the shared CLI error contract.

tools/launch.py {check,train,slurm}, int4_qat.recipe's YAML reader, the generated Slurm script,
and int4_qat.cli (one line, exit 2 bad input / 1 failed check / 3 internal, stack with --debug).
"""
import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from int4_qat import cli
from int4_qat.recipe import Recipe, RecipeError

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("launch", REPO / "tools" / "launch.py")
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)
TINY = REPO / "recipes" / "tiny-moe.yaml"


def _variant(tmp_path, edit, base=TINY, name="variant") -> Path:
    d = yaml.safe_load(Path(base).read_text())
    d["name"] = name
    edit(d)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _launch(args, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "DRY_RUN")}
    return subprocess.run([sys.executable, str(REPO / "tools" / "launch.py"), *args], cwd=REPO, text=True,
                          capture_output=True, env={**env, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}, **kw)


# ------------------------------------------------------------------ items 5, 6, 7: the YAML itself
def _bomb(levels=9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nname: [*a{levels - 1}]\n"


@pytest.mark.parametrize("kind, content, expect", [
    ("alias bomb", _bomb().encode(), "anchors/aliases expand the YAML to more than 100000 nodes"),
    ("recursive alias", b"a: &a [*a]\n", "an alias refers to a node that contains it"),
    ("not UTF-8", "name: tiny\u00e9\n".encode("latin-1"), "line 1: not UTF-8 text (byte 0xe9 at offset 10)"),
    ("duplicate key", TINY.read_bytes() + b"name: other\n",
     "key 'name' is given twice in one mapping (first on line 7)"),
])
def test_bad_yaml_is_one_line_and_bounded(tmp_path, kind, content, expect):
    p = tmp_path / "r.yaml"
    p.write_bytes(content)
    # a subprocess with a timeout: before the fix the alias bomb hung with growing memory
    r = _launch(["check", str(p)], timeout=120)
    assert r.returncode == 1
    assert r.stdout.strip().splitlines() == [r.stdout.strip()] and expect in r.stdout, r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "'nan'"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    p = tmp_path / "r.yaml"
    p.write_text(TINY.read_text().replace("lr: 1.0e-3", f"lr: {value}"))
    with pytest.raises(RecipeError, match=r"train\.lr: Input should be a finite number"):
        Recipe.load(p)


def test_a_recipe_must_be_a_small_regular_file(tmp_path):
    with pytest.raises(RecipeError, match="is not a regular file"):
        Recipe.load("/dev/zero")                                  # would read forever
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(RecipeError, match="more than 1048576 bytes: not a recipe"):
        Recipe.load(big)


def test_merge_keys_may_override(tmp_path):
    """Duplicate detection does not forbid a key overriding one merged in with ``<<: *anchor``."""
    text = TINY.read_text().replace("slurm: {time: \"00:30:00\"}",
                                    "slurm: &s {time: \"00:30:00\", port: 29500}")
    text = text.replace("parallel: {tp: 1,", "parallel: {<<: {tp: 2}, tp: 1,")
    p = tmp_path / "tiny-moe.yaml"
    p.write_text(text)
    assert Recipe.load(p).parallel.tp == 1


# ------------------------------------------------------------------ item 7: input paths
def test_missing_inputs_are_notes_in_check_and_refused_by_train_and_slurm(tmp_path, monkeypatch, capsys):
    p = _variant(tmp_path, lambda d: (d["model"].update(checkpoint=str(tmp_path / "no-ckpt")),
                                      d["train"].update(data=[str(tmp_path / "no-data")])))
    assert launch.main(["check", str(p)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"ok  {p}  (built pipeline stage(s) 0")   # the structural check ran too
    assert f"  note: {p}: model.checkpoint: {tmp_path / 'no-ckpt'} does not exist here" in out[1]
    assert f"  note: {p}: train.data[0]: {tmp_path / 'no-data'} does not exist here" in out[2]
    monkeypatch.delenv("DRY_RUN", raising=False)
    for cmd in ("train", "slurm"):
        assert launch.main([cmd, str(p)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("launch: error: refusing to launch") and "no-ckpt" in err[0]
    assert not (REPO / "runs" / "variant" / "slurm.sbatch").exists()
    monkeypatch.setenv("DRY_RUN", "1")                             # a dry run shows them and the command
    assert launch.main(["train", str(p)]) == 0
    cap = capsys.readouterr()
    assert "no-ckpt does not exist here (a real launch refuses it)" in cap.err and "DRY_RUN: " in cap.out


# ------------------------------------------------------------------ item 9: host fit
def test_cpu_run_that_cannot_fit_the_host_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("DRY_RUN", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "head-0")
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setattr(launch, "_run", lambda *a, **k: pytest.fail("must not start torchrun"))
    assert launch.main(["train", str(REPO / "recipes" / "qwen3-235b-a22b-int4.yaml")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("launch: error: ") and "needs about" in line and "8 process(es)" in line
    assert "make slurm-qwen3-235b-a22b-int4" in line
    # the same planner estimate refuses the tiny recipe on a (pretend) tiny host
    monkeypatch.setattr(launch, "host_memory_gb", lambda: 0.5)
    assert launch.main(["train", str(TINY)]) == 2
    assert "this machine has 0 GB" in capsys.readouterr().err
    per, total = launch.cpu_run_gb(Recipe.load(TINY))
    assert 1.0 < per == total < 2.0                              # one fp32 process of a 1M-param model


# ------------------------------------------------------------------ item 8: the Slurm script
def test_sbatch_script_survives_a_slow_multiline_scontrol(tmp_path, monkeypatch, capsys):
    """scontrol writing after the first line (what a loaded machine looks like to a pipe into
    `head -n 1`) must not kill the job with SIGPIPE under pipefail; a failing scontrol gives a
    message instead of a silent death."""
    monkeypatch.setenv("DRY_RUN", "1")
    assert launch.main(["slurm", str(TINY)]) == 0
    capsys.readouterr()
    script = (REPO / "runs" / "tiny-moe" / "slurm.sbatch").read_text()
    assert "| head" not in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/srun.args\n")
    scontrol = bin_dir / "scontrol"
    for f in (srun, scontrol):
        f.touch()
        f.chmod(0o755)
    job = tmp_path / "job.sbatch"
    job.write_text(script.replace(f"CKPT={REPO}/runs/tiny-moe/ckpt", f"CKPT={tmp_path}/ckpt"))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "7", "HOME": str(tmp_path)}
    scontrol.write_text("#!/bin/bash\nprintf 'n1\\n'; sleep 1; printf 'n2\\nn3\\n'\n")
    r = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "--rdzv-endpoint\nn1:29500" in (tmp_path / "srun.args").read_text()
    scontrol.write_text("#!/bin/bash\necho 'scontrol: error: Invalid node name' >&2; exit 1\n")
    r = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "error: scontrol show hostnames n[1-3] failed" in r.stderr


# ------------------------------------------------------------------ the CLI contract
@pytest.mark.parametrize("exc, code, text", [
    (ValueError("recipes/x.yaml: train.lr: bad\nsecond line"), 2, "recipes/x.yaml: train.lr: bad; second line"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/shard"), 2,
     "No space left on device (ENOSPC): /out/shard; fix: free space"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), 2, "(EROFS): /ro; fix: the filesystem is read-only"),
    (FloatingPointError("step 3: loss is nan"), 1, "step 3: loss is nan"),
    (RuntimeError("boom"), 3, "internal error: RuntimeError: boom"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_run_cli_maps_exceptions_to_one_line_and_exit_code(capsys, exc, code, text):
    def fn():
        raise exc
    assert cli.run_cli(fn, "prog", []) == code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("prog: error: ") and text in err[0]


def test_debug_flag_and_env_show_the_stack(capsys, monkeypatch):
    def fn():
        raise ValueError("bad")
    assert cli.run_cli(fn, "prog", ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert cli.run_cli(fn, "prog", ["--", "--debug"]) == 2          # after --: the child's argument
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.run_cli(fn, "prog", []) == 2
    assert "Traceback" in capsys.readouterr().err


def test_errors_are_bounded_and_torchrun_error_file(tmp_path, capsys, monkeypatch):
    def fn():
        raise ValueError("x" * 100_000)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "e.json"))
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    assert cli.run_cli(fn, "prog", [], distributed=True) == 2
    assert capsys.readouterr().err == ""                            # rank 1 stays quiet
    data = json.loads((tmp_path / "e.json").read_text())
    assert len(data["message"]["message"]) < 2200                   # the line is bounded
    data["message"]["errorCode"] = 2                               # what torchrun's agent adds
    (tmp_path / "e.json").write_text(json.dumps(data))
    code, line = cli.read_torchelastic_error(str(tmp_path / "e.json"))
    assert code == 2 and line.startswith("prog: error: xxx")


@pytest.mark.multiproc
@pytest.mark.slow
def test_torchrun_failure_is_one_line_not_a_stack_per_rank(tmp_path):
    """Two CPU ranks hit the same bad input: rank 0 prints the line, no `[rankN]:` stacks, and
    `launch.py train` ends with that line and exit code 2 (from torchrun's error file)."""
    bad = tmp_path / "data.txt"
    bad.write_bytes(b"text\x00with NUL bytes\n")
    p = _variant(tmp_path, lambda d: (d["parallel"].update(dp=2, gpus_per_node=2),
                                      d["train"].update(data=[str(bad)], checkpoint_dir=str(tmp_path / "ck"))))
    r = _launch(["train", str(p)], timeout=600, env={"CUDA_VISIBLE_DEVICES": ""})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("int4_qat.train: error:")]
    assert r.returncode == 2, r.stderr[-4000:]
    assert "[rank0]" not in r.stderr and "[rank1]" not in r.stderr
    assert len(lines) == 2 and lines[0] == lines[1] and "looks binary (NUL bytes)" in lines[0]
    assert r.stderr.strip().splitlines()[-1] == lines[0]
