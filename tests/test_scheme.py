"""QuantScheme: validation, (de)serialisation, delegation to int4_qat.formats, and scope matching
on real Megatron-Core and HF module / parameter names (no ModelOpt here; see
tests/test_modelopt_integration.py)."""
import warnings

import pytest
import torch

from int4_qat.formats import QuantFormat, get_format
from int4_qat.scheme import FIXED_GROUP_SIZES, QuantScheme, Scope

ALL_FORMATS = [QuantFormat.INT4, QuantFormat.MXFP4, QuantFormat.NVFP4]


# ------------------------------------------------------------------ construction / validation
def test_defaults_per_format():
    s = QuantScheme()
    assert (s.format, s.group_size, s.scope, s.scale_rule) == (
        QuantFormat.INT4, 128, Scope.EXPERTS, "amax/7")
    assert QuantScheme(format="mxfp4").group_size == 32
    assert QuantScheme(format="nvfp4").group_size == 16
    assert QuantScheme(format="mxfp4").scale_rule is None
    assert QuantScheme(format="int4", group_size=32, scale_rule="amax/7.5").describe() == (
        "int4 g32 amax/7.5 scope=experts")
    # strings normalise to the enums, and equal schemes compare equal / hash equal
    a = QuantScheme(format="int4", scope="all-linear")
    b = QuantScheme(format=QuantFormat.INT4, scope=Scope.ALL_LINEAR, group_size=128)
    assert a == b and hash(a) == hash(b)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        a.group_size = 32


@pytest.mark.parametrize("fmt", [QuantFormat.MXFP4, QuantFormat.NVFP4])
def test_fixed_group_size_is_enforced(fmt):
    fixed = FIXED_GROUP_SIZES[fmt]
    assert QuantScheme(format=fmt, group_size=fixed).group_size == fixed
    with pytest.raises(ValueError, match=rf"{fmt.value}.*fixed at {fixed}"):
        QuantScheme(format=fmt, group_size=128)
    with pytest.raises(ValueError, match="int4 only"):
        QuantScheme(format=fmt, scale_rule="amax/7")


@pytest.mark.parametrize("kwargs, match", [
    (dict(format="int8"), r"format='int8'.*allowed values: \['int4', 'mxfp4', 'nvfp4'\]"),
    (dict(scope="attention"), r"scope='attention'.*\['experts', 'all-linear'\]"),
    (dict(group_size=0), "group_size must be positive"),
    (dict(group_size=-32), "group_size must be positive"),
    (dict(group_size=True), "group_size must be an integer"),
    (dict(group_size=32.0), "group_size must be an integer"),
    (dict(scale_rule="amax/8"), r"scale_rule='amax/8'.*amax/7\.5"),
])
def test_bad_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantScheme(**kwargs)


@pytest.mark.parametrize("scheme", [
    QuantScheme(),
    QuantScheme(format="int4", group_size=32, scope="all-linear", scale_rule="amax/7.5"),
    QuantScheme(format="mxfp4", scope="experts"),
    QuantScheme(format="nvfp4", scope="all-linear"),
])
def test_dict_round_trip(scheme):
    d = scheme.to_dict()
    assert all(isinstance(v, (str, int, type(None))) for v in d.values())
    assert QuantScheme.from_dict(d) == scheme


def test_scheme_pickles():
    import pickle

    s = QuantScheme(format="nvfp4", scope="all-linear")
    assert pickle.loads(pickle.dumps(s)) == s


def test_from_dict_errors_and_defaults():
    assert QuantScheme.from_dict({"format": "nvfp4"}) == QuantScheme(format="nvfp4")
    with pytest.raises(ValueError, match=r"unknown quant scheme key\(s\) \['groupsize'\]"):
        QuantScheme.from_dict({"format": "int4", "groupsize": 64})
    with pytest.raises(ValueError, match="must be a mapping"):
        QuantScheme.from_dict(["int4"])


def test_recipe_quant_section_builds_the_same_scheme():
    recipe = pytest.importorskip("int4_qat.recipe")
    section = recipe.QuantSection
    q = section(format="int4", group_size=64, scope="all-linear", scale_rule="amax/7.5")
    assert q.scheme() == QuantScheme(format="int4", group_size=64, scope="all-linear",
                                     scale_rule="amax/7.5")
    assert section(format="mxfp4").scheme() == QuantScheme(format="mxfp4")


# ------------------------------------------------------------------ numerics are delegated
@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_and_fake_quantize_delegate_to_formats(fmt, dtype):
    torch.manual_seed(0)
    w = torch.randn(3, 64, 256, dtype=dtype)  # 3-D fused experts [E, N, K]
    scheme = QuantScheme(format=fmt, group_size=64 if fmt is QuantFormat.INT4 else None)
    mod = get_format(fmt)
    ref = mod.fake_quantize(w, scheme.group_size, **scheme.rule_kwargs)
    out = scheme.fake_quantize(w, name="x")
    assert out.dtype == dtype and out.shape == w.shape
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    q = scheme.quantize(w)
    assert q.fmt == fmt and q.group_size == scheme.group_size
    assert q.scale.shape == (3, 64, 256 // scheme.group_size)
    torch.testing.assert_close(scheme.dequantize(q, dtype), out, atol=0, rtol=0)
    assert not torch.equal(out, w)  # it did quantize


def test_scale_rule_reaches_the_numerics():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    a = QuantScheme(scale_rule="amax/7").quantize(w)
    b = QuantScheme(scale_rule="amax/7.5").quantize(w)
    assert a.codes.min() >= -7 and a.codes.max() <= 7
    assert b.codes.min() == -8 or b.codes.max() == 7  # 7.5 rule uses the [-8, 7] grid
    assert not torch.equal(a.scale, b.scale)


def test_served_rule_reaches_the_numerics():
    """served picks how the engine evaluates q*s: same codes and scales, different fp32 weight."""
    torch.manual_seed(2)
    w = torch.randn(16, 128) * 0.05
    marlin, ggml = QuantScheme(group_size=32), QuantScheme(group_size=32, served="exact")
    assert marlin.served == "bf16" and QuantScheme(format="nvfp4").served is None
    qa, qb = marlin.quantize(w), ggml.quantize(w)
    assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale)
    exact = (qb.codes.float().unflatten(-1, (4, 32)) * qb.scale.float().unsqueeze(-1)).flatten(-2)
    assert torch.equal(ggml.fake_quantize(w), exact) and torch.equal(ggml.dequantize(qb, torch.float32), exact)
    assert not torch.equal(marlin.fake_quantize(w), exact)  # fp32: bf16 rounding drops bits
    assert torch.equal(marlin.fake_quantize(w.bfloat16()), ggml.fake_quantize(w.bfloat16()))
    assert ggml.describe() == "int4 g32 amax/7 served=exact scope=experts"
    assert QuantScheme.from_dict(ggml.to_dict()) == ggml and ggml.to_dict()["served"] == "exact"
    args = [e["cfg"]["backend_extra_args"] for e in ggml.modelopt_config()["quant_cfg"] if "cfg" in e]
    assert args and all(a["served"] == "exact" for a in args)  # the training fake quant gets it
    with pytest.raises(ValueError, match=r"served='fp32' is not supported.*'bf16', 'exact'"):
        QuantScheme(served="fp32")
    with pytest.raises(ValueError, match="served='exact' applies to int4 only"):
        QuantScheme(format="mxfp4", served="exact")


def test_format_error_names_the_tensor():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="experts.3.down_proj"):
        QuantScheme(group_size=64).fake_quantize(w, name="model.layers.0.mlp.experts.3.down_proj")
    with pytest.raises(ValueError, match="layer7"):
        QuantScheme().fake_quantize(torch.tensor([[float("nan")] * 128]), name="layer7")


# ------------------------------------------------------------------ scope on real names
# Megatron-Core 0.16.1 names, as printed by GPTModel.named_modules() with the local spec
# (SequentialMLP + shared experts), TE spec (TEGroupedMLP), dense layers and MLA.
MEGATRON_EXPERTS = [
    "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1",
    "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2",
    "decoder.layers.11.mlp.experts.local_experts.127.linear_fc1",
    "decoder.layers.11.mlp.experts.local_experts.127.linear_fc2.weight",
    "decoder.layers.3.mlp.experts.linear_fc1",  # TEGroupedMLP
    "decoder.layers.3.mlp.experts.linear_fc2.weight7",  # TEGroupedLinear per-expert weight
]
MEGATRON_OTHER_LINEAR = [
    "decoder.layers.0.mlp.shared_experts.linear_fc1",
    "decoder.layers.0.mlp.shared_experts.linear_fc2.weight",
    "decoder.layers.0.mlp.linear_fc1",  # dense layer (first_k_dense_replace)
    "decoder.layers.0.mlp.linear_fc2",
    "decoder.layers.0.self_attention.linear_qkv",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.1.self_attention.linear_q_proj",
    "decoder.layers.1.self_attention.linear_q_down_proj",
    "decoder.layers.1.self_attention.linear_q_up_proj",
    "decoder.layers.1.self_attention.linear_kv_down_proj",
    "decoder.layers.1.self_attention.linear_kv_up_proj",
]
MEGATRON_NEVER = [
    "decoder.layers.0.mlp.router",
    "decoder.layers.0.mlp.router.weight",
    "decoder.layers.0.mlp.router.expert_bias",
    "embedding.word_embeddings",
    "embedding.word_embeddings.weight",
    "output_layer",
    "output_layer.weight",
    "decoder.final_layernorm",
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.pre_mlp_layernorm",
    "decoder.layers.0.self_attention.q_layernorm",
    "decoder.layers.1.self_attention.kv_layernorm.weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",  # TE fused norm
    "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.bias",
    "decoder.layers.0.mlp.experts.linear_fc1._extra_state",
    "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight_quantizer",
    "decoder.layers.0.self_attention.core_attention",
    "decoder.layers.0.mlp",
    "decoder.layers.0.mlp.experts",
]


@pytest.mark.parametrize("scope", list(Scope))
def test_megatron_scope(scope):
    s = QuantScheme(scope=scope)
    for n in MEGATRON_EXPERTS:
        assert s.quantizes_megatron(n), n
    for n in MEGATRON_OTHER_LINEAR:
        assert s.quantizes_megatron(n) == (scope is Scope.ALL_LINEAR), n
    for n in MEGATRON_NEVER:
        assert not s.quantizes_megatron(n), n


def _hf_param_names(model_type):
    """Real parameter names of a tiny HF model of ``model_type`` (built on the meta device)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)
    if model_type == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                          num_experts=4, num_experts_per_tok=2)
    elif model_type == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 2}, intermediate_size=64,
            moe_intermediate_size=32, first_k_dense_replace=1, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)
    else:
        cfg = transformers.GptOssConfig(**common, intermediate_size=32, num_local_experts=4,
                                        num_experts_per_tok=2)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _hf_expected(name, shape, scope):
    """Independent statement of the rules, by tensor role."""
    if name.endswith("bias"):  # gpt-oss expert biases are 2-D [E, N] but stay bf16
        return False
    if len(shape) < 2 or "norm" in name or "embed_tokens" in name or name.startswith("lm_head"):
        return False
    if ".mlp.gate." in name or ".mlp.router." in name:
        return False
    if ".mlp.experts." in name:
        return True
    return scope is Scope.ALL_LINEAR


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("scope", list(Scope))
def test_hf_scope_on_real_parameter_names(model_type, scope):
    params = _hf_param_names(model_type)
    s = QuantScheme(scope=scope)
    got = {n for n in params if s.quantizes_hf(n)}
    want = {n for n, shp in params.items() if _hf_expected(n, shp, scope)}
    assert got == want
    assert any(".mlp.experts." in n for n in got)  # the experts are in every scope
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in got)
    if scope is Scope.EXPERTS:
        assert all(".mlp.experts." in n for n in got)


HF_CHECKPOINT_NAMES = {  # on-disk (per-expert) names: Qwen3-MoE / DeepSeek-V3 / Kimi-K2 shards
    "model.layers.0.mlp.experts.0.gate_proj.weight": (True, True),
    "model.layers.0.mlp.experts.127.up_proj.weight": (True, True),
    "model.layers.60.mlp.experts.383.down_proj.weight": (True, True),
    "model.layers.0.mlp.experts.gate_up_proj": (True, True),  # gpt-oss / transformers-5 fused
    "model.layers.0.mlp.experts.down_proj": (True, True),
    "model.layers.0.mlp.experts.gate_up_proj_bias": (False, False),
    "model.layers.0.mlp.experts.gate_up_proj_blocks": (False, False),  # already-packed MXFP4
    "model.layers.3.mlp.shared_experts.down_proj.weight": (False, True),
    "model.layers.0.mlp.down_proj.weight": (False, True),
    "model.layers.0.self_attn.q_proj.weight": (False, True),
    "model.layers.0.self_attn.kv_b_proj.weight": (False, True),
    "model.layers.0.self_attn.o_proj": (False, True),
    "model.layers.0.mlp.gate.weight": (False, False),  # router
    "model.layers.0.mlp.gate.e_score_correction_bias": (False, False),
    "model.layers.0.mlp.router.weight": (False, False),
    "model.layers.0.mlp.shared_expert_gate.weight": (False, False),
    "model.embed_tokens.weight": (False, False),
    "lm_head.weight": (False, False),
    "model.norm.weight": (False, False),
    "model.layers.0.self_attn.q_a_layernorm.weight": (False, False),
}


@pytest.mark.parametrize("name, expected", list(HF_CHECKPOINT_NAMES.items()))
def test_hf_checkpoint_names(name, expected):
    experts, all_linear = expected
    assert QuantScheme(scope="experts").quantizes_hf(name) == experts
    assert QuantScheme(scope="all-linear").quantizes_hf(name) == all_linear


def test_empty_name_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        QuantScheme().quantizes_megatron("")
    with pytest.raises(ValueError, match="non-empty"):
        QuantScheme().quantizes_hf(None)
