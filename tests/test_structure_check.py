"""int4_qat.structure: the model is built at the recipe's real layout (fake process group, meta
tensors) and the scheme applied, so module-level refusals fail `make check-recipes`."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from int4_qat.recipe import REPO_ROOT
from int4_qat.structure import run_checks
from int4_qat.testing import tiny_config


def _tiny_variant(tmp_path, name, parallel, model_edit=None):
    d = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-moe.yaml").read_text())
    d["name"] = name
    d["parallel"].update(parallel)
    if model_edit is not None:
        cfg = tiny_config()
        model_edit(cfg)
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
        d["model"]["config"] = str(tmp_path / "model")
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)


TP2_EP2 = {"tp": 2, "ep": 2, "dp": 2, "sequence_parallel": True, "gpus_per_node": 4}


@pytest.mark.slow
def test_tp_ep_layout_builds_with_our_expert_module_and_fails_with_modelopts(tmp_path):
    path = _tiny_variant(tmp_path, "tpep", TP2_EP2)
    rep = run_checks([path])[path]
    assert rep.problems == []
    (s,) = rep.stages
    # 2 MoE layers x 4 local experts (8 / ep 2) with whole experts (etp 1), all quantized
    assert (s.layers, s.moe_layers, s.local_experts) == (2, 2, 4)
    assert (s.expert_fc1, s.expert_fc2) == ([256, 128], [128, 128])
    assert s.expert_quantizers == 2 * 4 * 2
    # ModelOpt 0.47's own SequentialMLP quant module refuses the same layout: the check reports it
    code = ("import sys, json; from int4_qat import modelopt_modules; "
            "modelopt_modules.install = lambda: None; from int4_qat.structure import check; "
            "print(json.dumps(check(sys.argv[1]).problems))")
    p = subprocess.run([sys.executable, "-c", code, path], cwd=REPO_ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=600)
    problems = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(problems) == 1 and "TP+EP is not supported by QuantSequentialMLP" in problems[0], problems
    assert "stage 0 of pp=1 (rank 0 of 4)" in problems[0]


def test_model_refusal_at_build_is_reported(tmp_path):
    # vocab 321 is not divisible by tp=2: the formula checks pass, build_model refuses
    path = _tiny_variant(tmp_path, "vocab", TP2_EP2, lambda c: c.update(vocab_size=321))
    from int4_qat.planner import check_recipe

    assert check_recipe(path) == []
    problems = check_recipe(path, structure=True)
    assert len(problems) == 1 and "vocab_size 321 is not divisible by TP=2" in problems[0], problems
    assert problems[0].startswith(f"{path}: structure: stage 0")


def test_launch_check_reports_what_was_built(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch", REPO_ROOT / "tools" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    path = _tiny_variant(tmp_path, "pp2", {**TP2_EP2, "pp": 2, "gpus_per_node": 8})
    assert launch.main(["check", path]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"ok  {path}  (built pipeline stage(s) 0,1: 1/1 layers, 4 local experts")
    assert launch.main(["check", "--no-build", path]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"ok  {path}  (export: ") and "built" not in out


@pytest.mark.slow
def test_shipped_recipes_build_at_their_layouts():
    """Every recipe in recipes/ builds at its real TP/PP/EP/ETP with the scheme applied, each stage
    holding the layers and the expert shards its layout promises (``make check-recipes``)."""
    paths = sorted(str(p) for p in (REPO_ROOT / "recipes").glob("*.yaml"))
    reports = run_checks(paths)
    for _path, rep in reports.items():
        assert rep.problems == [], rep.problems
        assert rep.stages
    q235 = reports[str(REPO_ROOT / "recipes" / "qwen3-235b-a22b-int4.yaml")]
    assert [(s.stage, s.layers) for s in q235.stages] == [(0, 23), (2, 24), (3, 23)]
    assert all((s.local_experts, s.expert_fc1, s.expert_fc2) == (8, [3072, 4096], [4096, 1536])
               for s in q235.stages)
    kimi = reports[str(REPO_ROOT / "recipes" / "kimi-k2-int4.yaml")]
    assert [(s.layers, s.moe_layers, s.local_experts) for s in kimi.stages] == \
        [(15, 14, 6), (16, 16, 6), (14, 14, 6)]
