"""Hostile / careless use of training checkpoints (issue 11, items 1, 4 and the train CLI of 6/7).

One tiny QAT run (2 steps, int4 g32) is saved once; every test works on copies of it. A refusal
must name the problem (both schemes, the field, the damaged file), happen before anything is
trained or written, and leave the checkpoint as it was.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _dist_worker as W
from int4_qat import checkpoint as C
from int4_qat import checksums
from int4_qat import data as D

REPO = W.REPO


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A corpus and a saved 2-step QAT run (int4 g32, tiny Qwen3-MoE)."""
    from int4_qat.train import train

    tmp = tmp_path_factory.mktemp("hostile-ckpt")
    corpus = tmp / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in D.system_corpus(max_docs=120)))
    r = W.tiny_recipe("tiny-qwen3-moe", data=[str(corpus)], steps=2, warmup_steps=1)
    res = train(r, cpu=True, out=tmp / "run", log=lambda s: None)
    return {"recipe": r, "corpus": corpus, "run": tmp / "run", "iter": res.checkpoint}


def _copy_run(base, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base["run"], dst)
    return dst


def _tree_digest(d: Path) -> dict:
    return {str(p.relative_to(d)): checksums.hash_file(p)[1] for p in sorted(d.rglob("*")) if p.is_file()}


def _variant(recipe, section: str, **kw):
    from int4_qat.recipe import Recipe

    d = recipe.to_dict()
    d[section].update({k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})
    return Recipe.from_dict(d)


def test_checksums_written_and_cover_every_file(base):
    it = base["iter"]
    files = checksums.read_checksums(it)
    on_disk = {str(p.relative_to(it)) for p in it.rglob("*") if p.is_file()} - set(checksums.EXCLUDED)
    assert set(files) == on_disk and any(f.endswith(".distcp") for f in files)
    assert C.verify_checkpoint_files(it) == len(files)
    st = json.loads((it / C.TRAIN_STATE).read_text())
    assert st["data"]["train_samples"] > 0 and ":" in st["data"]["fingerprint"]


@pytest.mark.parametrize("change, expect", [
    (("quant", {"group_size": 128}), ["quant: the checkpoint was trained with int4 g32 amax/7 scope=experts",
                                       "this run would use int4 g128 amax/7 scope=experts"]),
    (("quant", {"scope": "all-linear"}), ["scope=experts", "scope=all-linear"]),
    (("train", {"seed": 7}), ["train.seed: checkpoint 1234, this recipe 7"]),
    (("train", {"seq_length": 16}), ["train.seq_length: checkpoint 32, this recipe 16"]),
    (("train", {"precision": "bf16"}), ["train.precision"]),
])
def test_resume_with_changed_scheme_or_data_order_is_refused(base, tmp_path, change, expect):
    from int4_qat.train import Trainer

    run = _copy_run(base, tmp_path)
    before = _tree_digest(run)
    r = _variant(base["recipe"], change[0], **change[1])
    with pytest.raises(C.CheckpointError) as ei:
        Trainer(r, cpu=True, out=run, log=lambda s: None)
    msg = str(ei.value)
    for e in expect:
        assert e in msg, msg
    assert "--out NEW_DIR" in msg and f"--init-from {run / 'ckpt' / 'iter_0000002'}" in msg
    assert "A resume may change only: name, parallel*, export*, slurm*, model.checkpoint, train.steps" in msg
    assert _tree_digest(run) == before                      # nothing written or changed


def test_resume_with_no_quant_or_other_architecture_is_refused(base, tmp_path):
    from int4_qat.train import Trainer

    run = _copy_run(base, tmp_path)
    with pytest.raises(C.CheckpointError, match="trained with int4 g32.*would use no fake quant"):
        Trainer(base["recipe"], cpu=True, out=run, quant=False, log=lambda s: None)
    cfg_dir = tmp_path / "cfg"
    shutil.copytree(REPO / "recipes" / "models" / "tiny-qwen3-moe", cfg_dir)
    cfg = json.loads((cfg_dir / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    r = _variant(base["recipe"], "model", config=cfg_dir)
    with pytest.raises(C.CheckpointError, match=r"model.config: .* differs from the checkpoint's config.json "
                                                r"in rope_theta \(1000000.0 -> 10000.0\)"):
        Trainer(r, cpu=True, out=run, log=lambda s: None)


def test_resume_with_changed_data_content_is_refused(base, tmp_path):
    """Same path, other content: caught by the data fingerprint (the path alone would pass)."""
    from int4_qat.train import Trainer

    run = _copy_run(base, tmp_path)
    corpus = tmp_path / "docs.jsonl"
    docs = base["corpus"].read_text().splitlines()
    corpus.write_text("\n".join(docs[:-5]) + "\n")
    r = _variant(base["recipe"], "train", data=[str(corpus)])
    with pytest.raises(C.CheckpointError, match="train.data / model.tokenizer: the data differs"):
        Trainer(r, cpu=True, out=run, log=lambda s: None)
    # the same content at another path is the same data: allowed
    shutil.copy(base["corpus"], corpus)
    tr = Trainer(r, cpu=True, out=run, log=lambda s: None)
    assert tr.step == 2


def test_resume_may_change_the_schedule_and_really_uses_it(base, tmp_path):
    """train.steps / lr may change on resume, and the new values are the ones used (Megatron's
    scheduler would otherwise keep the checkpoint's values while recipe.yaml claimed the new)."""
    from int4_qat.train import train

    run = _copy_run(base, tmp_path)
    r = _variant(base["recipe"], "train", steps=4, lr=3e-2, min_lr=3e-2)   # constant 3e-2 after warmup
    res = train(r, cpu=True, out=run, log=lambda s: None)
    assert res.start_step == 2 and res.steps == [3, 4]
    assert res.lrs == pytest.approx([3e-2, 3e-2])                       # old schedule: <= 3e-3
    saved = (run / "ckpt" / "iter_0000004" / "recipe.yaml").read_text()
    assert "lr: 0.03" in saved and "steps: 4" in saved


def test_init_from_into_an_existing_run_is_refused(base, tmp_path):
    from int4_qat.train import Trainer

    run = _copy_run(base, tmp_path)
    with pytest.raises(ValueError, match=r"already holds a run \(latest iter_0000002\).*--out NEW_DIR"):
        Trainer(base["recipe"], cpu=True, out=run, init_from=base["iter"], log=lambda s: None)


def _damage(it: Path, how: str) -> str:
    shard = sorted(it.glob("__0_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 4096]
    shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.parametrize("how, word", [("flip", "corrupted"), ("truncate", "truncated")])
def test_damaged_checkpoint_is_named_on_resume_init_and_export(base, tmp_path, how, word):
    from int4_qat.train import Trainer

    run = _copy_run(base, tmp_path)
    it = run / "ckpt" / "iter_0000002"
    name = _damage(it, how)
    pattern = rf"checkpoint {it} is damaged \(1 file\(s\)\):\n  {it / name}: {word}"
    with pytest.raises(C.CheckpointError, match=pattern):           # resume (bare EOFError before)
        Trainer(base["recipe"], cpu=True, out=run, log=lambda s: None)
    with pytest.raises(C.CheckpointError, match=pattern):           # --init-from (trained on it before)
        Trainer(base["recipe"], cpu=True, out=tmp_path / "new", init_from=it, log=lambda s: None)
    with pytest.raises(C.CheckpointError, match=pattern):           # export
        C.load_model_for_export(it)


def test_checkpoint_without_checksums_loads_with_a_note(base, tmp_path):
    from int4_qat.train import Trainer

    run = _copy_run(base, tmp_path)
    (run / "ckpt" / "iter_0000002" / checksums.CHECKSUMS).unlink()
    notes = []
    tr = Trainer(base["recipe"], cpu=True, out=run, log=notes.append)
    assert tr.step == 2 and any(n.startswith("note:") and "cannot be verified" in n for n in notes)


def _env() -> dict:
    # not this process's MASTER_PORT: the in-process runs above hold that port
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _train_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "int4_qat.train", *args], cwd=REPO, capture_output=True,
                          text=True, env=_env(), timeout=600, **kw)


def test_train_cli_error_is_one_line_exit_2_and_debug_shows_the_stack(base, tmp_path):
    run = _copy_run(base, tmp_path)
    rpath = tmp_path / "r.yaml"
    _variant(base["recipe"], "quant", group_size=128).save(rpath)
    p = _train_cli(["--recipe", str(rpath), "--cpu", "--out", str(run)])
    err = [ln for ln in p.stderr.splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
    assert p.returncode == 2, p.stderr
    assert len(err) == 1 and err[0].startswith("int4_qat.train: error: cannot resume "), p.stderr
    assert "int4 g32" in err[0] and "int4 g128" in err[0] and "fix: train it as a new run" in err[0]
    assert "Traceback" not in p.stderr and "[rank" not in p.stderr
    p = _train_cli(["--recipe", str(rpath), "--cpu", "--out", str(run), "--debug"])
    assert p.returncode == 2 and "Traceback" in p.stderr and "CheckpointError" in p.stderr
    p = _train_cli(["--recipe", str(rpath), "--cpu", "--stop-after", "-1"])
    assert p.returncode == 2 and "--stop-after: must be >= 1, got -1" in p.stderr


@pytest.mark.slow
def test_checkpoint_save_on_a_size_limited_filesystem(base, tmp_path):
    """A file-size limit (ulimit -f) hit while saving: one line naming the directory, exit 2, no
    .tmp left behind, no latest (torch's writer subprocess reports it without an errno)."""
    rpath = tmp_path / "r.yaml"
    base["recipe"].save(rpath)
    cmd = (f"ulimit -f 1024; exec {sys.executable} -m int4_qat.train --recipe {rpath} --cpu "
           f"--out {tmp_path / 'run'} --steps 1")               # 1 MiB; the tensor files are ~6 MB
    p = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("int4_qat.train: error:")]
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert "saving checkpoint step 1 failed" in err[0] and "ulimit -f" in err[0]
    assert "Traceback" not in p.stderr
    ck = tmp_path / "run" / "ckpt"
    assert not (ck / "latest").exists() and not list(ck.glob("iter_*"))
