"""int4_qat.modelopt_backend.fake_quant_cache: one fake quant per weight per schedule call, the
same numbers and gradients as recomputing it for every micro-batch, and a recompute when the
weight changes."""
import warnings

import pytest
import torch
from torch import nn

from int4_qat import modelopt_backend as B
from int4_qat.scheme import QuantScheme


def _quantized_linear(scheme: QuantScheme, seed: int = 0) -> nn.Module:
    import modelopt.torch.quantization as mtq

    torch.manual_seed(seed)
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.experts = nn.ModuleList([nn.Module()])
    model.mlp.experts[0].down_proj = nn.Linear(128, 64, bias=False)
    B.register_backend()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, scheme.modelopt_config(), forward_loop=None)
    return model.mlp.experts[0].down_proj


@pytest.fixture
def calls(monkeypatch):
    n = {"n": 0}
    real = B.fused.fake_quantize

    def counting(*a, **k):
        n["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(B.fused, "fake_quantize", counting)
    return n


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_one_fake_quant_per_weight_same_outputs_and_grads(calls, fmt):
    scheme = QuantScheme(format=fmt, group_size=32 if fmt == "int4" else None)
    xs = [torch.randn(3, 128, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def run(cached: bool):
        lin = _quantized_linear(scheme)
        calls["n"] = 0
        ctx = B.fake_quant_cache() if cached else torch.enable_grad()
        with ctx:
            outs = [lin(x) for x in xs]          # four micro-batches
            for o in outs:                        # each micro-batch's own backward
                (o * o).sum().backward()
        return outs, lin.weight.grad.clone(), calls["n"]

    plain, g_plain, n_plain = run(False)
    cached, g_cached, n_cached = run(True)
    assert (n_plain, n_cached) == (4, 1)
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g_plain, g_cached)       # straight-through: the gradient reaches the weight


def test_changed_weight_is_recomputed_and_nothing_leaks_out(calls):
    lin = _quantized_linear(QuantScheme(format="int4", group_size=32))
    x = torch.randn(2, 128)
    with B.fake_quant_cache():
        lin(x)
        with torch.no_grad():
            lin.weight.mul_(3.0)                  # in-place: a new version of the parameter
        y = lin(x)
        assert calls["n"] == 2
    want = x @ QuantScheme(format="int4", group_size=32).fake_quantize(lin.weight.detach()).T
    assert torch.allclose(y, want, rtol=0, atol=1e-6)
    calls["n"] = 0
    lin(x)
    lin(x)
    assert calls["n"] == 2 and B._STEP_CACHE is None   # outside the context nothing is kept
