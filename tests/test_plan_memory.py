"""int4_qat.planner / tools/plan_memory.py: parameter counts and sizes against published figures
and against real (tiny) transformers models; training-memory terms by hand."""
import json
import subprocess
import sys

import pytest
import torch

from int4_qat.planner import (GB, arch_shape, count_params, plan, serving_bytes, stage_layers,
                              training_memory)
from int4_qat.recipe import REPO_ROOT, Recipe
from int4_qat.testing import tiny_config

MODELS = REPO_ROOT / "recipes" / "models"


def _counts(model):
    cfg = json.loads((MODELS / model / "config.json").read_text())
    return count_params(arch_shape(cfg, model))


def _close(x, ref, tol=0.05):
    return abs(x - ref) <= tol * ref


# ------------------------------------------------------------- published sizes (within 5 %)
def test_qwen3_235b_published():
    c = _counts("qwen3-235b-a22b")
    assert _close(c.total, 235e9) and _close(c.active, 22e9)
    assert _close(serving_bytes(c, "bf16"), 470e9)              # 470 GB BF16 checkpoint


def test_qwen3_30b_published():
    c = _counts("qwen3-30b-a3b")
    assert _close(c.total, 30.5e9) and _close(c.active, 3.3e9)
    assert _close(serving_bytes(c, "bf16"), 61.1e9)


def test_kimi_k2_published():
    c = _counts("kimi-k2")
    assert _close(c.total, 1.03e12) and _close(c.active, 32e9)    # "1 T total, 32 B active"
    assert _close(serving_bytes(c, "bf16"), 2.05e12)               # ≈ 2 TB in BF16
    int4 = serving_bytes(c, "int4", scope="experts", group=32)     # Kimi-K2-Thinking layout
    assert 550e9 <= int4 <= 600e9
    assert _close(int4, 594e9)                                      # published K2-Thinking size
    assert int4 <= 8 * 141e9                                        # one 8 x H200 node (1128 GB)
    assert serving_bytes(c, "fp8") > 8 * 141e9 * 0.85               # FP8 needs two nodes


def test_gpt_oss_120b_published():
    c = _counts("gpt-oss-120b")
    assert _close(c.total, 116.83e9, 0.01)
    assert _close(c.active - c.embedding, 5.13e9)                   # OpenAI counts without embedding
    assert _close(serving_bytes(c, "mxfp4"), 60.8 * 2**30)         # the released MXFP4 checkpoint


def test_format_ordering_and_scope():
    c = _counts("qwen3-235b-a22b")
    sizes = {f: serving_bytes(c, f) for f in ("bf16", "fp8", "int4-g32", "int4-g128", "mxfp4", "nvfp4")}
    assert sizes["bf16"] > sizes["fp8"] > sizes["int4-g32"] > sizes["int4-g128"]
    assert sizes["int4-g128"] < sizes["mxfp4"] < sizes["nvfp4"] == pytest.approx(sizes["int4-g32"])
    # experts-only INT4 g128: routed experts at 0.5 + 2/128 B, everything else 2 B
    expect = (c.total - c.routed_linear) * 2 + c.routed_linear * (0.5 + 2 / 128)
    assert serving_bytes(c, "int4", "experts", 128) == pytest.approx(expect)
    assert serving_bytes(c, "int4", "all-linear", 128) < serving_bytes(c, "int4", "experts", 128)
    with pytest.raises(ValueError, match="unknown serving format 'int2'"):
        serving_bytes(c, "int2")


# ------------------------------------------------------------- exact, against transformers
def _tiny_cfgs():
    k2 = json.loads((MODELS / "kimi-k2" / "config.json").read_text())
    k2.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4,
              num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, vocab_size=100, max_position_embeddings=128)
    oss = json.loads((MODELS / "gpt-oss-120b" / "config.json").read_text())
    oss.pop("quantization_config", None)
    oss.update(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
               layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1)
    q3 = json.loads((MODELS / "qwen3-235b-a22b" / "config.json").read_text())
    q3.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=100, mlp_only_layers=[1])
    tiny = tiny_config()
    return {"deepseek_v3": k2, "gpt_oss": oss, "qwen3_moe": q3, "tiny-qwen3-moe": tiny}


@pytest.mark.parametrize("which", ["deepseek_v3", "gpt_oss", "qwen3_moe", "tiny-qwen3-moe"])
def test_counts_equal_transformers_model(which):
    """The formula (MLA, shared experts, dense first layers, biases, sinks, mlp_only_layers)
    counts exactly the parameters transformers builds from the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = _tiny_cfgs()[which]
    hf_cfg = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    # the checkpoint's tensors: parameters + persistent buffers (DeepSeek-V3's router
    # e_score_correction_bias is a buffer in transformers, a tensor in the checkpoint)
    real = sum(t.numel() for t in model.state_dict().values())
    c = count_params(arch_shape(cfg))
    assert c.total == real
    experts = sum(p.numel() for n, p in model.named_parameters()
                  if ".experts." in n and "shared" not in n)
    assert c.routed_experts == experts


# ------------------------------------------------------------- training memory
def test_stage_layers():
    assert stage_layers(94, 4, 23, 23) == [23, 24, 24, 23]
    assert stage_layers(61, 4, 15, 14) == [15, 16, 16, 14]
    assert stage_layers(48, 1) == [48] and stage_layers(48, 4) == [12] * 4
    with pytest.raises(ValueError, match="parallel.pp: 61 layers do not split evenly over pp=4"):
        stage_layers(61, 4)


def test_training_memory_terms_by_hand():
    """pp=tp=ep=1, fp32: every param local; weights 4 B, grads 4 B, Adam m+v 8 B / dp."""
    r = Recipe.load(REPO_ROOT / "recipes" / "tiny-moe.yaml")
    a = arch_shape(r.model.hf_config())
    c = count_params(a)
    m = training_memory(a, c, r.parallel, r.train, "experts")
    assert m.local_params_b * 1e9 == pytest.approx(c.total)
    assert m.weights_gb == pytest.approx(4 * c.total / GB)
    assert m.grads_gb == pytest.approx(4 * c.total / GB)
    assert m.optimizer_gb == pytest.approx(8 * c.total / GB)
    # fake-quant copies: routed expert weights in the weights' dtype (fp32 here), one copy shared by
    # every micro-batch of the step (fake_quant_cache)
    assert m.fake_quant_gb == pytest.approx(4 * c.routed_linear / GB)
    r.parallel.dp = 2
    r.parallel.gpus_per_node = 2
    m2 = training_memory(a, c, r.parallel, r.train, "experts")
    assert m2.optimizer_gb == pytest.approx(m.optimizer_gb / 2)
    assert m2.weights_gb == pytest.approx(m.weights_gb)


def test_more_expert_parallel_means_less_memory():
    r = Recipe.load(REPO_ROOT / "recipes" / "qwen3-235b-a22b-int4.yaml")
    a = arch_shape(r.model.hf_config())
    c = count_params(a)
    base = training_memory(a, c, r.parallel, r.train, "experts")
    r.parallel.nodes, r.parallel.dp = 16, 8
    wider = training_memory(a, c, r.parallel, r.train, "experts")    # expert-DP 2 shards Adam
    assert wider.optimizer_gb < base.optimizer_gb and wider.weights_gb == pytest.approx(base.weights_gb)
    r.parallel.ep = 32
    more_ep = training_memory(a, c, r.parallel, r.train, "experts")
    assert more_ep.weights_gb < base.weights_gb


@pytest.mark.parametrize("name", ["qwen3-235b-a22b-int4", "qwen3-30b-a3b-int4", "kimi-k2-int4",
                                  "gpt-oss-120b-mxfp4", "qwen3-30b-a3b-nvfp4"])
def test_big_recipes_fit_h200(name):
    p = plan(Recipe.load(REPO_ROOT / "recipes" / f"{name}.yaml"))
    t = p["training_per_gpu"]
    assert t["fits"]["141GB"] and 40 < t["total_gb"] <= 141
    parts = sum(t[k] for k in ("weights_gb", "grads_gb", "optimizer_gb", "fake_quant_gb",
                               "activations_gb", "overhead_gb"))
    assert parts == pytest.approx(t["total_gb"], abs=0.05)


def test_kimi_on_64_gpus_does_not_fit():
    """Megatron-LM's 64-GPU Kimi-K2 layout (TP 8, EP 64, PP 1) has no room for QAT's Adam states."""
    r = Recipe.load(REPO_ROOT / "recipes" / "kimi-k2-int4.yaml")
    r.parallel = r.parallel.model_copy(update=dict(pp=1, nodes=8, dp=8, first_stage_layers=None,
                                                   last_stage_layers=None))
    a = arch_shape(r.model.hf_config())
    m = training_memory(a, count_params(a), r.parallel, r.train, "experts")
    assert m.total_gb > 141 and not m.fits["141GB"]


def test_cli_json_and_readme_table():
    tool = str(REPO_ROOT / "tools" / "plan_memory.py")
    out = subprocess.run([sys.executable, tool, str(REPO_ROOT / "recipes" / "kimi-k2-int4.yaml"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    p = json.loads(out)
    assert p["recipe"] == "kimi-k2-int4" and p["serving"]["int4-g32"]["fits_8x141GB"]
    assert p["layout"]["stages"] == [15, 16, 16, 14]
    recipes = sorted(str(x) for x in (REPO_ROOT / "recipes").glob("*.yaml"))
    table = subprocess.run([sys.executable, tool, "--readme-table", *recipes],
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()
    assert table[0].startswith("| recipe |") and len(table) == 2 + len(recipes)
    assert any("`kimi-k2-int4`" in row and "594.2 GB" in row for row in table)
    text = subprocess.run([sys.executable, tool, str(REPO_ROOT / "recipes" / "tiny-moe.yaml")],
                          capture_output=True, text=True, check=True).stdout
    assert "fits" in text and "int4-g32" in text
    bad = subprocess.run([sys.executable, tool, str(REPO_ROOT / "recipes" / "nope.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("plan_memory: error: ") and "nope.yaml: does not exist" in bad.stderr
