"""Trainer.train_step checks weight finiteness once per step (deferred mode of int4_qat.formats):
a NaN planted in one expert weight is reported after the forward/backward, naming that weight,
and no optimizer update is applied with it."""
import json

import pytest
import torch

import _dist_worker as W
from int4_qat import data as D
from int4_qat.formats import finite_check_mode


def test_train_step_reports_a_nonfinite_expert_weight_by_name(tmp_path):
    from int4_qat.checkpoint import _unwrap
    from int4_qat.train import train

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in D.system_corpus(max_docs=60)))
    r = W.tiny_recipe("tiny-qwen3-moe", data=[str(corpus)], fmt="int4", steps=1)
    res = train(r, cpu=True, out=tmp_path / "run", save=False, log=lambda s: None)
    trainer = res.trainer
    params = dict(_unwrap(trainer.model).named_parameters())
    name = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"
    with torch.no_grad():
        params[name][0, 5] = float("nan")
    step = trainer.step
    with pytest.raises(ValueError, match=r"1 quantized weight\(s\) contain NaN or Inf: "
                                         r"decoder\.layers\.1\.mlp\.experts\.local_experts\.2\."
                                         r"linear_fc2\.weight"):
        trainer.train_step()
    assert trainer.step == step                      # raised before the optimizer step
    assert finite_check_mode() == "raise"            # the deferred mode does not leak
