"""int4_qat.checkpoint: exact resume, atomic saves, incomplete checkpoints refused, export load."""
import json
import shutil

import pytest
import torch

import _dist_worker as W
from int4_qat import checkpoint as C
from int4_qat import data as D

K = 3   # interrupted after K steps, resumed for 1 more


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted K+1 steps vs (K steps, save, resume in a fresh Trainer, 1 step)."""
    from int4_qat.train import train

    tmp = tmp_path_factory.mktemp("resume")
    corpus = tmp / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in D.system_corpus(max_docs=200)))
    r = W.tiny_recipe("tiny-qwen3-moe", data=[str(corpus)], steps=K + 1, warmup_steps=1)
    full = train(r, cpu=True, out=tmp / "full", save=False, log=lambda s: None)
    first = train(r, cpu=True, out=tmp / "split", stop_after=K, log=lambda s: None)
    second = train(r, cpu=True, out=tmp / "split", log=lambda s: None)
    return {"recipe": r, "full": full, "first": first, "second": second, "ckpt": tmp / "split" / "ckpt"}


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(runs):
    full, first, second = runs["full"], runs["first"], runs["second"]
    assert first.losses == full.losses[:K]                  # deterministic from the same seed
    assert second.start_step == K and second.steps == [K + 1]
    assert abs(second.losses[0] - full.losses[K]) < 1e-6, (second.losses, full.losses)
    assert abs(second.lrs[0] - full.lrs[K]) < 1e-12
    # the final weights agree too
    p_full = dict(C._unwrap(full.trainer.model).named_parameters())
    p_res = dict(C._unwrap(second.trainer.model).named_parameters())
    assert max((p_full[k] - p_res[k]).abs().max().item() for k in p_full) < 1e-6


@pytest.mark.slow
def test_checkpoint_layout_and_latest(runs):
    ck = runs["ckpt"]
    assert (ck / C.LATEST).read_text() == "iter_0000004\n"
    it = ck / "iter_0000004"
    meta = json.loads((it / C.TRAIN_STATE).read_text())
    assert meta["complete"] and meta["step"] == K + 1 and meta["quantized"]
    assert meta["consumed_samples"] == (K + 1) * runs["recipe"].train.global_batch
    assert (it / "recipe.yaml").is_file() and (it / "config.json").is_file()
    assert (it / "modelopt_state").is_dir() and (it / ".metadata").is_file()
    assert (ck / "iter_0000003").is_dir() and not list(ck.glob("*.tmp"))


@pytest.mark.slow
def test_interrupted_save_is_never_latest(runs):
    tr = runs["second"].trainer
    ck = runs["ckpt"]

    def crash(tmp_dir):
        raise RuntimeError("simulated crash between the tensor files and the metadata")

    with pytest.raises(RuntimeError, match="simulated crash"):
        C.save_checkpoint(ck, 7, tr.model, tr.optimizer, tr.scheduler, recipe=tr.recipe,
                          _after_tensors=crash)
    assert (ck / "iter_0000007.tmp" / ".metadata").is_file()   # tensors were written ...
    assert not (ck / "iter_0000007").exists()
    assert C.find_latest(ck) == ck / "iter_0000004"            # ... but latest did not move
    with pytest.raises(C.CheckpointError, match="interrupted save"):
        C.resolve_checkpoint(ck / "iter_0000007.tmp")
    # a directory that was renamed by hand but never completed is refused as well
    fake = ck / "iter_0000008"
    shutil.copytree(ck / "iter_0000007.tmp", fake)
    with pytest.raises(C.CheckpointError, match="incomplete"):
        C.resolve_checkpoint(fake)
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.resolve_checkpoint(ck / "iter_0000099")
    # resume picks the last complete one
    st = C.load_checkpoint(ck, tr.model, tr.optimizer, tr.scheduler)
    assert st["step"] == K + 1 and st["iter_dir"] == ck / "iter_0000004"
    shutil.rmtree(fake)
    # the next good save cleans the stale .tmp
    C.save_checkpoint(ck, K + 1, tr.model, tr.optimizer, tr.scheduler, recipe=tr.recipe)
    assert not list(ck.glob("*.tmp"))


def test_latest_pointing_outside_is_refused(tmp_path):
    (tmp_path / C.LATEST).write_text("../elsewhere\n")
    with pytest.raises(C.CheckpointError, match="does not name an iteration"):
        C.find_latest(tmp_path)
    (tmp_path / C.LATEST).write_text("iter_0000001\n")
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.find_latest(tmp_path)
    assert C.find_latest(tmp_path / "nothing") is None


@pytest.mark.slow
def test_load_model_for_export_and_init_from(runs, tmp_path):
    from int4_qat.modelopt_backend import fake_quantized_weights
    from int4_qat.train import Trainer

    trained = C._unwrap(runs["second"].trainer.model)
    want = dict(trained.named_parameters())
    model, arch, recipe = C.load_model_for_export(runs["ckpt"])
    assert arch.model_type == "qwen3_moe" and recipe.name == runs["recipe"].name
    got = dict(model.named_parameters())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    fq_got, fq_want = fake_quantized_weights(model), fake_quantized_weights(trained)
    assert fq_got.keys() == fq_want.keys() and len(fq_got) == 32
    assert all(torch.equal(fq_got[k], fq_want[k]) for k in fq_want)
    # --init-from CKPT: weights only, step 0, fresh optimizer
    tr = Trainer(runs["recipe"], cpu=True, init_from=runs["ckpt"], out=tmp_path, resume=False,
                 log=lambda s: None)
    assert tr.step == 0 and tr.init_source.startswith("ckpt:")
    got = dict(C._unwrap(tr.model).named_parameters())
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_bf16_checkpoint_initialises_qat(runs, tmp_path):
    """The usual flow: BF16 baseline → QAT from its checkpoint (weights only)."""
    from int4_qat.modelopt_backend import fake_quantized_weights
    from int4_qat.train import Trainer, train

    bf16 = train(runs["recipe"], cpu=True, out=tmp_path / "bf16", quant=False, steps=2,
                 log=lambda s: None)
    assert json.loads((bf16.checkpoint / C.TRAIN_STATE).read_text())["quantized"] is False
    want = dict(C._unwrap(bf16.trainer.model).named_parameters())
    qat = Trainer(runs["recipe"], cpu=True, init_from=tmp_path / "bf16" / "ckpt", out=tmp_path / "qat",
                  resume=False, log=lambda s: None)
    inner = C._unwrap(qat.model)
    got = dict(inner.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(fake_quantized_weights(inner)) == 32              # and fake quant is in place
    model, _, _ = C.load_model_for_export(bf16.checkpoint)       # a BF16 run exports unquantized
    assert fake_quantized_weights(model) == {}
    with pytest.raises(ValueError, match="a QAT checkpoint cannot initialise a --no-quant run"):
        Trainer(runs["recipe"], cpu=True, quant=False, init_from=runs["ckpt"], out=tmp_path / "x",
                resume=False, log=lambda s: None)
