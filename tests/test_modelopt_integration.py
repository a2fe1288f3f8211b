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


def test_backend_error_names_the_weight():
    model = TinyMoE()
    model.model.layers[0].mlp.experts[1].down_proj = nn.Linear(96, H, bias=False)
    QuantScheme(format="int4", group_size=64).apply(model)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.1\.down_proj\.weight"):
        model.model.layers[0].mlp.experts[1].down_proj(torch.randn(2, 96))


def test_scope_matching_nothing_is_refused():
    model = nn.Sequential(nn.Linear(H, H), nn.Linear(H, H))  # no expert names at all
    with pytest.raises(Exception, match="(?i)quantiz"):
        QuantScheme(scope="experts").apply(model)
