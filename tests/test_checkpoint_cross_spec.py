"""Checkpoints written under the Transformer-Engine spec's tensor names load into the local-spec
model (export, --init-from, resume), and the name tables answer both directions.

TE cannot be installed here, so the TE-named checkpoint is made the way a TE run writes those
tensors: the local model's sharded state with the keys that differ renamed to the TE spec's
(Megatron gpt_layer_specs.py: TE MoE layers keep a separate ``pre_mlp_layernorm``; TE MLA fuses the
latent norms into ``linear_q_up_proj`` / ``linear_kv_up_proj`` as ``layer_norm_weight``)."""
import re
import shutil

import pytest
import torch

import _dist_worker as W
from int4_qat import checkpoint as C
from int4_qat.recipe import REPO_ROOT

def _to_te_name(key: str, arch) -> str:
    """The key a TE-spec run saves for the tensor the local spec saves as ``key`` (written here
    from Megatron's gpt_layer_specs.py, independently of int4_qat's alias tables)."""
    m = re.match(r"(decoder\.layers\.(\d+)\.)(.*)$", key)
    if not m:
        return key
    pre, layer, rest = m.group(1), int(m.group(2)), m.group(3)
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        moe = arch.moe_layers is not None and bool(arch.moe_layers[layer])
        # TE: a MoE layer keeps a separate norm; a dense layer fuses it into fc1
        return pre + ("pre_mlp_layernorm.weight" if moe else "mlp.linear_fc1.layer_norm_weight")
    if arch.model_type in ("deepseek_v3", "kimi_k2"):      # TE MLA fuses the latent norms
        rest = {"self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
                "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
                }.get(rest, rest)
    return pre + rest


def _save_quantized(model_dir: str, tmp_path, fmt="int4"):
    from int4_qat.arch import build_model, load_arch
    from int4_qat.compat import cpu

    cpu.init_single_process_gloo(seed=3)
    cpu.activate_training()
    recipe = W.tiny_recipe(model_dir, data=["system"], fmt=fmt)
    arch = load_arch(REPO_ROOT / "recipes" / "models" / model_dir)
    model = recipe.quant.scheme().apply(build_model(arch, use_te=False))
    with torch.no_grad():            # norms are initialised to 1: make them tell names apart
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand_like(p) + 0.5)
    src = C.save_checkpoint(tmp_path / "local", 0, model, recipe=recipe)
    return model, arch, src


def _rewrite_with_te_names(model, arch, src, dst_root) -> tuple:
    """A copy of checkpoint ``src`` whose model tensors carry the TE spec's names."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    dst = dst_root / src.name
    dst.mkdir(parents=True)
    sd = model.sharded_state_dict()
    renamed = {}
    for v in sd.values():
        if isinstance(v, ShardedTensor):
            new = _to_te_name(v.key, arch)
            if new != v.key:
                renamed[v.key] = new
                v.key = new
    dist_checkpointing.save({"model": sd, "step": 0, "consumed_samples": 0,
                             "rng": C._rng_sharded()}, str(dst))
    for extra in ("modelopt_state", "recipe.yaml", "config.json", C.TRAIN_STATE):
        f = src / extra
        (shutil.copytree if f.is_dir() else shutil.copyfile)(f, dst / extra)
    return dst, renamed


@pytest.mark.parametrize("model_dir, expected", [
    ("tiny-qwen3-moe", {"pre_mlp_layernorm.weight"}),
    ("tiny-deepseek-v3", {"mlp.linear_fc1.layer_norm_weight",           # dense layer 0
                          "self_attention.linear_q_up_proj.layer_norm_weight",
                          "self_attention.linear_kv_up_proj.layer_norm_weight"}),
])
def test_te_named_checkpoint_loads_into_local_model(model_dir, expected, tmp_path):
    model, arch, src = _save_quantized(model_dir, tmp_path)
    dst, renamed = _rewrite_with_te_names(model, arch, src, tmp_path / "te")
    assert {k.split(".", 3)[-1] for k in renamed.values()} == expected
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    # export path: strict load into a rebuilt local-spec model at TP=EP=PP=1
    loaded, _, _ = C.load_model_for_export(dst)
    got = dict(loaded.named_parameters())
    assert got.keys() == want.keys()
    for n, v in want.items():
        assert torch.equal(got[n], v), n
    # --init-from path (weights only) into a fresh quantized model
    from int4_qat.arch import build_model

    fresh = W.tiny_recipe(model_dir, data=["system"]).quant.scheme().apply(build_model(arch, use_te=False))
    C.load_model_weights(fresh, dst)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, want[n]), n
    # resume path (model + step + RNG; the optimizer's keys derive from the renamed model keys)
    again = W.tiny_recipe(model_dir, data=["system"]).quant.scheme().apply(build_model(arch, use_te=False))
    assert C.load_checkpoint(dst, again)["step"] == 0
    for n, p in again.named_parameters():
        assert torch.equal(p, want[n]), n


def test_spec_aliases_answer_both_directions():
    from int4_qat.arch import load_arch

    keys_map = C._local_spec_keys_map()
    assert keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    ds = load_arch(REPO_ROOT / "recipes" / "models" / "tiny-deepseek-v3").rules()
    L = "decoder.layers.1."
    # local (CPU) model asks, TE checkpoint holds
    assert L + "pre_mlp_layernorm.weight" in C.spec_aliases(L + "mlp.linear_fc1.layer_norm_weight", ds, keys_map)
    assert C.spec_aliases(L + "self_attention.q_layernorm.weight", ds, keys_map) == \
        [L + "self_attention.linear_q_up_proj.layer_norm_weight"]
    # TE (GPU) model asks, local checkpoint holds
    assert L + "mlp.linear_fc1.layer_norm_weight" in C.spec_aliases(L + "pre_mlp_layernorm.weight", ds, keys_map)
    assert C.spec_aliases(L + "self_attention.linear_kv_up_proj.layer_norm_weight", ds, keys_map) == \
        [L + "self_attention.kv_layernorm.weight"]
    # tensors that have one name in both specs have no alias
    assert C.spec_aliases(L + "mlp.router.weight", ds, keys_map) == []
