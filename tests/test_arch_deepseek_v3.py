"""DeepSeek-V3 / Kimi-K2 on Megatron-Core (CPU, local spec): HF parity, import/export round trip,
config parsing and refusals. The tiny model is recipes/models/tiny-deepseek-v3 (1 dense layer +
2 MoE layers, MLA with q/kv LoRA, YaRN with mscale, 8 experts in 4 groups, 1 shared expert)."""
import json
import shutil

import pytest
import torch

from int4_qat.arch import build_model, export_hf_state_dict, import_hf_checkpoint, load_arch
from int4_qat.arch.hf_io import iter_checkpoint, write_hf_checkpoint
from int4_qat.compat import cpu as compat_cpu
from int4_qat.testing import make_tiny_hf_checkpoint, megatron_from_hf, rewrite_checkpoint, tiny_config_dir

SEQ = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """fp32 tiny checkpoint in 2 shards, with a non-zero e_score_correction_bias (transformers
    initialises that buffer to zeros, which would hide a mis-mapped bias)."""
    compat_cpu.init_single_process_gloo(seed=1234)
    out = make_tiny_hf_checkpoint("deepseek_v3", tmp_path_factory.mktemp("ds") / "hf",
                                  dtype=torch.float32, shards=2)
    gen = torch.Generator().manual_seed(7)
    return rewrite_checkpoint(out, lambda name, t: 0.05 * torch.randn(t.shape, generator=gen)
                              if name.endswith("e_score_correction_bias") else t)


@pytest.fixture(scope="module")
def model_and_arch(ckpt):
    return megatron_from_hf(ckpt)


def test_structure(model_and_arch):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    model, arch = model_and_arch
    layers = model.decoder.layers
    assert [isinstance(l.mlp, MoELayer) for l in layers] == [False, True, True]
    assert all(isinstance(l.self_attention, MLASelfAttention) for l in layers)
    assert isinstance(layers[0].self_attention.core_attention, compat_cpu.LocalCoreAttention)
    router = layers[1].mlp.router
    assert router.expert_bias is not None and router.expert_bias.abs().sum() > 0
    cfg = model.config
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk) == (4, 2)
    assert cfg.moe_router_topk_scaling_factor == 2.5 and cfg.moe_router_score_function == "sigmoid"
    assert cfg.moe_shared_expert_intermediate_size == 128


def test_hf_parity_logits(ckpt, model_and_arch):
    from transformers import AutoModelForCausalLM

    model, _ = model_and_arch
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ids = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids, torch.arange(SEQ).expand(2, -1), compat_cpu.causal_attention_mask(SEQ))
    diff = (got - want).abs().max().item()
    print(f"deepseek_v3 HF parity: max |logit diff| = {diff:.3e} (max |logit| {want.abs().max():.3f})")
    assert got.shape == want.shape == (2, SEQ, 320)
    assert diff <= 1e-4
    # The comparison has teeth: one perturbed routed-expert weight moves the logits.
    w = model.decoder.layers[2].mlp.experts.local_experts[0].linear_fc2.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(0.5)
        moved = (model(ids, torch.arange(SEQ).expand(2, -1), compat_cpu.causal_attention_mask(SEQ))
                 - want).abs().max().item()
        w.copy_(saved)
    assert moved > 1e-3


def test_import_export_round_trip(ckpt, model_and_arch):
    model, arch = model_and_arch
    exported = dict(export_hf_state_dict(model, arch))
    original = dict(iter_checkpoint(ckpt))
    assert sorted(exported) == sorted(original)
    bad = [n for n in original if not torch.equal(exported[n], original[n])]
    assert not bad, f"tensors changed in the round trip: {bad[:5]}"


def _config_with(tmp_path, **changes):
    cfg = json.loads((tiny_config_dir("deepseek_v3") / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"rope_interleave": False}, "rope_interleave"),
    ({"attention_bias": True}, "attention_bias"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"topk_group": 1}, "topk_group"),                     # 4 // 1 experts per group score != 2
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                       "truncate": False}}, "truncate"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                       "mscale": 0, "mscale_all_dim": 1.0}}, "mscale_all_dim"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                       "rope_magic": 1}}, "rope_magic"),
    ({"some_new_field": 1}, "some_new_field"),
])
def test_unsupported_fields_are_named(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        load_arch(_config_with(tmp_path, **changes))
    assert "config.json" in str(err.value)


def test_kimi_k2_hub_config_parses(tmp_path):
    """Kimi-K2's published config.json shape (model_type kimi_k2, hub rope_scaling layout,
    no expert groups): the mapping that build_model would use at full size."""
    kimi = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
        "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
        "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 131072,
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64,
        "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid",
        "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
    }
    (tmp_path / "config.json").write_text(json.dumps(kimi))
    arch = load_arch(tmp_path)
    tf, mla = arch.tf_kwargs, arch.extras["mla"]
    assert arch.model_type == "kimi_k2" and arch.num_experts == 384
    assert tf["moe_layer_freq"] == [0] + [1] * 60
    assert tf["moe_router_topk"] == 8 and tf["moe_router_topk_scaling_factor"] == 2.827
    assert "moe_router_num_groups" not in tf          # n_group=1: no group limit
    assert mla == dict(q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                       v_head_dim=128, rotary_percent=1.0, rope_type="yarn", rotary_base=50000.0,
                       rotary_scaling_factor=32.0, original_max_position_embeddings=4096,
                       beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    names = {r.hf[0] for r in arch.rules()}
    assert "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight" in names
    assert "model.layers.{layer}.mlp.gate.e_score_correction_bias" in names


def test_config_dir_and_checkpoint_agree(ckpt):
    """The hub-layout tiny config and the transformers-5 config.json written with the checkpoint
    (rope_parameters layout) parse to the same Megatron settings."""
    a, b = load_arch(tiny_config_dir("deepseek_v3")), load_arch(ckpt)
    assert a.tf_kwargs == b.tf_kwargs and a.extras == b.extras


def test_unmapped_checkpoint_tensor_is_named(tmp_path, ckpt, model_and_arch):
    model, arch = model_and_arch
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    tensors = list(iter_checkpoint(ckpt)) + [("model.layers.1.mlp.gate.extra_thing", torch.zeros(2))]
    write_hf_checkpoint(tensors, tmp_path)
    with pytest.raises(ValueError, match="extra_thing"):
        import_hf_checkpoint(model, arch, tmp_path)


def _parity(model, ckpt):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ids = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.eval()(ids, torch.arange(SEQ).expand(2, -1), compat_cpu.causal_attention_mask(SEQ))
        return (got - ref(ids).logits).abs().max().item()


def test_variant_plain_q_rope_no_groups_tied(tmp_path):
    """DeepSeek-V2-Lite-like corner: no q LoRA (linear_q_proj), default RoPE, no expert groups,
    no dense layer, tied embeddings -- parity, exact round trip, and every parameter trains."""
    cfg = json.loads((tiny_config_dir("deepseek_v3") / "config.json").read_text())
    cfg.update(q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=2,
               first_k_dense_replace=0, num_hidden_layers=2, tie_word_embeddings=True)
    del cfg["rope_scaling"]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    ckpt = make_tiny_hf_checkpoint(tmp_path / "cfg", tmp_path / "hf", dtype=torch.float32)
    arch = load_arch(ckpt)
    assert arch.extras["mla"]["rope_type"] == "rope" and "moe_router_num_groups" not in arch.tf_kwargs
    model = build_model(arch, use_te=False)
    import_hf_checkpoint(model, arch, ckpt)
    assert hasattr(model.decoder.layers[0].self_attention, "linear_q_proj")
    diff = _parity(model, ckpt)
    print(f"deepseek_v3 variant HF parity: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4
    original = dict(iter_checkpoint(ckpt))
    exported = dict(export_hf_state_dict(model, arch))
    assert "lm_head.weight" not in exported and sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n], original[n]) for n in original)
    model.train()
    ids = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(9))
    loss = model(ids, torch.arange(SEQ).expand(2, -1), compat_cpu.causal_attention_mask(SEQ),
                 labels=ids).float().mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("scope, expected", [("experts", 2 * 8 * 2), ("all-linear", 53)])
def test_quant_scheme_scopes(ckpt, scope, expected):
    """Fake quant lands where the Kimi-K2 convention says: routed experts only (not the shared
    expert, not the dense first layer) for ``experts``; every decoder linear for ``all-linear``
    (3 x 5 MLA projections + dense fc1/fc2 + 2 x (shared fc1/fc2 + 8 x 2 experts)); the tiny
    config keeps every in_features (incl. q/kv LoRA ranks 128) divisible by group 128."""
    from int4_qat.scheme import QuantScheme, enabled_weight_quantizers

    arch = load_arch(ckpt)
    model = build_model(arch, use_te=False)
    import_hf_checkpoint(model, arch, ckpt)
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    args = (ids, torch.arange(16)[None], compat_cpu.causal_attention_mask(16))
    with torch.no_grad():
        ref = model.eval()(*args)
        QuantScheme.from_dict({"format": "int4", "group_size": 128, "scope": scope}).apply(model)
        out = model(*args)
    names = list(enabled_weight_quantizers(model))
    assert len(names) == expected
    assert not any("router" in n or "shared_experts" in n for n in names) or scope == "all-linear"
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3


def test_mtp_layer_tensors_are_skipped(tmp_path, ckpt, model_and_arch):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the last decoder layer
    (model.layers.{num_hidden_layers}.*): import ignores it and the model is unchanged."""
    model, arch = model_and_arch
    config = json.loads((ckpt / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    mtp = [(f"model.layers.3.{n}", torch.ones(2)) for n in (
        "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
        "shared_head.head.weight", "embed_tokens.weight", "self_attn.q_a_proj.weight",
        "mlp.experts.0.gate_proj.weight")]
    write_hf_checkpoint(list(iter_checkpoint(ckpt)) + mtp, tmp_path, config=config)
    before = {n: t.clone() for n, t in model.state_dict().items() if "_extra_state" not in n}
    import_hf_checkpoint(model, load_arch(tmp_path), tmp_path)
    after = model.state_dict()
    assert all(torch.equal(t, after[n]) for n, t in before.items())
