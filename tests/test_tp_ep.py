"""MoE under tensor x expert (x pipeline) parallelism on CPU: the recipes' layout class, tested.

A tiny Qwen3-MoE (2 layers, 8 experts, hidden 128) at TP 2 x EP 2 (4 gloo processes, sequence
parallel with compat.cpu's norm) and TP 2 x EP 2 x PP 2 (8 processes) against the same model in
one process: logits, gathered fake-quantized weights and the first training losses must agree,
for INT4 (routed experts, ModelOpt's SequentialMLP replaced by ours) and NVFP4 (all linears,
so attention is TP-sharded and the NVFP4 global scale must come from the TP-group amax).
One torchrun launch per layout checks every format (process start-up dominates on 2 cores).
"""
import pytest
import torch

import _dist_worker as W
from test_train import _hf_init_dir, _torchrun, corpus  # noqa: F401  (fixture)

FORMATS = [("int4", "experts"), ("nvfp4", "all-linear")]
TP_EP = {"tp": 2, "ep": 2, "dp": 2, "sequence_parallel": True, "gpus_per_node": 4}
TP_EP_PP = {"tp": 2, "ep": 2, "pp": 2, "dp": 2, "sequence_parallel": True, "gpus_per_node": 8}


@pytest.fixture(scope="module")
def hf_init(tmp_path_factory):
    return _hf_init_dir("tiny-qwen3-moe", tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module")
def references(hf_init, corpus, tmp_path_factory):  # noqa: F811
    """Single-process runs (TP=EP=PP=1) of each format, with logits."""
    out = {}
    for fmt, scope in FORMATS:
        r = W.tiny_recipe("tiny-qwen3-moe", data=[corpus], fmt=fmt, scope=scope)
        out[fmt] = W.run_layout({"recipe": r.to_dict(), "init_from": hf_init, "steps": 2, "logits": True,
                                 "out": str(tmp_path_factory.mktemp(f"ref-{fmt}"))})
    return out


def _launch(parallel, formats, hf_init, corpus, tmp_path, *, logits, save):  # noqa: F811
    runs = [{"recipe": W.tiny_recipe("tiny-qwen3-moe", data=[corpus], fmt=fmt, scope=scope,
                                     parallel=parallel).to_dict(),
             "init_from": hf_init, "steps": 2, "logits": logits, "save": save, "sink_shards": logits,
             "out": str(tmp_path / f"par-{fmt}")} for fmt, scope in formats]
    return _torchrun({"runs": runs}, tmp_path, nproc=parallel["gpus_per_node"])


def _assert_same_training(ref, got, parallel):
    assert all(got["layout"][k] == v for k, v in parallel.items() if k in ("tp", "ep", "pp", "dp"))
    assert got["fq_before"].keys() == ref["fq_before"].keys()
    for k, v in ref["fq_before"].items():          # the exact weights the forward uses, gathered
        assert torch.equal(got["fq_before"][k], v), k
    print(f"losses 1 process {ref['losses']} vs {got['layout']} {got['losses']}")
    assert abs(got["losses"][0] - ref["losses"][0]) < 1e-5, (got["losses"], ref["losses"])
    assert abs(got["losses"][1] - ref["losses"][1]) < 1e-4, (got["losses"], ref["losses"])
    # after two optimizer steps every tensor (norms included: their sequence-parallel gradients
    # must be summed over TP) is the single-process one up to fp32 reduction order (~2e-6)
    worst = max((got["fq_after"][k] - v).abs().max().item() for k, v in ref["fq_after"].items())
    print(f"max |weight difference| after 2 steps = {worst:.1e}")
    assert worst < 1e-4, worst


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_ep2_matches_single_process_and_reloads(hf_init, corpus, references, tmp_path):  # noqa: F811
    from int4_qat.checkpoint import load_model_for_export
    from int4_qat.testing import fake_quant_hf_state_dict

    results = _launch(TP_EP, FORMATS, hf_init, corpus, tmp_path, logits=True, save=True)
    for (fmt, _scope), got in zip(FORMATS, results, strict=True):
        ref = references[fmt]
        assert got["logits"].shape == ref["logits"].shape == (2, 32, 320)
        diff = (got["logits"] - ref["logits"]).abs().max().item()
        print(f"{fmt}: max |logit difference| TP2xEP2 vs 1 process = {diff:.2e}")
        assert diff < 1e-4, diff
        _assert_same_training(ref, got, TP_EP)
        # the TP2xEP2 checkpoint (our SequentialMLP quant module) reloads at TP=EP=1 exactly
        model, arch, recipe = load_model_for_export(got["checkpoint"])
        assert (recipe.parallel.tp, recipe.parallel.ep) == (2, 2)

        loaded = fake_quant_hf_state_dict(model, arch)
        for k, v in got["fq_after"].items():
            assert torch.equal(loaded[k], v), (fmt, k)
    # gpt-oss sinks at TP 2: ModelOpt's TE attention quant module would save each rank's 2 heads
    # as the whole (replicated) tensor; ours keeps Megatron's split of 4 heads over TP
    shards = results[0]["sink_shards"]
    assert {s["tp_rank"] for s in shards} == {0, 1}
    for s in shards:
        assert s["modelopt"] == ((2,), (0,))
        assert s["ours"] == ((4,), (2 * s["tp_rank"],))
    # the saved expert keys are one entry per global expert (the export reader relies on it)
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(results[0]["checkpoint"]).read_metadata().state_dict_metadata)
    for e in range(8):
        for suffix in ("linear_fc1.weight_w", "linear_fc1.weight_v", "linear_fc2.weight"):
            assert f"decoder.layers.1.mlp.experts.experts.{e}.{suffix}" in keys


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_ep2_pp2_matches_single_process(hf_init, corpus, references, tmp_path):  # noqa: F811
    # 8 processes on 2 cores: one format (NVFP4 all-linear exercises TP-sharded attention too)
    got, = _launch(TP_EP_PP, FORMATS[1:], hf_init, corpus, tmp_path, logits=False, save=False)
    _assert_same_training(references["nvfp4"], got, TP_EP_PP)

