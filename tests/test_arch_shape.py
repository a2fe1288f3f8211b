"""One reading of a model's sizes: int4_qat.arch.shape agrees with the builders (int4_qat.arch
parse functions), the planner and the layout checks, for every shipped config and every alias;
the Rule tables' shapes give exactly the tensors real checkpoints hold."""
import json

import pytest
import torch

from int4_qat.arch import expected_hf_tensors, load_arch
from int4_qat.arch.hf_io import HFCheckpointReader
from int4_qat.arch.shape import ALIASES, arch_shape
from int4_qat.parallel import validate_layout
from int4_qat.planner import count_params
from int4_qat.recipe import REPO_ROOT
from int4_qat.testing import make_tiny_hf_checkpoint, tiny_config

MODELS = REPO_ROOT / "recipes" / "models"
CONFIGS = sorted(p.parent.name for p in MODELS.glob("*/config.json"))


def _configs_with_aliases():
    for name in CONFIGS:
        cfg = json.loads((MODELS / name / "config.json").read_text())
        for alias, family in ALIASES.items():
            if family == ALIASES[cfg["model_type"]]:
                yield name, {**cfg, "model_type": alias}


def _builder_view(tf: dict) -> dict:
    return {"hidden": tf["hidden_size"], "layers": tf["num_layers"], "heads": tf["num_attention_heads"],
            "experts": tf.get("num_moe_experts") or 0, "top_k": tf.get("moe_router_topk") or 0,
            "moe_ffn": tf.get("moe_ffn_hidden_size") if tf.get("num_moe_experts") else None,
            "shared": tf.get("moe_shared_expert_intermediate_size") or None,
            "moe_layers": tuple(bool(x) for x in tf["moe_layer_freq"]) if tf.get("num_moe_experts")
            else (False,) * tf["num_layers"]}


@pytest.mark.parametrize("name,cfg", list(_configs_with_aliases()),
                         ids=[f"{n}-{c['model_type']}" for n, c in _configs_with_aliases()])
def test_shape_agrees_with_builder_for_every_config_and_alias(tmp_path, name, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = load_arch(tmp_path)
    s = arch.shape
    assert s == arch_shape(cfg)
    b = _builder_view(arch.tf_kwargs)
    assert b == {"hidden": s.hidden, "layers": s.layers, "heads": s.heads, "experts": s.num_experts,
                 "top_k": s.top_k if s.is_moe else 0, "moe_ffn": s.moe_ffn, "shared": s.shared_ffn,
                 "moe_layers": s.moe_layers}
    assert arch.vocab_size == s.vocab and arch.tie_embeddings == s.tied_embeddings
    if s.mla:
        mla = arch.extras["mla"]
        assert (mla["kv_lora_rank"], mla["qk_head_dim"], mla["qk_pos_emb_head_dim"], mla["v_head_dim"],
                mla["q_lora_rank"] or 0) == (s.mla["kv_lora_rank"], s.mla["qk_nope"], s.mla["qk_rope"],
                                             s.mla["v_head_dim"], s.mla["q_lora_rank"])
    else:
        assert (arch.tf_kwargs["num_query_groups"], arch.tf_kwargs["kv_channels"]) == (s.kv_heads, s.head_dim)
    if s.dense_ffn:
        assert arch.tf_kwargs["ffn_hidden_size"] == s.dense_ffn
    # the Rule table's shapes add up to the planner's parameter count (one source, two uses)
    total = sum(torch.Size(shp).numel() for shp in expected_hf_tensors(arch).required.values())
    assert total == count_params(s).total


def test_kimi_k2_alias_gets_the_moe_layout_checks():
    """The published Kimi-K2 config says model_type kimi_k2: every MoE rule must still apply."""
    cfg = {**json.loads((MODELS / "kimi-k2" / "config.json").read_text()), "model_type": "kimi_k2"}
    s = arch_shape(cfg)
    assert (s.num_experts, s.moe_ffn, s.shared_ffn, s.dense_ffn, s.q_dim) == (384, 2048, 2048, 18432, 8192)
    with pytest.raises(ValueError, match=r"num_experts=384 is not divisible by ep=5"):
        validate_layout({"tp": 1, "ep": 5, "dp": 5}, 5, cfg)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3", "deepseek_v3", "gpt_oss"])
def test_expected_tensors_equal_a_real_checkpoint(tmp_path, model_type):
    ckpt = make_tiny_hf_checkpoint(model_type, tmp_path / "hf")
    exp = expected_hf_tensors(load_arch(ckpt))
    with HFCheckpointReader(ckpt) as r:
        present = {n: (r.get(n).dtype, r.shape(n)) for n in r.keys()}
    assert exp.problems(present, "ckpt") == []
    assert set(exp.required) == {n for n in present if n in exp.required or not exp.is_optional(n)}
    # and each kind of damage is named
    name = next(n for n in exp.required if ".experts." in n or n.endswith("_proj.weight"))
    broken = dict(present)
    del broken[name]
    assert any(name in p and "missing" in p for p in exp.problems(broken, "ckpt"))
    broken = {**present, name: (torch.float32, (3, 5))}
    assert any(name in p and "shape [3, 5]" in p for p in exp.problems(broken, "ckpt"))
    broken = {**present, name: (torch.int8, present[name][1])}
    assert any(name in p and "int8" in p for p in exp.problems(broken, "ckpt"))
    extra = "model.layers.0.mlp.experts.99.up_proj.weight"
    assert any(extra in p and "not part" in p for p in exp.problems({**present, extra: present[name]}, "ckpt"))


def test_arch_shape_refuses_bad_configs():
    with pytest.raises(ValueError, match="must hold a JSON object"):
        arch_shape([1, 2])
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        arch_shape({"model_type": "llama"})
    cfg = tiny_config()
    with pytest.raises(ValueError, match="'hidden_size' must be an integer"):
        arch_shape({**cfg, "hidden_size": "128"})
    with pytest.raises(ValueError, match="lacks 'vocab_size'"):
        arch_shape({k: v for k, v in cfg.items() if k != "vocab_size"})
