"""int4_qat.recipe: every recipe in recipes/ loads; bad recipes fail with the file, key and fix."""
import glob
from pathlib import Path

import pytest
import yaml

from int4_qat.recipe import (REPO_ROOT, QuantFormatName, QuantScope, Recipe, RecipeError,
                             SYSTEM_DATA)

RECIPES = sorted(glob.glob(str(REPO_ROOT / "recipes" / "*.yaml")))
TINY = REPO_ROOT / "recipes" / "tiny-moe.yaml"


def _write(tmp_path, data, name="bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_recipes_present():
    names = {Path(p).stem for p in RECIPES}
    assert {"tiny-moe", "qwen3-30b-a3b-int4", "qwen3-235b-a22b-int4", "kimi-k2-int4",
            "gpt-oss-120b-mxfp4", "qwen3-30b-a3b-nvfp4"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).stem)
def test_every_recipe_loads_and_round_trips(path):
    r = Recipe.load(path)
    assert r.name == Path(path).stem
    assert r.model.config.is_absolute() and r.model.config_json().is_file()
    assert r.train.checkpoint_dir.is_absolute() and r.export.output_dir.is_absolute()
    # the resolved YAML (saved in checkpoints) reloads to the same recipe
    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()), source="roundtrip")
    assert again == r
    text = Path(path).read_text()
    assert text.startswith("#") and ("make recipe-" in text or "make slurm-" in text), \
        "each recipe opens with the command lines that run it"


def test_relative_paths_resolve_against_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # a different working directory
    r = Recipe.load(TINY)
    assert r.model.config == REPO_ROOT / "recipes" / "models" / "tiny-qwen3-moe"
    assert r.train.checkpoint_dir == REPO_ROOT / "runs" / "tiny-moe" / "ckpt"
    assert r.train.data == [SYSTEM_DATA]


def test_defaults_filled():
    d = _tiny()
    d["train"].pop("checkpoint_dir")
    d["export"].pop("output_dir")
    d.pop("quant")
    r = Recipe.from_dict(d)
    assert r.train.checkpoint_dir == REPO_ROOT / "runs" / "tiny-moe" / "ckpt"
    assert r.export.output_dir == REPO_ROOT / "runs" / "tiny-moe" / "export"
    assert (r.quant.format, r.quant.group_size, r.quant.scope, r.quant.scale_rule.value) == \
        (QuantFormatName.INT4, 128, QuantScope.EXPERTS, "amax/7")
    d["quant"] = {"format": "nvfp4"}
    r = Recipe.from_dict(d)
    assert r.quant.group_size == 16 and r.quant.scale_rule is None and r.quant.served is None
    d["quant"] = {"format": "int4"}
    assert Recipe.from_dict(d).quant.served.value == "bf16"
    d["quant"] = {"format": "int4", "group_size": 32, "served": "exact"}
    assert Recipe.from_dict(d).quant.scheme().served == "exact"


@pytest.mark.parametrize(
    "mutate, match",
    [
        # unknown key: file, dotted key, allowed keys
        (
            lambda d: d["parallel"].update(tensor_parallel=2),
            r"bad\.yaml: parallel\.tensor_parallel: unknown key \(allowed: tp, pp, ep, etp, dp,",
        ),
        (lambda d: d.update(optimizer={"lr": 1}), r"bad\.yaml: optimizer: unknown key \(allowed: name, model,"),
        # wrong types (ints and bools are strict)
        (
            lambda d: d["parallel"].update(tp="4"),
            r"bad\.yaml: parallel\.tp: Input should be a valid integer \(got '4'\)",
        ),
        (lambda d: d["train"].update(steps=4.5), r"bad\.yaml: train\.steps: Input should be a valid integer"),
        (
            lambda d: d["parallel"].update(sequence_parallel="yes"),
            r"parallel\.sequence_parallel: Input should be a valid boolean",
        ),
        (lambda d: d["train"].update(data="corpus.txt"), r"train\.data: Input should be a valid list"),
        # bad enums name the allowed values
        (
            lambda d: d["quant"].update(format="int5"),
            r"bad\.yaml: quant\.format: Input should be 'int4', 'mxfp4' or 'nvfp4' \(got 'int5'\)",
        ),
        (lambda d: d["quant"].update(scope="attention"), r"quant\.scope: Input should be 'experts' or 'all-linear'"),
        (
            lambda d: d["quant"].update(scale_rule="amax/8"),
            r"quant\.scale_rule: Input should be 'amax/7' or 'amax/7.5'",
        ),
        (lambda d: d["train"].update(precision="fp16"), r"train\.precision: Input should be 'bf16' or 'fp32'"),
        (
            lambda d: d["export"].update(formats=["int4", "fp8"]),
            r"export\.formats\.1: Input should be 'int4', 'mxfp4' or 'nvfp4'",
        ),
        # missing and out-of-range values
        (lambda d: d["train"].pop("lr"), r"bad\.yaml: train\.lr: required key is missing"),
        (lambda d: d["parallel"].update(tp=0), r"parallel\.tp: Input should be greater than or equal to 1"),
        # format rules and cross-field rules
        (
            lambda d: d["quant"].update(format="mxfp4", group_size=128, scale_rule=None),
            r"quant\.group_size: mxfp4 has a fixed block of 32, got 128",
        ),
        (
            lambda d: d["quant"].update(format="nvfp4", group_size=None),
            r"quant\.scale_rule: only int4 takes a scale rule",
        ),
        (
            lambda d: d["quant"].update(format="mxfp4", group_size=None, scale_rule=None, served="exact"),
            r"quant\.served: only int4 takes a served rule",
        ),
        (lambda d: d["quant"].update(served="fp32"), r"quant\.served: Input should be 'bf16' or 'exact'"),
        (
            lambda d: d["train"].update(micro_batch=3),
            r"train\.global_batch \(8\) must be a multiple of train\.micro_batch \(3\)",
        ),
        (
            lambda d: d["export"].update(serving_tp=4, serving_ep=3),
            r"export\.serving_ep \(3\) must divide export\.serving_tp \(4\)",
        ),
        (lambda d: d["parallel"].update(first_stage_layers=1), r"parallel\.first_stage_layers .* need pp > 1"),
        (lambda d: d.update(name="Tiny MoE"), r"name 'Tiny MoE': use lower-case letters"),
        (lambda d: d["slurm"].update(time="two days"), r"slurm\.time: String should match pattern"),
    ],
)
def test_invalid_recipe_messages(tmp_path, mutate, match):
    d = _tiny()
    mutate(d)
    with pytest.raises(RecipeError, match=match) as ei:
        Recipe.load(_write(tmp_path, d))
    assert isinstance(ei.value, ValueError)


def test_yaml_1_1_quirks(tmp_path):
    p = tmp_path / "tiny-moe.yaml"
    text = TINY.read_text().replace("lr: 1.0e-3", "lr: 1e-3")  # PyYAML: a string
    p.write_text(text)
    assert Recipe.load(p).train.lr == 1e-3
    p.write_text(text.replace('slurm: {time: "00:30:00"}', "slurm: {time: 72:00:00}"))
    with pytest.raises(RecipeError, match=r"slurm\.time: got the number 259200; quote the time"):
        Recipe.load(p)


def test_all_errors_reported_at_once(tmp_path):
    d = _tiny()
    d["parallel"]["tp"] = "2"
    d["quant"]["format"] = "int3"
    d["model"]["weights"] = "x"
    with pytest.raises(RecipeError) as ei:
        Recipe.load(_write(tmp_path, d))
    lines = str(ei.value).splitlines()
    assert len(lines) == 3 and all(ln.startswith(str(tmp_path / "bad.yaml")) for ln in lines)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match=r"list\.yaml: a recipe is a YAML mapping"):
        Recipe.load(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"list\.yaml: line 2, column 1: not valid YAML"):
        Recipe.load(p)
    with pytest.raises(RecipeError, match=r"missing\.yaml: does not exist"):
        Recipe.load(tmp_path / "missing.yaml")


def test_missing_model_config_names_key(tmp_path):
    d = _tiny()
    d["model"]["config"] = str(tmp_path / "nowhere")
    r = Recipe.from_dict(d)
    with pytest.raises(ValueError, match=r"model\.config: .*nowhere/config\.json does not exist"):
        r.model.hf_config()


def test_enums_mirror_the_library():
    from int4_qat.formats import QuantFormat
    from int4_qat.scheme import Scope

    assert {f.value for f in QuantFormatName} == {f.value for f in QuantFormat}
    assert {s.value for s in QuantScope} == {s.value for s in Scope}


@pytest.mark.parametrize(
    "quant",
    [
        {"format": "int4", "group_size": 64, "scope": "all-linear", "scale_rule": "amax/7.5"},
        {"format": "mxfp4"},
        {"format": "nvfp4", "scope": "experts"},
    ],
)
def test_scheme_from_quant_section(quant):
    from int4_qat.formats import QuantFormat
    from int4_qat.scheme import QuantScheme, Scope

    d = _tiny()
    d["quant"] = quant
    r = Recipe.from_dict(d)
    s = r.quant.scheme()
    assert isinstance(s, QuantScheme)
    assert s.format == QuantFormat(quant["format"]) and s.group_size == r.quant.group_size
    assert s.scope == Scope(quant.get("scope", "experts"))
    if quant["format"] == "int4":
        assert s.scale_rule == "amax/7.5"


def test_system_data_expands_to_the_corpus():
    from int4_qat.data import system_corpus_paths

    r = Recipe.load(TINY)
    paths = r.train.data_paths()
    assert paths == [Path(p) for p in system_corpus_paths()] and len(paths) > 0


def test_assignment_is_validated():
    r = Recipe.load(TINY)
    r.train.steps = 4
    assert r.train.steps == 4
    with pytest.raises(ValueError):
        r.train.steps = "four"
