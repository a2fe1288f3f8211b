"""QuantScheme.apply through ModelOpt: our registered backend on a small HF-named torch model and on
a Megatron-Core GPTModel (CPU, gloo, one process), and how our INT4 compares with ModelOpt's own
INT4 block quantizer (INT4_BLOCKWISE_WEIGHT_ONLY_CFG)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from int4_qat.formats import QuantFormat
from int4_qat.modelopt_backend import (
    BACKEND_NAME,
    enabled_weight_quantizers,
    fake_quantized_weights,
    register_backend,
)
from int4_qat.scheme import QuantScheme, Scope

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

FORMATS = [QuantFormat.INT4, QuantFormat.MXFP4, QuantFormat.NVFP4]
H, I, E, V = 128, 128, 3, 32  # K = 128 for every linear: divisible by every group size


# ------------------------------------------------------------------ a small HF-named model
class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)  # the router, HF qwen3_moe naming
        self.experts = nn.ModuleList(_Expert() for _ in range(E))
        self.shared_experts = _Expert()

    def forward(self, x):  # dense soft routing, so every expert gets a gradient
        p = torch.softmax(self.gate(x), dim=-1)
        out = sum(p[..., e:e + 1] * self.experts[e](x) for e in range(E))
        return out + self.shared_experts(x)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(H, H, bias=False)
        self.o_proj = nn.Linear(H, H, bias=False)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(H)
        self.self_attn = _Attn()
        self.mlp = _MoE()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList([_Layer()])
        self.norm = nn.RMSNorm(H)


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Body()
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def _loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1).float(), ids.roll(-1, 1).flatten())


def _capture_quantizer_outputs(model):
    """Hook every enabled weight quantizer: its output IS the weight the module multiplies by."""
    seen, handles = {}, []
    for qname, q in enabled_weight_quantizers(model).items():
        handles.append(q.register_forward_hook(
            lambda m, i, o, qname=qname: seen.__setitem__(qname, o.detach().clone())))
    return seen, handles


# ------------------------------------------------------------------ config / registration
def test_backend_registration_is_idempotent():
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Overwriting existing backend" warning
        register_backend()
        register_backend()
    assert is_registered_quant_backend(BACKEND_NAME)


@pytest.mark.parametrize("fmt", FORMATS)
def test_modelopt_config_shape(fmt):
    s = QuantScheme(format=fmt, scope="experts")
    cfg = s.modelopt_config()
    assert cfg["algorithm"] is None  # no calibration
    assert cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    enabled = [e for e in cfg["quant_cfg"] if "cfg" in e]
    assert enabled and all(e["quantizer_name"].endswith("weight_quantizer") for e in enabled)
    assert all(e["cfg"]["backend"] == BACKEND_NAME for e in enabled)
    assert all("block_sizes" not in e["cfg"] for e in enabled)  # backend must see [N, K]
    args = enabled[0]["cfg"]["backend_extra_args"]
    assert args["format"] == fmt.value and args["group_size"] == s.group_size
    # the never-quantized globs come last, so they win over every enable entry
    tail = [e["quantizer_name"] for e in cfg["quant_cfg"][-9:]]
    assert "*router*" in tail and "*lm_head*" in tail and "*output_layer*" in tail
    mtq.config.QuantizeConfig(**cfg)  # ModelOpt accepts it
    assert len(QuantScheme(format=fmt, scope="all-linear").modelopt_config()["quant_cfg"]) > len(
        cfg["quant_cfg"])


# ------------------------------------------------------------------ torch model, every format
@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize("fmt", FORMATS)
def test_apply_on_torch_model(fmt, scope):
    torch.manual_seed(0)
    model = TinyMoE()
    reference = copy.deepcopy(model)
    scheme = QuantScheme(format=fmt, scope=scope)
    scheme.apply(model)

    quantizers = enabled_weight_quantizers(model)
    expected = 3 * E if scope is Scope.EXPERTS else 3 * E + 3 + 2  # + shared expert + attention
    assert len(quantizers) == expected
    all_tq = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    assert not [n for n, m in all_tq.items() if m.is_enabled and "weight_quantizer" not in n]
    assert not model.lm_head.weight_quantizer.is_enabled
    assert not model.model.layers[0].mlp.gate.weight_quantizer.is_enabled  # router
    for qname, q in quantizers.items():
        wname = qname.rsplit(".", 1)[0] + ".weight"
        assert scheme.quantizes_hf(wname)
        assert q.backend == BACKEND_NAME and q.backend_extra_args["name"] == wname
        assert q.amax is None  # weight-only, nothing calibrated
    for name, mod in model.named_modules():  # the config and quantizes_hf agree everywhere
        if isinstance(getattr(mod, "weight_quantizer", None), TensorQuantizer):
            assert mod.weight_quantizer.is_enabled == scheme.quantizes_hf(name), name

    ids = torch.randint(0, V, (2, 8))
    seen, handles = _capture_quantizer_outputs(model)
    loss = _loss(model, ids)
    loss.backward()
    for h in handles:
        h.remove()
    assert set(seen) == set(quantizers)
    fq = fake_quantized_weights(model)
    params = dict(model.named_parameters())
    for qname, used in seen.items():
        wname = qname.rsplit(".", 1)[0] + ".weight"
        w = params[wname]
        torch.testing.assert_close(used, scheme.fake_quantize(w.detach()), atol=0, rtol=0)
        torch.testing.assert_close(fq[wname], used, atol=0, rtol=0)
        assert not torch.equal(used, w.detach())
        assert w.grad is not None and w.grad.abs().sum() > 0 and torch.isfinite(w.grad).all()

    # STE: the latent weights get exactly the gradient an unquantized model gets when it holds
    # the fake-quantized values; the loss is the same too.
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for wname, value in fq.items():
            ref_params[wname].copy_(value)
    ref_loss = _loss(reference, ids)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-6, atol=1e-9)


def test_modelopt_state_round_trip_keeps_the_backend():
    """What a checkpoint does: save modelopt_state + state_dict, restore into a fresh model."""
    import pickle

    import modelopt.torch.opt as mto

    torch.manual_seed(0)
    model = TinyMoE()
    QuantScheme(format="nvfp4").apply(model)
    ids = torch.randint(0, V, (2, 8))
    blob = pickle.dumps((mto.modelopt_state(model), model.state_dict()))
    state, sd = pickle.loads(blob)
    fresh = mto.restore_from_modelopt_state(TinyMoE(), state)
    fresh.load_state_dict(sd)
    register_backend()
    restored = enabled_weight_quantizers(fresh)
    assert set(restored) == set(enabled_weight_quantizers(model))
    q = restored["model.layers.0.mlp.experts.2.down_proj.weight_quantizer"]
    assert q.backend == BACKEND_NAME and q.backend_extra_args == {
        "format": "nvfp4", "group_size": 16, "name": "model.layers.0.mlp.experts.2.down_proj.weight"}
    with torch.no_grad():
        torch.testing.assert_close(_loss(fresh, ids), _loss(model, ids), atol=0, rtol=0)


def test_backend_error_names_the_weight():
    model = TinyMoE()
    model.model.layers[0].mlp.experts[1].down_proj = nn.Linear(96, H, bias=False)
    QuantScheme(format="int4", group_size=64).apply(model)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.1\.down_proj\.weight"):
        model.model.layers[0].mlp.experts[1].down_proj(torch.randn(2, 96))


def test_scope_matching_nothing_is_refused():
    model = nn.Sequential(nn.Linear(H, H), nn.Linear(H, H))  # no expert names at all
    with pytest.raises(ValueError, match=r"int4 g128 amax/7 scope=experts: no parameter of "
                                         r"Sequential is in scope"):
        QuantScheme(scope="experts").apply(model)


# ------------------------------------------------------------------ Megatron-Core GPTModel (CPU)
NUM_LAYERS, NUM_EXPERTS = 2, 4


@pytest.fixture(scope="module")
def megatron_cpu():
    cpu = pytest.importorskip("int4_qat.compat.cpu")
    cpu.init_single_process_gloo(seed=1234)
    return cpu


def _gpt_moe(seed=1234):
    """Tiny Qwen3-MoE-like GPTModel: local spec, SequentialMLP experts + shared experts."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=H, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=2 * H, num_moe_experts=NUM_EXPERTS, moe_router_topk=2,
        moe_ffn_hidden_size=I, moe_shared_expert_intermediate_size=I,
        moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", qk_layernorm=True,
        add_bias_linear=False, gated_linear_unit=True, moe_router_dtype="fp64")
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False,
                                    qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=V,
                    max_sequence_length=32)


def _gpt_forward_backward(model, megatron_cpu, seq=16):
    ids = torch.randint(0, V, (2, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq).expand(2, seq)
    logits = model(ids, pos, megatron_cpu.causal_attention_mask(seq))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.roll(-1, 1).flatten())
    loss.backward()
    return loss


def _check_scope_agrees(model, scheme):
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "weight_quantizer", None), TensorQuantizer):
            assert mod.weight_quantizer.is_enabled == scheme.quantizes_megatron(name), name
            checked += 1
    return checked


@pytest.mark.parametrize("fmt", FORMATS)
def test_megatron_gpt_experts_scope(megatron_cpu, fmt):
    model = _gpt_moe()
    scheme = QuantScheme(format=fmt, scope="experts")
    scheme.apply(model)
    quantizers = enabled_weight_quantizers(model)
    assert len(quantizers) == NUM_LAYERS * NUM_EXPERTS * 2
    assert all(".mlp.experts.local_experts." in q for q in quantizers)
    assert _check_scope_agrees(model, scheme) > len(quantizers)  # shared/attn/output seen, off
    assert not model.output_layer.weight_quantizer.is_enabled
    router = model.decoder.layers[0].mlp.router
    assert not [n for n, m in router.named_modules() if isinstance(m, TensorQuantizer)
                and m.is_enabled]

    seen, handles = _capture_quantizer_outputs(model)
    loss = _gpt_forward_backward(model, megatron_cpu)
    for h in handles:
        h.remove()
    assert torch.isfinite(loss)
    assert set(seen) == set(quantizers)
    params = dict(model.named_parameters())
    fq = fake_quantized_weights(model)
    assert set(fq) == {q.rsplit(".", 1)[0] + ".weight" for q in quantizers}
    for qname, used in seen.items():
        wname = qname.rsplit(".", 1)[0] + ".weight"
        w = params[wname]
        torch.testing.assert_close(used, scheme.fake_quantize(w.detach()), atol=0, rtol=0)
        torch.testing.assert_close(fq[wname], used, atol=0, rtol=0)
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert router.weight.grad is not None  # the router trains, in full precision


def test_megatron_gpt_all_linear_scope(megatron_cpu):
    model = _gpt_moe()
    scheme = QuantScheme(format="int4", group_size=32, scope="all-linear")
    scheme.apply(model)
    quantizers = enabled_weight_quantizers(model)
    # per layer: 2 per routed expert + shared fc1/fc2 + linear_qkv/linear_proj
    assert len(quantizers) == NUM_LAYERS * (NUM_EXPERTS * 2 + 2 + 2)
    _check_scope_agrees(model, scheme)
    assert not model.output_layer.weight_quantizer.is_enabled
    loss = _gpt_forward_backward(model, megatron_cpu)
    assert torch.isfinite(loss)
    qkv = model.decoder.layers[1].self_attention.linear_qkv
    assert qkv.weight.grad is not None and qkv.weight.grad.abs().sum() > 0


def test_legacy_grouped_mlp_is_refused():
    # GroupedMLP needs the grouped_gemm CUDA package to build; the refusal only looks at types.
    from megatron.core.transformer.moe.experts import GroupedMLP

    experts = GroupedMLP.__new__(GroupedMLP)
    nn.Module.__init__(experts)
    model = nn.Module()
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([nn.Module()])
    model.decoder.layers[0].mlp = nn.Module()
    model.decoder.layers[0].mlp.experts = experts
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.experts: legacy .*GroupedMLP"):
        QuantScheme().apply(model)


# ------------------------------------------------------------------ vs ModelOpt's built-in INT4
# ModelOpt INT4_BLOCKWISE_WEIGHT_ONLY_CFG (block_sizes {-1: G}), CPU path
# (modelopt/torch/quantization/tensor_quant.py _tensor_quant):
#   amax per group from *max calibration*, stored once (static: later weight updates keep it);
#   w' = clamp(round_half_even(w * (7 / amax)), -8, 7) / (7 / amax), all in float32, then cast.
# Ours (int4_qat/formats/int4.py, rule amax/7):
#   s = bf16(max(amax / 7, 1e-5)) recomputed from the live weight every forward;
#   w' = bf16(clamp(round_half_even(w / s), -7, 7) * s), cast to w.dtype.
# They coincide exactly when every group's amax is 7 * 2^k (scale exact in bf16, reciprocal exact);
# otherwise the bf16 scale (<= 2^-8 relative), the bf16 product, and the rare code flip differ.
def _modelopt_int4(w, group):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    for entry in cfg["quant_cfg"]:
        if entry["quantizer_name"] == "*weight_quantizer":
            entry["cfg"]["block_sizes"] = {-1: group, "type": "static"}
    model = mtq.quantize(nn.Sequential(lin), cfg, forward_loop=None)
    return model[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_equals_modelopt_where_conventions_coincide(dtype):
    g = 128
    torch.manual_seed(0)
    w = torch.randn(64, 512)
    wg = w.view(64, -1, g)
    k = torch.randint(-12, -4, (64, 512 // g, 1)).float()
    wg = wg / wg.abs().amax(-1, keepdim=True) * (7 * 2.0 ** k)  # group amax = 7 * 2^k (exact)
    w = wg.reshape(64, 512).to(dtype)
    assert torch.equal(w.float().view(64, -1, g).abs().amax(-1, keepdim=True), 7 * 2.0 ** k)
    lin = _modelopt_int4(w, g)
    with torch.no_grad():
        theirs = lin.weight_quantizer(lin.weight)
    ours = QuantScheme(group_size=g).fake_quantize(w)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert not torch.equal(ours, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_vs_modelopt_measured_differences(dtype):
    g, n, kdim = 128, 256, 1024
    torch.manual_seed(0)
    w = (torch.randn(n, kdim) * 0.02).to(dtype)
    lin = _modelopt_int4(w, g)
    with torch.no_grad():
        theirs = lin.weight_quantizer(lin.weight).float()
    scheme = QuantScheme(group_size=g)
    ours = scheme.fake_quantize(w).float()
    q = scheme.quantize(w)
    amax = w.float().view(n, -1, g).abs().amax(-1)
    torch.testing.assert_close(lin.weight_quantizer.amax.view(n, -1).float(), amax)  # same amax
    # 1. scale: ours is amax/7 rounded to bf16 (relative error <= 2^-8), theirs stays fp32
    rel_scale = ((q.scale.float() - amax / 7).abs() / (amax / 7))
    assert 0 < rel_scale.max() <= 2.0 ** -8
    # 2. codes: theirs recovered from the output; both grids are effectively [-7, 7]
    their_codes = torch.round(theirs.view(n, -1, g) * (7 / amax).unsqueeze(-1))
    our_codes = q.codes.float().view(n, -1, g)
    assert their_codes.abs().max() <= 7 and our_codes.abs().max() <= 7  # -8 never used
    flips = their_codes != our_codes
    flip_frac = flips.float().mean().item()
    assert 0 < flip_frac < 0.01  # measured ~0.3%: values within 2^-8 of a rounding boundary
    assert (their_codes - our_codes).abs().max() == 1
    # 3. values: same code -> differ by the scale rounding + one bf16 rounding (<= 2^-7 rel.);
    #    flipped code -> by about one step
    d = (ours - theirs).view(n, -1, g).abs()
    same_nonzero = ~flips & (our_codes != 0)
    rel = d[same_nonzero] / theirs.view(n, -1, g).abs()[same_nonzero]
    assert rel.max() <= 2.0 ** -7
    step = (amax / 7).unsqueeze(-1).expand_as(d)
    assert (d / step).max() <= 1 + 7 * 2.0 ** -7
    print(f"\n[{dtype}] ours vs ModelOpt INT4 g{g}: elements differing "
          f"{(d != 0).float().mean():.2%}, code flips {flip_frac:.3%}, max same-code rel diff "
          f"{rel.max():.2e}, max |diff| / step {(d / step).max():.3f}")


def test_modelopt_int4_amax_is_frozen_ours_follows_the_weight():
    g = 128
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.02
    lin = _modelopt_int4(w, g)
    scheme = QuantScheme(group_size=g)
    with torch.no_grad():
        lin.weight.mul_(2)  # e.g. an optimizer step after calibration
        theirs = lin.weight_quantizer(lin.weight)
        ours = scheme.fake_quantize(lin.weight)
    # ModelOpt keeps the calibrated amax: everything beyond it saturates, at +7 and at -8 steps
    # (its grid is [-8, 7]; -8 is unreachable while amax is current, reached once it is stale)
    amax_old = w.view(32, -1, g).abs().amax(-1, keepdim=True)
    tg = theirs.view(32, -1, g)
    assert (tg <= amax_old * (1 + 1e-6)).all() and (tg >= -amax_old * 8 / 7 * (1 + 1e-6)).all()
    assert (tg <= -amax_old * 8 / 7 * (1 - 1e-6)).any()
    # ours recomputes the scale: doubling w doubles the bf16 scale exactly, same codes
    torch.testing.assert_close(ours, 2 * scheme.fake_quantize(w), atol=0, rtol=0)


# ------------------------------------------------------------------ HF transformers fused experts
def _tiny_hf(model_type):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=V, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32)
    if model_type == "qwen3_moe":  # transformers 5: Qwen3MoeExperts, gate_up_proj [E, 2I, H]
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=64,
                                          moe_intermediate_size=64, num_experts=4,
                                          num_experts_per_tok=2)
    else:  # GptOssExperts: gate_up_proj [E, H, 2I] (x @ W), ModelOpt quantizes it transposed
        cfg = transformers.GptOssConfig(**common, intermediate_size=64, num_local_experts=4,
                                        num_experts_per_tok=2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(cfg).float()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_hf_fused_experts_nvfp4(model_type):
    model = _tiny_hf(model_type)
    scheme = QuantScheme(format="nvfp4", scope="experts")
    scheme.apply(model)
    quantizers = enabled_weight_quantizers(model)
    # qwen3_moe: one quantizer per expert and projection; gpt-oss: one per 3-D projection
    assert len(quantizers) == (2 * 4 if model_type == "qwen3_moe" else 2)
    seen, handles = _capture_quantizer_outputs(model)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids).logits.float().square().mean().backward()
    for h in handles:
        h.remove()
    assert set(seen) == set(quantizers)  # the forward really went through our backend
    fq = fake_quantized_weights(model)
    params = dict(model.named_parameters())
    assert set(fq) == {f"model.layers.0.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")}
    for wname, value in fq.items():
        w = params[wname].detach()
        assert value.shape == w.shape and params[wname].grad.abs().sum() > 0
        if model_type == "qwen3_moe":
            # per-expert 2-D slices: NVFP4's global scale is per expert, as in per-expert
            # checkpoint tensors (model.layers.L.mlp.experts.E.gate_proj.weight_global_scale)
            ref = torch.stack([scheme.fake_quantize(w[e]) for e in range(w.shape[0])])
            torch.testing.assert_close(seen[f"{wname}_weight_quantizers.0"], value[0],
                                       atol=0, rtol=0)
        else:
            # gpt-oss: the quantizer sees the whole transposed [E, N, K] stack; the NVFP4 global
            # scale is still one per 2-D matrix (per expert), so per-expert slices agree
            ref = scheme.fake_quantize(w.transpose(-1, -2).contiguous()).transpose(-1, -2)
            per_expert = torch.stack([scheme.fake_quantize(w[e].t().contiguous()).t()
                                      for e in range(w.shape[0])])
            torch.testing.assert_close(ref, per_expert, atol=0, rtol=0)
            torch.testing.assert_close(seen[f"{wname}_weight_quantizer"],
                                       value.transpose(-1, -2), atol=0, rtol=0)
        torch.testing.assert_close(value, ref, atol=0, rtol=0)
