"""int4_qat.train on CPU: QAT lowers the loss in every format; TP=2 / EP=2 reproduce TP=1 / EP=1.

Tiny models from recipes/models (2 layers, hidden 128), byte tokenizer, real text from
``int4_qat.data.system_corpus`` (stdlib docstrings), fp32, gloo.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from int4_qat.parallel import free_port
import _dist_worker as W
from int4_qat import data as D

REPO = W.REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """~300 real documents (stdlib docstrings) as one .jsonl file."""
    p = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(p, "w") as f:
        for d in D.system_corpus(max_docs=300):
            f.write(json.dumps({"text": d}) + "\n")
    return str(p)


def _hf_init_dir(model: str, out: Path) -> str:
    """A TP=1 random init written as an HF safetensors checkpoint (what every layout imports)."""
    from int4_qat.arch import build_model, export_hf_state_dict, load_arch, write_hf_checkpoint
    from int4_qat.compat import cpu as C

    C.init_single_process_gloo(seed=7)
    arch = load_arch(REPO / "recipes" / "models" / model)
    m = build_model(arch, use_te=False)
    write_hf_checkpoint(export_hf_state_dict(m, arch), out, config=arch.hf_config)
    return str(out)


STEPS = 16


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One short run per format (None = the unquantized baseline), computed on first use."""
    from int4_qat.train import train

    cache = {}

    def get(fmt):
        if fmt not in cache:
            r = W.tiny_recipe("tiny-qwen3-moe", data=[corpus], fmt=fmt or "int4", steps=STEPS,
                              eval_interval=STEPS)
            cache[fmt] = train(r, cpu=True, out=tmp_path_factory.mktemp(f"run-{fmt}"), save=False,
                               quant=fmt is not None, log=lambda s: None)
        return cache[fmt]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "nvfp4", None])
def test_training_lowers_loss_on_real_text(fmt, runs):
    res = runs(fmt)
    first, last5 = res.losses[0], sum(res.losses[-5:]) / 5
    assert res.quantized == (fmt is not None) and len(res.losses) == STEPS
    assert 5.0 < first < 6.5            # ≈ ln(320) from a random init
    assert last5 < first - 1.5, (fmt, res.losses)
    assert res.eval_losses[STEPS] < first - 1.5
    from int4_qat.checkpoint import _unwrap
    from int4_qat.modelopt_backend import fake_quantized_weights

    inner = _unwrap(res.trainer.model)
    fq = fake_quantized_weights(inner)
    if fmt is None:
        assert fq == {}
        return
    # the quantizers really ran: every routed-expert weight (2 layers × 8 experts × fc1/fc2)
    # has a fake-quant that differs from it, and nothing else is quantized (scope experts)
    params = dict(inner.named_parameters())
    assert len(fq) == 2 * 8 * 2 and all("local_experts" in k for k in fq)
    assert all(not torch.equal(fq[k], params[k]) for k in fq)


@pytest.mark.slow
def test_metrics_log_and_lr_schedule(runs):
    """metrics.jsonl has every step, flags quantization, and the LR warms up then decays.
    (Step time QAT vs BF16 is measured side by side in bench/bench_qat_step.py, not here.)"""
    for fmt in (None, "int4", "mxfp4", "nvfp4"):
        res = runs(fmt)
        rows = [json.loads(x) for x in (res.trainer.out / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == list(range(1, STEPS + 1))
        assert all(x["quantized"] is (fmt is not None) and x["tokens_per_s"] > 0 for x in rows)
        assert rows[-1]["eval_loss"] == res.eval_losses[STEPS]
        assert res.lrs[0] < res.lrs[2] and res.lrs[-1] < res.lrs[2]     # warmup, then cosine
        assert len(res.step_times) == STEPS and all(t > 0 for t in res.step_times)


def test_main_cli_runs_and_saves(corpus, tmp_path):
    from int4_qat.train import main

    r = W.tiny_recipe("tiny-qwen3-moe", data=[corpus], steps=2)
    path = tmp_path / "r.yaml"
    r.save(path)
    res = main(["--recipe", str(path), "--cpu", "--out", str(tmp_path / "run"), "--steps", "2"])
    assert res.final_step == 2 and len(res.losses) == 2
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "iter_0000002"
    assert (tmp_path / "run" / "ckpt" / "iter_0000002" / "recipe.yaml").is_file()
    with pytest.raises(SystemExit) as ei:                 # argparse: exit 2, "must be >= 1"
        main(["--recipe", str(path), "--cpu", "--steps", "0"])
    assert ei.value.code == 2


def test_bad_layout_and_init_source_are_refused(corpus, tmp_path):
    from int4_qat.checkpoint import CheckpointError
    from int4_qat.train import Trainer

    bad = W.tiny_recipe("tiny-qwen3", data=[corpus], parallel={"tp": 2, "gpus_per_node": 2})
    with pytest.raises(ValueError, match=r"tp=2 × pp=1 × dp=1 = 2 != world size 1"):
        Trainer(bad, cpu=True, out=tmp_path, resume=False)
    ok = W.tiny_recipe("tiny-qwen3", data=[corpus], scope="all-linear")
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(ok, cpu=True, out=tmp_path, init_from=tmp_path / "missing", resume=False)



def _torchrun(spec: dict, tmp: Path, nproc: int = 2) -> dict:
    spec_path = tmp / "spec.json"
    spec["result"] = str(tmp / "result.pt")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(REPO / "tests" / "_dist_worker.py"),
           str(spec_path)]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return torch.load(spec["result"], weights_only=False)


def _compare_layouts(model, parallel, scope, tmp_path, corpus, *, save=False):
    hf = _hf_init_dir(model, tmp_path / "hf")
    ref_recipe = W.tiny_recipe(model, data=[corpus], scope=scope)
    ref = W.run_layout({"recipe": ref_recipe.to_dict(), "init_from": hf, "steps": 2,
                        "out": str(tmp_path / "ref")})
    rec = W.tiny_recipe(model, data=[corpus], scope=scope, parallel=parallel)
    got = _torchrun({"recipe": rec.to_dict(), "init_from": hf, "steps": 2, "save": save,
                     "out": str(tmp_path / "par")}, tmp_path)
    assert got["layout"]["world"] == 2 and ref["layout"]["world"] == 1
    assert all(got["layout"][k] == v for k, v in parallel.items() if k in ("tp", "pp", "ep", "dp"))
    assert abs(got["losses"][0] - ref["losses"][0]) < 1e-5, (got["losses"], ref["losses"])
    assert abs(got["losses"][1] - ref["losses"][1]) < 1e-4, (got["losses"], ref["losses"])
    assert got["fq_before"].keys() == ref["fq_before"].keys()
    for k, v in ref["fq_before"].items():          # same fake-quantized weights after gathering
        assert torch.equal(got["fq_before"][k], v), k
    return ref, got


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_dense_matches_tp1(tmp_path, corpus):
    # all-linear: attention linear_proj (K=128 → 64 per TP shard) and fc2 (K=256 → 128) are
    # row-parallel and quantized with group 32, so groups stay whole inside each shard.
    W.tiny_recipe("tiny-qwen3", data=[corpus])     # validates before spawning
    _compare_layouts("tiny-qwen3", {"tp": 2, "dp": 1, "gpus_per_node": 2}, "all-linear",
                     tmp_path, corpus)


@pytest.mark.multiproc
@pytest.mark.slow
def test_pp2_dense_matches_pp1(tmp_path, corpus):
    # one decoder layer per stage; activations cross stages through Megatron's p2p over gloo
    _compare_layouts("tiny-qwen3", {"pp": 2, "dp": 1, "gpus_per_node": 2}, "all-linear",
                     tmp_path, corpus)


@pytest.mark.multiproc
@pytest.mark.slow
def test_ep2_moe_matches_ep1_and_reshards_for_export(tmp_path, corpus):
    ref, got = _compare_layouts("tiny-qwen3-moe", {"ep": 2, "dp": 2, "gpus_per_node": 2}, "experts",
                                tmp_path, corpus, save=True)
    # the EP=2 checkpoint loads on one process at EP=1 with the trained fake-quant weights
    from int4_qat.checkpoint import load_model_for_export
    from int4_qat.testing import fake_quant_hf_state_dict

    model, arch, recipe = load_model_for_export(got["checkpoint"])
    assert recipe.parallel.ep == 2 and arch.num_experts == 8

    loaded = fake_quant_hf_state_dict(model, arch)
    for k, v in got["fq_after"].items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("model,fmt", [("tiny-deepseek-v3", "int4"), ("tiny-gpt-oss", "mxfp4")])
def test_other_architectures_train_save_and_reload(model, fmt, corpus, tmp_path):
    """DeepSeek-V3 (MLA, shared experts) and gpt-oss go through the same loop and checkpoint."""
    from int4_qat.checkpoint import _unwrap, load_model_for_export
    from int4_qat.modelopt_backend import fake_quantized_weights
    from int4_qat.train import train

    r = W.tiny_recipe(model, data=[corpus], fmt=fmt, steps=6, eval_interval=6)
    res = train(r, cpu=True, out=tmp_path, log=lambda s: None)
    assert sum(res.losses[-2:]) / 2 < res.losses[0] - 0.5, res.losses
    want = fake_quantized_weights(_unwrap(res.trainer.model))
    assert want and all("experts" in k for k in want)
    loaded, arch, _ = load_model_for_export(res.checkpoint)
    got = fake_quantized_weights(loaded)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
