"""Training checkpoints saved at TP=2, EP=2, PP=2, EP=2+PP=2 and EP=2×DP=2 (torchrun, gloo, CPU),
for qwen3, qwen3_moe, deepseek_v3 and gpt_oss, exported three ways:

* streamed from the checkpoint files (one process; the product path);
* through the previous gather-to-one-process path (``int4_qat.testing.export_via_model``, the
  oracle: build the fp32 model, load, gather to an HF dir, export that);
* from the live model inside the saving torchrun job (``int4_qat.export.live_source``, collective).

All three must be byte-identical; ``verify_export`` (compressed-tensors' own decompression vs the
fake quant of the oracle's HF weights) must pass; and every layout of one model holds the same
weights (imported from one seeded HF checkpoint), so their exports are identical across layouts
too. Also: ``tools/export.py --nproc 2`` equals the one-process export, file for file.
"""
import json
import os
import subprocess
import sys

import pytest

from int4_qat.parallel import free_port
from int4_qat.export import export_checkpoint, verify_export
from int4_qat.testing import REPO_ROOT, export_via_model, make_tiny_hf_checkpoint
from test_export_stream import same_export

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

# name: (model dir, HF init key, format, scope, parallel, extra train settings)
JOBS = {
    2: {"qwen3-tp2": ("tiny-qwen3", "qwen3", "int4", "all-linear", {"tp": 2}, {}),
        "qwen3-pp2": ("tiny-qwen3", "qwen3", "nvfp4", "all-linear", {"pp": 2}, {}),
        "moe-ep2": ("tiny-qwen3-moe", "qwen3_moe", "int4", "experts", {"ep": 2, "dp": 2}, {}),
        "moe-pp2": ("tiny-qwen3-moe", "qwen3_moe", "nvfp4", "experts", {"pp": 2}, {}),
        "ds-ep2": ("tiny-deepseek-v3", "deepseek_v3", "int4", "experts", {"ep": 2, "dp": 2}, {}),
        "ds-pp2": ("tiny-deepseek-v3", "ds4", "int4", "experts", {"pp": 2}, {}),
        "oss-ep2": ("tiny-gpt-oss", "gpt_oss", "mxfp4", "experts", {"ep": 2, "dp": 2}, {}),
        "oss-pp2": ("tiny-gpt-oss", "gpt_oss", "mxfp4", "experts", {"pp": 2}, {}),
        "moe-ep2-bf16": ("tiny-qwen3-moe", "qwen3_moe", "int4", "experts", {"ep": 2, "dp": 2}, {"quant": False}),
        "oss-ep2-bf16": ("tiny-gpt-oss", "gpt_oss", "mxfp4", "experts", {"ep": 2, "dp": 2}, {"quant": False})},
    4: {"moe-ep2pp2": ("tiny-qwen3-moe", "qwen3_moe", "int4", "experts", {"ep": 2, "pp": 2, "dp": 2}, {}),
        "ds-ep2pp2": ("tiny-deepseek-v3", "ds4", "int4", "experts", {"ep": 2, "pp": 2, "dp": 2}, {}),
        "oss-ep2pp2": ("tiny-gpt-oss", "gpt_oss", "mxfp4", "experts", {"ep": 2, "pp": 2, "dp": 2}, {}),
        "moe-ep2dp2": ("tiny-qwen3-moe", "qwen3_moe", "int4", "experts", {"ep": 2, "dp": 4}, {"global_batch": 8}),
        "ds-ep2dp2": ("tiny-deepseek-v3", "deepseek_v3", "int4", "experts", {"ep": 2, "dp": 4}, {"global_batch": 8}),
        "oss-ep2dp2": ("tiny-gpt-oss", "gpt_oss", "mxfp4", "experts", {"ep": 2, "dp": 4}, {"global_batch": 8})},
}
WORLD = {name: w for w, jobs in JOBS.items() for name in jobs}
LOGITS = {"qwen3-tp2", "moe-ep2", "ds-ep2", "oss-ep2"}      # one transformers-load logits check per architecture


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Corpus + seeded tiny HF checkpoints (DeepSeek with 4 layers for an even PP=2 split)."""
    from int4_qat import data as D

    root = tmp_path_factory.mktemp("layouts")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in D.system_corpus(max_docs=40)))
    cfg = json.loads((REPO_ROOT / "recipes" / "models" / "tiny-deepseek-v3" / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (root / "ds4").mkdir()
    (root / "ds4" / "config.json").write_text(json.dumps(cfg))
    hf = {
        mt: str(make_tiny_hf_checkpoint(mt, root / "hf" / mt))
        for mt in ("qwen3", "qwen3_moe", "deepseek_v3", "gpt_oss")
    }
    hf["ds4"] = str(make_tiny_hf_checkpoint(str(root / "ds4"), root / "hf" / "ds4"))
    return {"root": root, "corpus": str(corpus), "hf": hf, "ds4": str(root / "ds4")}


@pytest.fixture(scope="module")
def saved(inputs):
    """Run tests/_export_worker.py once per world size; returns {job name: job dir}."""
    out = {}
    for world, jobs in JOBS.items():
        spec = []
        for name, (model, init, fmt, scope, par, extra) in jobs.items():
            extra = dict(extra)
            job = {
                "model": model,
                "fmt": fmt,
                "scope": scope,
                "parallel": {**par, "gpus_per_node": world},
                "hf": inputs["hf"][init],
                "out": str(inputs["root"] / name),
                "corpus": inputs["corpus"],
                "quant": extra.pop("quant", True),
                "train": extra,
                "config": inputs["ds4"] if init == "ds4" else None,
            }
            spec.append(job)
            out[name] = inputs["root"] / name
        path = inputs["root"] / f"spec{world}.json"
        path.write_text(json.dumps({"jobs": spec, "result": str(inputs["root"] / f"result{world}.json")}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(world),
                "--master-port",
                str(free_port()),
                str(REPO_ROOT / "tests" / "_export_worker.py"),
                str(path),
            ],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def exported(saved):
    """{job: (streamed export dir, oracle HF dir)}: stream + oracle for every job, once."""
    out = {}
    for name, d in saved.items():
        export_checkpoint(str(d / "ckpt"), str(d / "stream"), progress=False)
        export_via_model(d / "ckpt", d / "oracle", hf_dir=d / "oracle-hf")
        out[name] = d
    return out


@pytest.mark.parametrize("name", sorted(WORLD))
def test_stream_equals_oracle_and_live(exported, name):
    d = exported[name]
    assert same_export(d / "stream", d / "oracle") == []
    assert same_export(d / "stream", d / "live") == []
    rep = verify_export(str(d / "oracle-hf"), str(d / "stream"), logits=name in LOGITS)
    assert rep.ok, rep.table()
    live_meta = json.loads((d / "live" / "int4_qat_export.json").read_text())
    stream_meta = json.loads((d / "stream" / "int4_qat_export.json").read_text())
    assert live_meta["scheme"] == stream_meta["scheme"] and stream_meta["source"].endswith("iter_0000000")


def test_every_layout_exports_the_same_model(exported):
    """Same weights (one HF init) and scheme in different layouts -> the same bytes."""
    groups: dict = {}
    for name, (_model, init, fmt, scope, _, extra) in {**JOBS[2], **JOBS[4]}.items():
        groups.setdefault((init, fmt, scope, extra.get("quant", True)), []).append(name)
    compared = 0
    for names in groups.values():
        for other in names[1:]:
            assert same_export(exported[names[0]] / "stream", exported[other] / "stream") == [], (names[0], other)
            compared += 1
    assert compared >= 6


def test_two_processes_write_the_same_bytes(saved, tmp_path):
    """tools/export.py --nproc 2: the input is checked here, then two torchrun processes split
    the output shards; with small shards both write several, and the result equals one process."""
    ckpt = saved["ds-ep2pp2"] / "ckpt"
    one, two = tmp_path / "one", tmp_path / "two"
    export_checkpoint(str(ckpt), str(one), progress=False, max_shard_bytes=100_000)
    p = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "export.py"),
            "--input",
            str(ckpt),
            "--output",
            str(two),
            "--nproc",
            "2",
            "--max-shard-size",
            "100KB",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    n = len([f for f in os.listdir(one) if f.endswith(".safetensors")])
    assert n >= 4 and f"({n} shards, 2 process(es))" in p.stdout, p.stdout
    assert same_export(one, two, skip=()) == []
    assert not [x for x in os.listdir(tmp_path) if ".tmp-" in x]
