"""gpt-oss on Megatron-Core (CPU, local spec): HF parity, import/export round trip of the fused
stacked expert tensors, config parsing and refusals. The tiny model is recipes/models/tiny-gpt-oss
(2 layers: sliding window 8 then full attention, sinks, 4 biased experts top-2, YaRN)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from int4_qat.parallel import free_port
from int4_qat.arch import Rule, build_model, export_hf_state_dict, import_hf_checkpoint, load_arch
from int4_qat.arch.gpt_oss import gate_up_to_hf, gate_up_to_mcore
from int4_qat.arch.hf_io import iter_checkpoint
from int4_qat.compat import cpu as compat_cpu
from int4_qat.testing import make_tiny_hf_checkpoint, megatron_from_hf, rewrite_checkpoint, tiny_config_dir

SEQ = 32
LIMIT = 7.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """fp32 tiny checkpoint whose features all bite: gate_up weights x40 so the SwiGLU clamp at
    +-7 is active, attention sinks and router biases of order 1 (transformers draws them ~0.02)."""
    compat_cpu.init_single_process_gloo(seed=1234)
    out = make_tiny_hf_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "hf",
                                  dtype=torch.float32, shards=2)
    gen = torch.Generator().manual_seed(11)

    def bite(name, t):
        if name.endswith("experts.gate_up_proj"):
            return t * 40
        if name.endswith(("self_attn.sinks", "mlp.router.bias")):
            return torch.randn(t.shape, generator=gen)
        return t
    return rewrite_checkpoint(out, bite)


@pytest.fixture(scope="module")
def model_and_arch(ckpt):
    return megatron_from_hf(ckpt)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def _ids():
    return torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(SEQ).expand(2, -1), compat_cpu.causal_attention_mask(SEQ))


def test_structure(model_and_arch):
    model, _ = model_and_arch
    attn = [l.self_attention.core_attention for l in model.decoder.layers]
    assert all(isinstance(a, compat_cpu.LocalCoreAttention) for a in attn)
    assert [a.window for a in attn] == [(7, 0), None]          # HF sliding_window 8, then full
    assert all(a.softmax_offset.shape == (4,) for a in attn)
    cfg = model.config
    assert (cfg.glu_linear_offset, cfg.activation_func_clamp_value) == (1.0, LIMIT)
    assert cfg.yarn_rotary_scaling_factor == 4.0 and cfg.yarn_correction_range_round_to_int is False
    assert model.decoder.layers[0].mlp.router.bias is not None


def test_hf_parity_logits(model_and_arch, hf_model):
    model, _ = model_and_arch
    ids = _ids()
    # The clamp is exercised: capture the experts' inputs in HF and look at gate/up pre-activations.
    seen = {}
    def capture(module, args):
        seen["x"] = args[0]

    hook = hf_model.model.layers[0].mlp.experts.register_forward_pre_hook(capture)
    with torch.no_grad():
        want = hf_model(ids).logits
    hook.remove()
    experts = hf_model.model.layers[0].mlp.experts
    gate_up = seen["x"] @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (gate_up[:, 0::2] > LIMIT).any() and (gate_up[:, 1::2].abs() > LIMIT).any()

    got = _logits(model, ids)
    diff = (got - want).abs().max().item()
    print(f"gpt_oss HF parity: max |logit diff| = {diff:.3e} (max |logit| {want.abs().max():.3f})")
    assert got.shape == want.shape == (2, SEQ, 320)
    assert diff <= 1e-4

    # Teeth: without the sliding window, or with other sinks, the logits move.
    attn = model.decoder.layers[0].self_attention.core_attention
    attn.window = None
    no_window = (_logits(model, ids) - want).abs().max().item()
    attn.window = (7, 0)
    sinks = attn.softmax_offset
    saved = sinks.detach().clone()
    with torch.no_grad():
        sinks.add_(3.0)
        other_sinks = (_logits(model, ids) - want).abs().max().item()
        sinks.copy_(saved)
    assert no_window > 1e-3 and other_sinks > 1e-3
    assert (_logits(model, ids) - want).abs().max().item() <= 1e-4


def test_import_export_round_trip(ckpt, model_and_arch):
    model, arch = model_and_arch
    exported = dict(export_hf_state_dict(model, arch))
    original = dict(iter_checkpoint(ckpt))
    assert sorted(exported) == sorted(original)
    assert exported["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 128, 256)
    bad = [n for n in original if not torch.equal(exported[n], original[n])]
    assert not bad, f"tensors changed in the round trip: {bad[:5]}"


def test_gate_up_layout():
    """HF column 2j is gate j and 2j+1 up j; Megatron fc1 rows are [gate; up] (mlp.py glu)."""
    hidden, inter = 3, 4
    hf = torch.arange(hidden * 2 * inter, dtype=torch.float32).reshape(hidden, 2 * inter)
    fc1 = gate_up_to_mcore(None, [hf])
    assert fc1.shape == (2 * inter, hidden)
    for j in range(inter):
        assert torch.equal(fc1[j], hf[:, 2 * j]) and torch.equal(fc1[inter + j], hf[:, 2 * j + 1])
    assert torch.equal(gate_up_to_hf(None, fc1)[0], hf)
    bias = torch.arange(2 * inter, dtype=torch.float32)
    assert torch.equal(gate_up_to_mcore(None, [bias]), torch.tensor([0., 2, 4, 6, 1, 3, 5, 7]))
    assert torch.equal(gate_up_to_hf(None, gate_up_to_mcore(None, [bias]))[0], bias)


def test_stacked_rule_needs_expert_template():
    with pytest.raises(ValueError, match="stacked"):
        Rule(("decoder.layers.{layer}.mlp.router.weight",), ("model.layers.{layer}.mlp.router.weight",),
             stacked=True)


def _config_with(tmp_path, **changes):
    cfg = json.loads((tiny_config_dir("gpt_oss") / "config.json").read_text())
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"swiglu_alpha": 1.5}, "swiglu_alpha"),
    ({"attention_bias": False}, "attention_bias"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"sliding_window": None}, "sliding_window"),
    ({"experts_per_token": 3}, "experts_per_token"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                       "attention_factor": 1.2}}, "attention_factor"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config"),
    ({"use_fancy_attention": True}, "use_fancy_attention"),
])
def test_unsupported_fields_are_named(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        load_arch(_config_with(tmp_path, **changes))
    assert "config.json" in str(err.value)


def test_gpt_oss_20b_hub_config_parses(tmp_path):
    """openai/gpt-oss-20b's config.json shape (hub rope_scaling layout, truncate=false)."""
    cfg = {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
        "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
        "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn",
                         "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
        "swiglu_limit": 7.0, "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0",
        "use_cache": True, "vocab_size": 201088,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = load_arch(tmp_path)
    tf = arch.tf_kwargs
    assert tf["window_size"] == (127, 0) and tf["window_attn_skip_freq"] == [1, 0] * 12
    assert (tf["num_query_groups"], tf["kv_channels"], tf["num_moe_experts"]) == (8, 64, 32)
    assert arch.gpt_kwargs == {"position_embedding_type": "yarn", "rotary_base": 150000.0,
                               "rotary_percent": 1.0}
    assert arch.extras["yarn"] == dict(
        yarn_rotary_scaling_factor=32.0, yarn_original_max_position_embeddings=4096,
        yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=None, yarn_mscale_all_dim=None,
        yarn_correction_range_round_to_int=False)


def test_backward_reaches_sinks_and_expert_biases(ckpt):
    """A training step's gradient reaches every parameter, sinks and expert biases included."""
    arch = load_arch(ckpt)
    model = build_model(arch, use_te=False)
    import_hf_checkpoint(model, arch, ckpt)
    model.train()
    ids = _ids()
    loss = model(ids, torch.arange(SEQ).expand(2, -1), compat_cpu.causal_attention_mask(SEQ),
                 labels=ids).float().mean()
    loss.backward()
    def has_grad(p):
        return p.grad is not None and bool(p.grad.abs().sum())

    # Experts no token was routed to get no gradient; everything else must.
    no_grad = [n for n, p in model.named_parameters() if "local_experts" not in n and not has_grad(p)]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    for layer in model.decoder.layers:
        trained = [e for e in layer.mlp.experts.local_experts
                   if all(has_grad(p) for p in e.parameters())]
        assert len(trained) >= 2          # top-2 routing: at least two experts saw tokens


def test_quant_scheme_experts_scope(ckpt):
    """INT4 W4A16 fake quant on the 2 x 4 experts' fc1/fc2 only (never the router or attention)."""
    from int4_qat.scheme import QuantScheme, enabled_weight_quantizers

    arch = load_arch(ckpt)
    model = build_model(arch, use_te=False)
    import_hf_checkpoint(model, arch, ckpt)
    ids = _ids()
    with torch.no_grad():
        ref = _logits(model.eval(), ids)
        QuantScheme.from_dict({"format": "int4", "group_size": 128, "scope": "experts"}).apply(model)
        out = _logits(model, ids)
    names = list(enabled_weight_quantizers(model))
    assert len(names) == 16 and all("local_experts" in n for n in names)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


# ------------------------------------------------------------------ multi-process (torchrun)
@pytest.mark.multiproc
def test_ep2_pp2_match_single_process(ckpt, model_and_arch, tmp_path):
    """EP=2 (2 experts per rank) and PP=2 (1 layer per stage): logits equal the single-process
    model's within 1e-5, and the gathered export re-stacks the experts bit-identically."""
    model, _ = model_and_arch
    ref = _logits(model.eval(), _ids())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), __file__, str(ckpt), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for layout in ("ep2", "pp2"):
        result = torch.load(tmp_path / f"{layout}.pt")
        diff = (result["logits"] - ref).abs().max().item()
        print(f"gpt_oss {layout}: max |logits - single-process logits| = {diff:.3e}")
        assert diff <= 1e-5, layout
        assert result["export"] == ["identical", "identical"], layout


def _worker(hf_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    for layout, sizes in (("ep2", dict(ep=2)), ("pp2", dict(pp=2))):
        compat_cpu.init_model_parallel(**sizes, force=True)
        arch = load_arch(hf_dir)
        model = build_model(arch, use_te=False).eval()
        import_hf_checkpoint(model, arch, hf_dir)
        ids = _ids()
        if ps.get_pipeline_model_parallel_world_size() == 1:
            logits = _logits(model, ids)
        else:          # hand stage 0's hidden states to stage 1 by hand (no schedule needed)
            stage = ps.get_pipeline_model_parallel_rank()
            if stage == 1:
                hidden = torch.empty(SEQ, 2, arch.tf_kwargs["hidden_size"])
                dist.recv(hidden, src=0)
                model.set_input_tensor(hidden)
            logits = _logits(model, ids)
            if stage == 0:
                dist.send(logits.contiguous(), dst=1)
                logits = torch.empty(2, SEQ, arch.vocab_size)
                dist.recv(logits, src=1)
            else:
                dist.send(logits.contiguous(), dst=0)
        exported = dict(export_hf_state_dict(model, arch))
        original = dict(iter_checkpoint(hf_dir))
        ok = sorted(exported) == sorted(original) and all(
            torch.equal(exported[k], original[k]) for k in original)
        verdicts = [None, None]
        dist.all_gather_object(verdicts, "identical" if ok else "DIFFERENT")
        if dist.get_rank() == 0:
            torch.save({"logits": logits, "export": verdicts}, Path(out_dir) / f"{layout}.pt")
    compat_cpu.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
