"""tools/verify_export.py: consumers' readers agree with our fake quant, and tampering is caught."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from int4_qat.export import export_checkpoint
from int4_qat.export.verify import verify_export
from int4_qat.testing import make_tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {mt: str(make_tiny_hf_checkpoint(mt, root / mt, shards=2)) for mt in ("qwen3_moe", "deepseek_v3", "gpt_oss")}


@pytest.mark.parametrize("model,fmt,kw", [
    ("qwen3_moe", "int4", {"group_size": 32}),
    ("qwen3_moe", "nvfp4", {}),
    ("deepseek_v3", "mxfp4", {}),
    ("deepseek_v3", "int4", {"group_size": 32, "scope": "all-linear"}),
    ("gpt_oss", "mxfp4", {}),
])
def test_export_verifies_exactly(tiny, tmp_path, model, fmt, kw):
    out = str(tmp_path / "exp")
    export_checkpoint(tiny[model], out, fmt=fmt, progress=False, **kw)
    report = verify_export(tiny[model], out, logits=True)
    assert report.ok, report.table()
    # transformers' load of the export gives the *same* logits as the fake-quantized reference
    assert report.max_logit_diff == 0.0
    by = {c.name: c for c in report.checks}
    packed = by["packed (transformers gpt-oss)" if model == "gpt_oss" else "packed (compressed-tensors)"]
    assert (
        packed.count
        == {
            "qwen3_moe": 48,
            "deepseek_v3": 48 + 3 + 6 + 3 * 5 if "scope" in kw else 48,  # + dense MLP, shared, MLA
            "gpt_oss": 4,
        }[model]
    )


def _rewrite_export(out, name, fn):
    wm = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    path = os.path.join(out, wm[name])
    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    fn(t)
    save_file(t, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def int4_export(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("e") / "int4")
    export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", progress=False)
    return out


def _fresh(int4_export, tmp_path):
    import shutil

    d = str(tmp_path / "copy")
    shutil.copytree(int4_export, d)
    return d


def test_flipped_nibble_is_caught(tiny, int4_export, tmp_path):
    d = _fresh(int4_export, tmp_path)
    m = "model.layers.0.mlp.experts.2.up_proj"
    _rewrite_export(
        d,
        f"{m}.weight_packed",
        lambda t: t[f"{m}.weight_packed"].__setitem__((3, 1), t[f"{m}.weight_packed"][3, 1] ^ 0x10),
    )
    r = verify_export(tiny["qwen3_moe"], d, logits=False)
    assert not r.ok
    bad = {c.name: c.failures for c in r.checks if not c.ok}
    assert list(bad) == ["packed (compressed-tensors)"] and m in bad["packed (compressed-tensors)"][0]


def test_changed_copy_missing_tensor_and_ignore_are_caught(tiny, int4_export, tmp_path):
    d = _fresh(int4_export, tmp_path)
    n = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_export(d, n, lambda t: t[n].__setitem__((0, 0), t[n][0, 0] + 1))
    r = verify_export(tiny["qwen3_moe"], d, logits=False)
    assert [c.name for c in r.checks if not c.ok] == ["copied bytes"]
    # drop a tensor (from shard and index) and un-ignore the router
    n2 = "model.layers.0.mlp.experts.0.gate_proj.weight_scale"
    _rewrite_export(d, n2, lambda t: t.pop(n2))
    ip = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(ip))
    del idx["weight_map"][n2]
    json.dump(idx, open(ip, "w"))
    cp = os.path.join(d, "config.json")
    cfg = json.load(open(cp))
    cfg["quantization_config"]["ignore"] = [i for i in cfg["quantization_config"]["ignore"] if "gate" not in i]
    json.dump(cfg, open(cp, "w"))
    r = verify_export(tiny["qwen3_moe"], d, logits=False)
    failed = {c.name: c.failures for c in r.checks if not c.ok}
    assert any(n2 in f for f in failed["names/index"])
    assert any("model.layers.0.mlp.gate is not packed but not ignored" in f for f in failed["ignore list"])


def test_scheme_mismatch_is_caught_and_cli_exit_codes(tiny, int4_export, tmp_path):
    d = _fresh(int4_export, tmp_path)
    mp = os.path.join(d, "int4_qat_export.json")
    meta = json.load(open(mp))
    meta["scheme"]["scale_rule"] = "amax/7.5"  # the server's weights are not what training saw
    json.dump(meta, open(mp, "w"))
    r = verify_export(tiny["qwen3_moe"], d, logits=False)
    assert [c.name for c in r.checks if not c.ok] == ["packed (compressed-tensors)"]
    cli = [sys.executable, os.path.join(REPO, "tools/verify_export.py"), "--reference", tiny["qwen3_moe"]]
    p = subprocess.run(cli + ["--export", d, "--no-logits"], capture_output=True, text=True)
    assert p.returncode == 1 and "FAIL" in p.stdout and "served != fake_quantize" in p.stdout
    p = subprocess.run(cli + ["--export", int4_export], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "logits (transformers load)" in p.stdout and "PASS" in p.stdout
    p = subprocess.run(cli + ["--export", str(tmp_path / "missing")], capture_output=True, text=True)
    assert p.returncode == 2 and "error" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_training_checkpoint_export_train_infer_consistency(tmp_path, fmt):
    """QAT-trained Megatron checkpoint -> tools/export.py (scheme from recipe.yaml) -> transformers:
    the served logits are the training logits (fake quant on) to fp32 summation noise."""
    import _dist_worker as W
    from int4_qat import checkpoint as C
    from int4_qat import data as D
    from int4_qat.export.consistency import compare_logits, megatron_logits, train_infer_consistency
    from int4_qat.train import train

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in D.system_corpus(max_docs=50)))
    r = W.tiny_recipe("tiny-qwen3-moe", data=[str(corpus)], fmt=fmt, steps=2, warmup_steps=1, save_interval=2)
    train(r, cpu=True, out=tmp_path / "run", log=lambda s: None)
    ckpt = tmp_path / "run" / "ckpt"
    out = str(tmp_path / "export")
    with pytest.raises(ValueError, match="contradicts .*recipe.yaml quant.format"):
        export_checkpoint(str(ckpt), out, fmt="mxfp4", progress=False)
    export_checkpoint(str(ckpt), out, progress=False)  # format, group, scope, rule from recipe.yaml
    meta = json.load(open(os.path.join(out, "int4_qat_export.json")))
    assert meta["scheme"] == r.quant.scheme().to_dict()
    model, arch, _ = C.load_model_for_export(ckpt)
    tokens = torch.randint(0, arch.hf_config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    rep = train_infer_consistency(model, out, tokens)
    print(f"\n{fmt} train-infer: {rep}")
    assert rep.positions == 2 * 31 and rep.top1_agree == 1.0
    assert rep.mean_abs_dlogprob < 1e-5 and rep.kl_mean < 1e-8, str(rep)
    # the metric can fail: the same Megatron model without fake quant vs the export differs
    from int4_qat.export.consistency import export_logits
    import modelopt.torch.quantization as mtq

    mtq.disable_quantizer(model, "*")
    plain = compare_logits(megatron_logits(model, tokens), export_logits(out, tokens), tokens)
    print(f"{fmt} fake quant off vs export: {plain}")
    assert plain.mean_abs_dlogprob > 100 * max(rep.mean_abs_dlogprob, 1e-7), (str(plain), str(rep))
