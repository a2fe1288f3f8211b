"""End to end through the launcher: tiny-moe trained with torchrun (CPU), then exported.

Same code path as ``make recipe-tiny-moe`` + ``make export-tiny-moe`` (the make targets only
resolve the recipe path), run on a copy of the recipe whose checkpoint and export dirs live in
tmp_path, so the repository's runs/ is left alone. Slow: a few minutes on 2 shared cores.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

from int4_qat.recipe import REPO_ROOT, Recipe

pytestmark = pytest.mark.slow

STEPS = 6


def _launch(*args, env=None):
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "launch.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env, timeout=1200)


def test_tiny_moe_train_then_export(tmp_path):
    d = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-moe.yaml").read_text())
    d["train"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    d["export"]["output_dir"] = str(tmp_path / "export")
    recipe = tmp_path / "tiny-moe.yaml"
    recipe.write_text(yaml.safe_dump(d, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DRY_RUN", None)

    r = _launch("train", str(recipe), "--", "--steps", str(STEPS), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torchrun --nproc-per-node 1 -m int4_qat.train" in r.stdout
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert latest == f"iter_{STEPS:07d}"
    saved = Recipe.load(tmp_path / "ckpt" / latest / "recipe.yaml")    # the resolved recipe
    assert saved.quant == Recipe.load(recipe).quant and saved.train.data == ["system"]

    r = _launch("export", str(recipe), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "export" / "int4"
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (4, 32, True)
    from safetensors import safe_open
    names = []
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    packed = [n for n in names if n.endswith("weight_packed")]
    # 2 layers x 8 experts x (gate, up, down), nothing else quantized (scope: experts)
    assert len(packed) == 2 * 8 * 3 and all(".mlp.experts." in n for n in packed)
    assert "model.layers.0.mlp.gate.weight" in names and "lm_head.weight" in names
