"""int4_qat.arch on Qwen3 / Qwen3-MoE: HF parity, import/export round trip, errors, TP/EP/PP.

The multi-process test re-runs this file under ``torchrun --nproc-per-node 2`` (see ``_worker``).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from int4_qat.parallel import free_port
from int4_qat.arch import (HFCheckpointReader, build_model, export_hf_state_dict,
                           import_hf_checkpoint, load_arch, write_hf_checkpoint)
from int4_qat.compat import cpu
from int4_qat.testing import TINY_CONFIGS_DIR, make_tiny_hf_checkpoint, tiny_config

SEQ, BATCH = 16, 2


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, attention_mask=cpu.causal_attention_mask(ids.shape[1]))


def hf_logits(hf_dir, ids) -> torch.Tensor:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def load_megatron(hf_dir, **kw):
    arch = load_arch(hf_dir)
    model = build_model(arch, use_te=False, parallel_output=False, **kw).eval()
    import_hf_checkpoint(model, arch, hf_dir)
    return arch, model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cpu.init_single_process_gloo(force=True)
    root = tmp_path_factory.mktemp("hf")
    out = {t: make_tiny_hf_checkpoint(t, root / t) for t in ("qwen3_moe", "qwen3")}
    # a variant: no top-k renormalisation (Megatron pre-softmax router) and a dense layer 1
    cfg = tiny_config(norm_topk_prob=False, mlp_only_layers=[1])
    (root / "variant-cfg").mkdir()
    (root / "variant-cfg" / "config.json").write_text(json.dumps(cfg))
    out["variant"] = make_tiny_hf_checkpoint(root / "variant-cfg", root / "variant", seed=3)
    # dense with tied embeddings (the small Qwen3s): no lm_head tensor, output layer = embedding
    cfg = json.loads((TINY_CONFIGS_DIR / "tiny-qwen3" / "config.json").read_text())
    cfg.update(tie_word_embeddings=True)
    (root / "tied-cfg").mkdir()
    (root / "tied-cfg" / "config.json").write_text(json.dumps(cfg))
    out["tied"] = make_tiny_hf_checkpoint(root / "tied-cfg", root / "tied", seed=5)
    return out


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3", "variant", "tied"])
def test_logits_match_transformers(ckpts, kind):
    arch, model = load_megatron(ckpts[kind])
    ids = _ids(arch.vocab_size)
    ours, ref = megatron_logits(model, ids), hf_logits(ckpts[kind], ids)
    diff = (ours - ref).abs().max().item()
    print(f"{kind}: max |megatron - transformers| logits = {diff:.3e} (max |logit| {ref.abs().max():.4f})")
    assert ours.shape == ref.shape == (BATCH, SEQ, arch.vocab_size)
    assert diff <= 1e-4
    if kind == "variant":
        assert arch.tf_kwargs["moe_layer_freq"] == [1, 0]
        assert arch.tf_kwargs["moe_router_pre_softmax"] is True
    if kind == "qwen3_moe":   # the router matters: perturbing it changes the logits
        with torch.no_grad():
            model.decoder.layers[0].mlp.router.weight.mul_(-1)
        assert (megatron_logits(model, ids) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("kind,dtype", [("qwen3_moe", torch.bfloat16), ("qwen3", torch.float32),
                                        ("tied", torch.float32)])
def test_import_export_round_trip_is_exact(ckpts, kind, dtype):
    arch, model = load_megatron(ckpts[kind], params_dtype=dtype)
    exported = dict(export_hf_state_dict(model, arch, dtype=dtype))
    with HFCheckpointReader(ckpts[kind]) as r:
        assert sorted(exported) == sorted(r.keys())
        for name, t in exported.items():
            ref = r.get(name)
            assert t.dtype == dtype and t.shape == ref.shape, name
            assert torch.equal(t.to(ref.dtype), ref), name
    # and the exported dict, written back, imports into a fresh model identically
    out = ckpts[kind].parent / f"{kind}-reexport"
    write_hf_checkpoint(exported.items(), out, shards=3, config=arch.hf_config)
    arch2, model2 = load_megatron(out, params_dtype=dtype)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_load_arch_maps_qwen3_moe_config(ckpts):
    arch = load_arch(ckpts["qwen3_moe"])   # transformers-5 layout: rope_parameters, num_local_experts
    hub = load_arch(TINY_CONFIGS_DIR / "tiny-qwen3-moe")   # hub layout: rope_theta, num_experts
    for a in (arch, hub):
        tf = a.tf_kwargs
        assert (a.model_type, a.vocab_size, a.num_layers, a.num_experts) == ("qwen3_moe", 320, 2, 8)
        assert tf["num_query_groups"] == 2 and tf["kv_channels"] == 32 and tf["qk_layernorm"]
        assert tf["moe_router_topk"] == 2 and tf["moe_router_pre_softmax"] is False  # norm_topk_prob
        assert a.gpt_kwargs["rotary_base"] == 1e6 and not a.tie_embeddings


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "llama4"}, "model_type 'llama4' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"some_new_knob": 3}, r"unknown config field\(s\) \['some_new_knob'\]"),
    ({"hidden_size": None}, "required field 'hidden_size' is missing"),
    ({"num_experts": "eight"}, "'num_experts' must be int"),
])
def test_load_arch_errors_name_file_and_field(tmp_path, changes, match):
    d = _edit_config(TINY_CONFIGS_DIR / "tiny-qwen3-moe", tmp_path / "c", **changes)
    with pytest.raises(ValueError, match=match) as e:
        load_arch(d)
    assert str(d / "config.json") in str(e.value)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weight_map = {}
    for f in sorted(dst.glob("model-*.safetensors")):
        tensors = edit(load_file(f))
        save_file(tensors, f, metadata={"format": "pt"})
        weight_map.update({k: f.name for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_import_errors_name_tensor_and_file(ckpts, tmp_path):
    arch = load_arch(ckpts["qwen3_moe"])
    model = build_model(arch, use_te=False)
    missing = "model.layers.1.mlp.experts.5.up_proj.weight"
    d = _rewrite(ckpts["qwen3_moe"], tmp_path / "missing",
                 lambda t: {k: v for k, v in t.items() if k != missing})
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight'.*"):
        import_hf_checkpoint(model, arch, d)

    bad = "model.layers.0.self_attn.o_proj.weight"
    d = _rewrite(ckpts["qwen3_moe"], tmp_path / "shape",
                 lambda t: {k: (v[:, :64].contiguous() if k == bad else v) for k, v in t.items()})
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\.self_attn\.o_proj\.weight "
                                         r"\(128, 64\) in model-0000\d-of-00002\.safetensors"):
        import_hf_checkpoint(model, arch, d)

    d = _rewrite(ckpts["qwen3_moe"], tmp_path / "stray",
                 lambda t: {**t, "model.layers.0.mlp.shared_expert.up_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shared_expert.*match no qwen3_moe mapping rule"):
        import_hf_checkpoint(model, arch, d)

    d = tmp_path / "quantized"
    shutil.copytree(ckpts["qwen3_moe"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "x"}}))
    with pytest.raises(ValueError, match="quantized"):
        import_hf_checkpoint(model, arch, d)

    d = tmp_path / "pickle"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickled checkpoints are not read"):
        HFCheckpointReader(d)


def test_tiny_checkpoint_factory_is_deterministic_and_sharded(ckpts, tmp_path):
    d = ckpts["qwen3_moe"]
    files = sorted(p.name for p in d.iterdir())
    assert files == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    again = make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "again", shards=1)
    with HFCheckpointReader(d) as a, HFCheckpointReader(again) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
        assert a.get("model.embed_tokens.weight").dtype == torch.bfloat16
        # norms were redrawn (not all ones) so parity tests can see a swapped norm
        assert not torch.all(a.get("model.layers.0.self_attn.q_norm.weight") == 1)
    with pytest.raises(ValueError, match="no tiny config for 'mamba'"):
        make_tiny_hf_checkpoint("mamba", tmp_path / "x")


# ------------------------------------------------------------------ multi-process (torchrun)
@pytest.mark.multiproc
def test_tp2_dense_ep2_moe_pp2_match_single_process(ckpts, tmp_path):
    """TP=2 (dense), EP=2 and PP=2 (MoE) logits equal TP=1 within 1e-5; exports are identical."""
    refs = {}
    for kind in ("qwen3", "qwen3_moe"):
        arch, model = load_megatron(ckpts[kind])
        refs[kind] = megatron_logits(model, _ids(arch.vocab_size))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), __file__,
           str(ckpts["qwen3"]), str(ckpts["qwen3_moe"]), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for layout, kind in (("tp2", "qwen3"), ("ep2", "qwen3_moe"), ("pp2", "qwen3_moe")):
        got = load_file(tmp_path / f"{layout}.safetensors")["logits"]
        diff = (got - refs[kind]).abs().max().item()
        print(f"{layout} ({kind}): max |logits - TP=1 logits| = {diff:.3e}")
        assert diff <= 1e-5, layout
        report = json.loads((tmp_path / f"{layout}-export.json").read_text())
        assert report == {"rank0": "identical", "rank1": "identical"}, (layout, report)


def _worker(dense_dir: str, moe_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = Path(out_dir)
    for layout, hf_dir, sizes in (("tp2", dense_dir, dict(tp=2)), ("ep2", moe_dir, dict(ep=2)),
                                  ("pp2", moe_dir, dict(pp=2))):
        cpu.init_model_parallel(**sizes, force=True)
        arch, model = load_megatron(hf_dir)
        ids = _ids(arch.vocab_size)
        if ps.get_pipeline_model_parallel_world_size() == 1:
            logits = megatron_logits(model, ids)
        else:   # hand the hidden states from stage 0 to stage 1 by hand (no schedule needed)
            stage = ps.get_pipeline_model_parallel_rank()
            if stage == 1:
                hidden = torch.empty(SEQ, BATCH, arch.tf_kwargs["hidden_size"])
                dist.recv(hidden, src=0)
                model.set_input_tensor(hidden)
            logits = megatron_logits(model, ids)
            if stage == 0:
                dist.send(logits.contiguous(), dst=1)
                logits = torch.empty(BATCH, SEQ, arch.vocab_size)
                dist.recv(logits, src=1)
            else:
                dist.send(logits.contiguous(), dst=0)
        exported = dict(export_hf_state_dict(model, arch))
        with HFCheckpointReader(hf_dir) as r:
            ok = sorted(exported) == sorted(r.keys()) and all(
                torch.equal(exported[k].to(torch.bfloat16), r.get(k)) for k in r.keys())
        verdicts = [None, None]
        dist.all_gather_object(verdicts, "identical" if ok else "DIFFERENT")
        if dist.get_rank() == 0:
            save_file({"logits": logits.contiguous()}, out / f"{layout}.safetensors")
            (out / f"{layout}-export.json").write_text(
                json.dumps({f"rank{i}": v for i, v in enumerate(verdicts)}))
    cpu.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
