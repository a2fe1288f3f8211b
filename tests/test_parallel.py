"""int4_qat.parallel: launcher environment, layout rules and group-vs-shard rules (pure checks)."""
import json
from pathlib import Path

import pytest

from int4_qat.arch.shape import arch_shape
from int4_qat.parallel import DistEnv, dist_env, validate_layout
from int4_qat.scheme import QuantScheme

MODELS = Path(__file__).resolve().parent.parent / "recipes" / "models"


def cfg(name: str) -> dict:
    return json.loads((MODELS / name / "config.json").read_text())


def P(**kw) -> dict:
    base = dict(tp=1, pp=1, ep=1, etp=1, dp=1, sequence_parallel=False)
    base.update(kw)
    return base


INT4_128 = QuantScheme(format="int4", group_size=128, scope="experts")


def test_world_size_lists_every_factor():
    with pytest.raises(ValueError, match=r"tp=2 × pp=2 × dp=1 = 4 != world size 8 \(set parallel.dp = 2"):
        validate_layout(P(tp=2, pp=2), 8)
    validate_layout(P(tp=2, pp=2, dp=2), 8)


def test_expert_layout_must_fold_onto_dense_ranks():
    with pytest.raises(ValueError, match=r"ep=4 × etp=1 = 4 does not divide tp=1 × dp=2 = 2"):
        validate_layout(P(ep=4, dp=2), 2)
    # Megatron's own published layouts fold: Qwen3-30B-A3B TP4 EP8 on 8 GPUs, Kimi-K2 TP8 EP64
    validate_layout(P(tp=4, ep=8, dp=2, sequence_parallel=True), 8, cfg("qwen3-30b-a3b"), INT4_128)
    validate_layout(P(tp=8, pp=4, ep=64, dp=8, sequence_parallel=True, first_stage_layers=15,
                      last_stage_layers=14), 256, cfg("kimi-k2"),
                    QuantScheme(format="int4", group_size=32, scope="experts"))


def test_model_size_rules():
    moe = cfg("tiny-qwen3-moe")     # 2 layers, 4 heads, 2 kv heads, 8 experts
    with pytest.raises(ValueError) as e:
        validate_layout(P(tp=4, ep=3, pp=3, dp=1, sequence_parallel=True), 12, moe)
    msg = str(e.value)
    for part in ("num_hidden_layers=2 is not divisible by the 3 remaining pipeline stages (pp=3)",
                 "num_key_value_heads (query groups)=2 is not divisible by tp=4",
                 "num_experts=8 is not divisible by ep=3",
                 "ep=3 × etp=1 = 3 does not divide tp=4 × dp=1 = 4"):
        assert part in msg, msg
    assert "num_attention_heads" not in msg          # 4 heads split fine over tp=4


def test_uneven_pipeline_split():
    kimi = cfg("kimi-k2")            # 61 layers
    with pytest.raises(ValueError, match=r"num_hidden_layers=61 is not divisible by the 4 remaining"):
        validate_layout(P(pp=4), 4, kimi)
    validate_layout(P(pp=4, first_stage_layers=15, last_stage_layers=14), 4, kimi)   # 15+16+16+14
    with pytest.raises(ValueError, match=r"minus first/last_stage_layers \[15, 15\] = 31"):
        validate_layout(P(pp=4, first_stage_layers=15, last_stage_layers=15), 4, kimi)


def test_sequence_parallel_rules():
    moe = cfg("tiny-qwen3-moe")
    with pytest.raises(ValueError, match=r"MoE with tp=2 needs parallel.sequence_parallel: true"):
        validate_layout(P(tp=2), 2, moe)
    with pytest.raises(ValueError, match=r"sequence_parallel=true needs tp > 1"):
        validate_layout(P(sequence_parallel=True), 1)
    validate_layout(P(tp=2, sequence_parallel=True), 2, moe)
    # MoE + TP runs on CPU (compat.cpu's sequence-parallel norm); MLA + TP does not (local spec)
    validate_layout(P(tp=2, sequence_parallel=True), 2, moe, cpu=True)
    with pytest.raises(ValueError, match=r"MLA with tp=2 is GPU-only here"):
        validate_layout(P(tp=2, sequence_parallel=True), 2, cfg("tiny-deepseek-v3"), cpu=True)
    validate_layout(P(tp=2, sequence_parallel=True), 2, cfg("tiny-deepseek-v3"))   # GPU: fine
    validate_layout(P(tp=2), 2, cfg("tiny-qwen3"), cpu=True)      # dense TP on CPU is fine


def test_group_must_not_straddle_an_expert_tp_shard():
    q30 = cfg("qwen3-30b-a3b")       # moe_intermediate_size 768
    with pytest.raises(ValueError) as e:
        validate_layout(P(tp=4, etp=4, sequence_parallel=True), 4, q30, INT4_128)
    msg = str(e.value)
    assert ("mlp.experts.local_experts.0.linear_fc2: in_features 768 / etp=4 = 192 per shard is not a "
            "multiple of group_size=128") in msg
    assert "use quant.group_size in [16, 32, 64] or a smaller etp (etp=1 keeps expert groups whole)" in msg
    # the same layout with g64, or with etp=1, is fine
    validate_layout(P(tp=4, etp=4, ep=1, sequence_parallel=True), 4, q30,
                    QuantScheme(format="int4", group_size=64, scope="experts"))
    validate_layout(P(tp=4, etp=1, ep=4, sequence_parallel=True), 4, q30, INT4_128)
    # MXFP4 (block 32) at etp=8: 768 / 8 = 96 = 3 blocks → fine; etp=16: 48 → straddles
    mx = QuantScheme(format="mxfp4", scope="experts")
    validate_layout(P(tp=4, etp=8, dp=2, sequence_parallel=True), 8, q30, mx)
    with pytest.raises(ValueError, match=r"768 / etp=16 = 48 per shard is not a multiple of group_size=32"):
        validate_layout(P(tp=4, etp=16, dp=4, sequence_parallel=True), 16, q30, mx)


def test_group_vs_tensor_parallel_row_shards_all_linear():
    dense = cfg("tiny-qwen3")        # linear_proj K = 4·32 = 128, fc2 K = 256
    all128 = QuantScheme(format="int4", group_size=128, scope="all-linear")
    with pytest.raises(ValueError) as e:
        validate_layout(P(tp=2), 2, dense, all128)
    msg = str(e.value)
    assert "self_attention.linear_proj: in_features 128 / tp=2 = 64 per shard" in msg
    assert "mlp.linear_fc2" not in msg                   # 256 / 2 = 128 holds whole groups
    validate_layout(P(tp=2), 2, dense, QuantScheme(format="int4", group_size=32, scope="all-linear"))
    # scope experts leaves attention in BF16, so the same TP is fine for a MoE model
    validate_layout(P(tp=2, sequence_parallel=True), 2, cfg("tiny-qwen3-moe"),
                    QuantScheme(format="int4", group_size=128, scope="experts"))


def test_deepseek_dims_and_train_batch_rules():
    d = arch_shape(cfg("kimi-k2"))
    assert (d.num_experts, d.moe_ffn, d.shared_ffn, d.dense_ffn, d.q_dim) == \
        (384, 2048, 2048, 18432, 64 * 128)
    with pytest.raises(ValueError, match=r"train.global_batch=6 is not a multiple of micro_batch × dp = 2 × 2 = 4"):
        validate_layout(P(dp=2), 2, train=dict(global_batch=6, micro_batch=2, seq_length=8))
    with pytest.raises(ValueError, match=r"train.seq_length=7 is not divisible by tp=2 \(sequence parallel\)"):
        validate_layout(P(tp=2, sequence_parallel=True), 2, train=dict(global_batch=4, micro_batch=2, seq_length=7))


def test_every_recipe_layout_is_valid():
    from int4_qat.recipe import Recipe

    recipes = sorted((MODELS.parent).glob("*.yaml"))
    assert recipes
    for path in recipes:
        r = Recipe.load(path)
        validate_layout(r.parallel, r.parallel.world_size, r.model.hf_config(), r.quant.scheme(),
                        train=r.train)


def test_dist_env_sources():
    e = dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert e == DistEnv(3, 8, 1, "n0", 1234, "torchrun")
    e = dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                  "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1"})
    assert e == DistEnv(5, 16, 5, "10.0.0.1", 29500, "slurm")
    e = dist_env({})
    assert (e.rank, e.world_size, e.source) == (0, 1, "single") and e.master_port > 0
    with pytest.raises(ValueError, match=r"RANK='x' is not an integer"):
        dist_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_init_parallel_single_cpu_process():
    from megatron.core import parallel_state as ps

    from int4_qat.compat import cpu as compat_cpu
    from int4_qat.parallel import init_parallel

    env = init_parallel(P(), cpu=True, seed=3)
    assert env.world_size == 1 and env.rank == 0
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_data_parallel_world_size() == 1
    assert compat_cpu.is_active()
