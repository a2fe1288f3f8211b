"""Helpers for the training tests, and the torchrun worker they launch.

``python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py SPEC.json`` builds a
:class:`int4_qat.train.Trainer` for the recipe in the spec (on CPU, gloo), records the *gathered*
fake-quantized weights (HF names, full tensors, via ``int4_qat.arch.export_hf_state_dict``),
runs ``steps`` optimizer steps, records the losses and the gathered fake-quantized weights again,
optionally saves a checkpoint, and rank 0 writes everything to ``spec["result"]`` (torch.save).
The single-process reference calls :func:`run_layout` in the test process itself.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def tiny_recipe(model: str, *, data: list[str], fmt: str = "int4", group: int | None = 32,
                scope: str = "experts", parallel: dict | None = None, **train):
    """A tiny CPU recipe (``model``: a dir under recipes/models) with test-sized training."""
    from int4_qat.recipe import Recipe

    quant = {"format": fmt, "scope": scope}
    if fmt == "int4":
        quant.update(group_size=group, scale_rule="amax/7")
    t = dict(data=data, eval_fraction=0.05, seq_length=32, global_batch=4, micro_batch=2, lr=3e-3,
             min_lr=3e-4, warmup_steps=2, steps=20, weight_decay=0.01, grad_clip=1.0,
             eval_interval=1000, eval_iters=1, log_interval=1000, seed=1234, precision="fp32",
             save_interval=1000)
    t.update(train)
    return Recipe.from_dict({
        "name": "test-" + model.replace("_", "-"),
        "model": {"config": str(REPO / "recipes" / "models" / model), "checkpoint": None, "tokenizer": None},
        "parallel": {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "dp": 1, "sequence_parallel": False,
                     "nodes": 1, "gpus_per_node": 1, **(parallel or {})},
        "quant": quant, "train": t, "export": {"formats": [fmt]},
    })


@torch.no_grad()
def full_logits(trainer, samples: int = 2) -> torch.Tensor:
    """Eval-mode logits ``[b, s, vocab]`` of the first ``samples`` eval windows (TP-gathered;
    pipeline-parallel size 1 only). Every rank computes the same batch."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from int4_qat.checkpoint import _unwrap

    assert ps.get_pipeline_model_parallel_world_size() == 1, "logits need pp=1"
    inner = _unwrap(trainer.model)
    tokens, _ = trainer.eval_ds.batch(list(range(samples)))
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    inner.eval()
    try:
        out = inner(tokens, pos, trainer._mask)
    finally:
        inner.train()
    return gather_from_tensor_model_parallel_region(out).clone()


def sink_shards() -> dict:
    """How gpt-oss's learnable ``softmax_offset`` (one per head; heads split over TP) is saved at
    this TP: ``{"modelopt": ..., "ours": ...}`` -> (global shape, global offset) of the tensor.
    "modelopt" is built as ModelOpt 0.47's ``_QuantTEDotProductAttention.sharded_state_dict`` does
    (an empty TP-axis map), "ours" as ``int4_qat.modelopt_modules`` merges it with the module's
    own method (here the local spec's LocalCoreAttention, which has TE's ``{'softmax_offset': 0}``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from int4_qat.compat.cpu import LocalCoreAttention
    from int4_qat.modelopt_modules import sink_aware_sharded_state_dict

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            softmax_type="learnable", use_cpu_initialization=True,
                            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size())
    att = LocalCoreAttention(cfg, 1, AttnMaskType.causal, "self")
    meta = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    own = att.sharded_state_dict("a.", (), meta)
    stock = make_sharded_tensors_for_checkpoint(att.state_dict(prefix="", keep_vars=True), "a.", {}, ())
    out = {}
    for name, sd in (("modelopt", stock), ("ours", sink_aware_sharded_state_dict(stock, own))):
        t = sd["a.softmax_offset"]
        out[name] = (tuple(t.global_shape), tuple(t.global_offset))
    out["tp_rank"] = ps.get_tensor_model_parallel_rank()
    return out


def run_layout(spec: dict) -> dict:
    """Build, record fake-quant weights, step, record again; see the module docstring."""
    from int4_qat.recipe import Recipe
    from int4_qat.testing import fake_quant_hf_state_dict
    from int4_qat.train import Trainer

    recipe = Recipe.from_dict(spec["recipe"])
    tr = Trainer(recipe, cpu=True, quant=spec.get("quant", True), init_from=spec.get("init_from"),
                 out=spec["out"], resume=False, log=lambda s: None)
    from megatron.core import parallel_state as ps

    res = {"layout": {"world": tr.env.world_size, "tp": ps.get_tensor_model_parallel_world_size(),
                      "ep": ps.get_expert_model_parallel_world_size(),
                      "pp": ps.get_pipeline_model_parallel_world_size(),
                      "dp": ps.get_data_parallel_world_size()},
           "fq_before": fake_quant_hf_state_dict(tr.model, tr.arch)}
    if spec.get("logits"):
        res["logits"] = full_logits(tr)
    if spec.get("sink_shards"):
        import torch.distributed as dist

        mine = sink_shards()
        res["sink_shards"] = [None] * dist.get_world_size()
        dist.all_gather_object(res["sink_shards"], mine)
    res["losses"] = [tr.train_step()["loss"] for _ in range(spec["steps"])]
    res["fq_after"] = fake_quant_hf_state_dict(tr.model, tr.arch)
    if spec.get("save"):
        res["checkpoint"] = str(tr.save())
    return res


def main(argv: list[str]) -> None:
    """One spec, or ``{"runs": [spec, ...], "result": path}``: several layouts/formats in one
    torchrun launch (each builds its own Trainer; rank 0 saves the list of results)."""
    import torch.distributed as dist

    spec = json.loads(Path(argv[0]).read_text())
    if "runs" in spec:
        res = [run_layout(s) for s in spec["runs"]]
    else:
        res = run_layout(spec)
    if dist.get_rank() == 0:
        torch.save(res, spec["result"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
