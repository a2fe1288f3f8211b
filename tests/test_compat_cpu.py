"""int4_qat.compat.cpu: the Megatron-Core-on-CPU shims."""
import pytest
import torch

from int4_qat.compat import cpu


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    cpu.init_single_process_gloo(force=True)
    yield


def test_activate_refuses_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu, "_ACTIVE", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(RuntimeError, match="CUDA device is available"):
        cpu.activate()
    cpu.activate(force=True)          # explicit opt-in works
    assert cpu.is_active()


def test_activate_is_idempotent_and_deactivate_restores():
    from megatron.core.fusions import fused_softmax

    cpu.activate(force=True)
    patched = (torch.cuda.current_device, fused_softmax.get_default_causal_mask)
    cpu.activate(force=True)
    assert (torch.cuda.current_device, fused_softmax.get_default_causal_mask) == patched
    assert torch.cuda.current_device() == torch.device("cpu")
    cpu.deactivate()
    try:
        assert not cpu.is_active()
        assert torch.cuda.current_device is not patched[0]
        assert fused_softmax.get_default_causal_mask is not patched[1]
    finally:
        cpu.activate(force=True)
    assert torch.cuda.current_device() == torch.device("cpu")


def test_causal_mask_is_megatron_convention():
    m = cpu.causal_attention_mask(4)
    assert m.shape == (1, 1, 4, 4) and m.dtype == torch.bool
    # True above the diagonal = "masked out" (future positions)
    assert m[0, 0].tolist() == [[False, True, True, True], [False, False, True, True],
                                [False, False, False, True], [False, False, False, False]]
    from megatron.core.fusions import fused_softmax
    assert torch.equal(fused_softmax.get_default_causal_mask(4), m[0, 0])
    with pytest.raises(ValueError, match="seq_len"):
        cpu.causal_attention_mask(0)


def test_rotary_embedding_on_cpu_matches_formula():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000,
                           use_cpu_initialization=True)
    emb = rope.get_emb(5)
    assert rope.inv_freq.device.type == "cpu" and emb.shape == (5, 1, 1, 8)
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    freqs = torch.outer(torch.arange(5, dtype=torch.float32), inv)
    torch.testing.assert_close(emb[:, 0, 0], torch.cat([freqs, freqs], -1), rtol=0, atol=1e-6)


def test_router_gemm_and_memory_buffer_run_on_cpu():
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x = torch.randn(6, 16, dtype=torch.float64)
    w = torch.randn(4, 16, dtype=torch.float64)
    out = router_gating_linear(x.float(), w.float(), None, torch.float32)   # no NameError
    torch.testing.assert_close(out.double(), x @ w.t(), rtol=1e-5, atol=1e-5)
    buf = ps.get_global_memory_buffer().get_tensor((3, 4), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (3, 4)


def test_rng_tracker_fork_is_noop_and_dropout_is_seeded():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()

    def draw():
        cpu.seed_everything(7)
        with tracker.fork():
            return torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True)

    a, b = draw(), draw()
    assert torch.equal(a, b) and 0 < int((a == 0).sum()) < 64
    cpu.seed_everything(8)
    with tracker.fork():
        c = torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True)
    assert not torch.equal(a, c)


def test_init_model_parallel_validates_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        cpu.init_model_parallel(tp=2, force=True)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        cpu.init_model_parallel(tp=0, force=True)
    cpu.init_model_parallel(1, 1, 1, force=True)   # same sizes: a no-op re-init
    from megatron.core import parallel_state as ps
    assert ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == 1


def test_torch_norm_runs_sequence_parallel_and_flags_its_grads():
    """Shim 5: the local spec's norm accepts sequence parallel and marks its parameters for the
    TP gradient sum (finalize_model_grads), as TE's norms do; deactivate() restores the refusal."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm")
    cfg.sequence_parallel = True          # as a TP > 1 config has it
    norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert norm.weight.sequence_parallel is True and cfg.sequence_parallel is True
    cfg.sequence_parallel = False
    assert WrappedTorchNorm(cfg, 8).weight.sequence_parallel is False
    cfg.sequence_parallel = True
    cpu.deactivate()
    try:
        with pytest.raises(AssertionError, match="sequence parallel not supported"):
            WrappedTorchNorm(cfg, 8)
    finally:
        cpu.activate(force=True)
    assert WrappedTorchNorm(cfg, 8).weight.sequence_parallel is True
