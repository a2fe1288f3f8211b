"""tools/export.py / int4_qat.export: formats on disk, ignore lists, refusals, atomicity.

Tiny Qwen3-MoE / DeepSeek-V3 / gpt-oss checkpoints come from int4_qat.testing (transformers
models saved the hub's way, 2 shards + index). End-to-end verification with the consumers'
readers is in tests/test_verify_export.py.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from int4_qat.export import export_checkpoint
from int4_qat.export.ct_config import ignore_list
from int4_qat.testing import make_tiny_hf_checkpoint, random_hf_checkpoint, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {mt: str(make_tiny_hf_checkpoint(mt, root / mt, shards=2)) for mt in ("qwen3_moe", "deepseek_v3", "gpt_oss")}


def _tensors(d):
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for fn in sorted(set(idx.values())):
        with safe_open(os.path.join(d, fn), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return idx, out


def _no_output(out):
    parent, base = os.path.dirname(out), os.path.basename(out)
    return not os.path.exists(out) and not [p for p in os.listdir(parent) if p.startswith(f".{base}.tmp-")]


def test_int4_layout_matches_compressed_tensors(tiny, tmp_path):
    out = str(tmp_path / "int4")
    r = export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", group_size=32, progress=False)
    assert len(r.packed) == 2 * 8 * 3  # 2 layers x 8 experts x gate/up/down
    idx, t = _tensors(out)
    assert set(idx) == set(t) and len(set(idx.values())) == 2  # sharded like the input
    m = "model.layers.1.mlp.experts.5.down_proj"
    assert t[f"{m}.weight_packed"].dtype == torch.int32 and t[f"{m}.weight_packed"].shape == (128, 128 // 8)
    assert t[f"{m}.weight_scale"].dtype == torch.bfloat16 and t[f"{m}.weight_scale"].shape == (128, 128 // 32)
    assert t[f"{m}.weight_shape"].dtype == torch.int64 and t[f"{m}.weight_shape"].tolist() == [128, 128]
    assert f"{m}.weight" not in t
    # what compressed-tensors' own compressor writes for the same codes and scales
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from int4_qat.scheme import QuantScheme

    ref = _tensors(tiny["qwen3_moe"])[1][f"{m}.weight"]
    q = QuantScheme(format="int4", group_size=32).quantize(ref, m)
    assert torch.equal(unpack_from_int32(t[f"{m}.weight_packed"], 4, torch.Size([128, 128])), q.codes.to(torch.int8))
    assert torch.equal(t[f"{m}.weight_scale"], q.scale)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["kv_cache_scheme"] is None
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group", 32)
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    assert _no_output(str(tmp_path / "nothing"))  # no temp dirs left beside the output
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.parametrize("fmt,packed_dtype,scale_dtype,extra", [
    ("mxfp4", torch.uint8, torch.uint8, None),
    ("nvfp4", torch.uint8, torch.float8_e4m3fn, "weight_global_scale"),
])
def test_fp4_layouts(tiny, tmp_path, fmt, packed_dtype, scale_dtype, extra):
    out = str(tmp_path / fmt)
    export_checkpoint(tiny["deepseek_v3"], out, fmt=fmt, progress=False)
    _, t = _tensors(out)
    m = "model.layers.2.mlp.experts.7.gate_proj"
    g = 32 if fmt == "mxfp4" else 16
    assert t[f"{m}.weight_packed"].dtype == packed_dtype and t[f"{m}.weight_packed"].shape == (128, 64)
    assert t[f"{m}.weight_scale"].dtype == scale_dtype and t[f"{m}.weight_scale"].shape == (128, 128 // g)
    if extra:
        assert t[f"{m}.{extra}"].dtype == torch.float32 and t[f"{m}.{extra}"].shape == (1,)
        # gate/up are trained fused (Megatron linear_fc1) and served fused (w13): one global scale
        up, down = m.replace("gate_proj", "up_proj"), m.replace("gate_proj", "down_proj")
        assert torch.equal(t[f"{m}.{extra}"], t[f"{up}.{extra}"])
        assert not torch.equal(t[f"{m}.{extra}"], t[f"{down}.{extra}"])
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["format"] == f"{fmt}-pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["type"] == "float"
    # scope experts: shared experts, the dense layer-0 MLP and MLA attention stay bf16
    for name in ("model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.self_attn.kv_b_proj.weight"):
        assert t[name].dtype == torch.bfloat16


def test_gpt_oss_native_mxfp4(tiny, tmp_path):
    out = str(tmp_path / "gptoss")
    export_checkpoint(tiny["gpt_oss"], out, fmt="mxfp4", progress=False)
    _, t = _tensors(out)
    b, s = t["model.layers.0.mlp.experts.gate_up_proj_blocks"], t["model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert b.dtype == torch.uint8 and b.shape == (4, 256, 128 // 32, 16)
    assert s.dtype == torch.uint8 and s.shape == (4, 256, 128 // 32)
    assert t["model.layers.0.mlp.experts.gate_up_proj_bias"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.experts.gate_up_proj" not in t
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "mxfp4"
    assert {"model.layers.*.mlp.router", "model.embed_tokens", "lm_head"} <= set(qc["modules_to_not_convert"])
    with pytest.raises(ValueError, match="gpt-oss experts .* native MXFP4"):
        export_checkpoint(tiny["gpt_oss"], str(tmp_path / "x"), fmt="int4", progress=False)
    assert _no_output(str(tmp_path / "x"))


def test_router_never_packed_and_ignore_list(tiny, tmp_path):
    out = str(tmp_path / "all")
    export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", scope="all-linear", group_size=64, progress=False)
    _, t = _tensors(out)
    assert t["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    never = r"mlp\.gate\.weight_|embed_tokens\.weight_|lm_head\.weight_|norm\.weight_"
    assert not [k for k in t if re.search(never, k)]
    assert "model.layers.0.self_attn.q_proj.weight_packed" in t  # all-linear packs attention
    ign = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["ignore"]
    assert ign == ["lm_head", "model.embed_tokens", r"re:model\.layers\.\d+\.mlp\.gate$"]


def test_ignore_list_generation_never_hides_quantized():
    q = ["model.layers.0.mlp.experts.0.gate_proj", "model.layers.1.self_attn.q_proj"]
    unq = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate", "lm_head", "model.layers.1.mlp.gate"]
    ign = ignore_list(unq, q)
    from compressed_tensors.utils.match import match_name

    for n in unq:
        assert any(match_name(n, i) for i in ign), n
    for n in q:
        assert not any(match_name(n, i) for i in ign), n
    # layer 0 q_proj is unquantized but layer 1 q_proj is: the pattern falls back to the exact name
    assert r"re:model\.layers\.0\.self_attn\.q_proj$" in ign
    assert r"re:model\.layers\.\d+\.mlp\.gate$" in ign


def _copy_ckpt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(path, fn):
    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    fn(t)
    save_file(t, path, metadata={"format": "pt"})


def test_refuses_nan_naming_tensor(tiny, tmp_path):
    d = _copy_ckpt(tiny["qwen3_moe"], tmp_path / "nan")
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    name = "model.layers.1.mlp.experts.3.up_proj.weight"

    def poison(t):
        t[name][5, 7] = float("nan")

    _rewrite(os.path.join(d, idx[name]), poison)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.experts.3.up_proj")):
        export_checkpoint(d, out, fmt="int4", progress=False)
    assert _no_output(out)
    # a copied (unquantized) tensor with Inf is refused too
    name2 = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(os.path.join(d, idx[name]), lambda t: t[name].nan_to_num_(0.0))
    _rewrite(os.path.join(d, idx[name2]), lambda t: t[name2].__setitem__((0, 0), float("inf")))
    with pytest.raises(ValueError, match=re.escape(name2)):
        export_checkpoint(d, out, fmt="int4", progress=False)
    assert _no_output(out)


def test_refuses_bad_shapes_and_unservable(tiny, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(
        ValueError, match=r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight: shape \[128, 128\].*group size 48"
    ):
        export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", group_size=48, progress=False)
    assert _no_output(out)
    with pytest.raises(
        ValueError,
        match=r"(?s)serving TP 4 / EP 1.*\(moe_intermediate_size / \(serving_tp / serving_ep\)\) "
        r"% max\(64, group\) == 0, but 128 / 4 = 32 .*fix: .*export.serving_ep: 4",
    ):
        export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", serving_tp=4, progress=False)
    assert _no_output(out)
    # serving expert parallel: each rank holds whole 128-wide experts -> servable
    export_checkpoint(tiny["qwen3_moe"], str(tmp_path / "ep"), fmt="int4", serving_tp=4, serving_ep=4, progress=False)
    with pytest.warns(UserWarning, match=r"Marlin serves INT4 groups \[32, 64, 128\] only, got 16"):
        export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", group_size=16, progress=False)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))


def test_refuses_malformed_inputs(tiny, tmp_path):
    out = str(tmp_path / "out")
    # truncated shard
    d = _copy_ckpt(tiny["qwen3_moe"], tmp_path / "trunc")
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 1000)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: truncated"):
        export_checkpoint(d, out, fmt="int4", progress=False)
    assert _no_output(out)
    # index missing an entry
    d = _copy_ckpt(tiny["qwen3_moe"], tmp_path / "idx")
    ip = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(ip))
    gone = sorted(index["weight_map"])[3]
    del index["weight_map"][gone]
    json.dump(index, open(ip, "w"))
    with pytest.raises(ValueError, match=f"tensor {re.escape(gone)} is in shard .* has no entry"):
        export_checkpoint(d, out, fmt="int4", progress=False)
    assert _no_output(out)
    # pickles are refused, never loaded
    d = _copy_ckpt(tiny["qwen3_moe"], tmp_path / "bin")
    torch.save({"x": torch.zeros(1)}, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"pickled weights \['pytorch_model.bin'\]: refusing"):
        export_checkpoint(d, out, fmt="int4", progress=False)
    assert _no_output(out)
    # an existing export is not overwritten silently
    export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", progress=False)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", progress=False)


def test_injected_failure_leaves_nothing(tiny, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="injected failure after 1"):
        export_checkpoint(tiny["qwen3_moe"], out, fmt="int4", progress=False, _fail_after=1)
    assert _no_output(out)


def test_sigkill_midway_leaves_no_completed_output(tmp_path):
    # ~110 MB of BF16 (3 MoE layers of 8 experts, hidden 1024) in 3 shards: long enough to kill
    # while shards are being written
    src = tmp_path / "big"
    cfg = tiny_config(
        hidden_size=1024,
        moe_intermediate_size=1024,
        num_hidden_layers=3,
        head_dim=128,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
        intermediate_size=1024,
    )
    random_hf_checkpoint(cfg, src, shards=3)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "tools/export.py"),
            "--input",
            str(src),
            "--output",
            str(out),
            "--format",
            "int4",
            "--no-progress",
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        tmps = [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp-")]
        if tmps and any(f.endswith(".safetensors") for f in os.listdir(tmp_path / tmps[0])):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed, f"export ended (exit code {proc.returncode}) before it could be killed"
    assert not os.path.exists(out)  # the temp dir may remain, but never under the output's name
    # the next export to the same output cleans the stale temp dir and completes
    export_checkpoint(str(src), str(out), fmt="int4", progress=False)
    assert os.path.isfile(out / "model.safetensors.index.json")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp-")]


@pytest.mark.parametrize("model,fmt", [("gpt_oss", "mxfp4"), ("qwen3_moe", "nvfp4")])
def test_chunked_streaming_is_byte_identical(tiny, tmp_path, model, fmt):
    """Tensors streamed in row / expert chunks (tiny chunk budget) give the same bytes."""
    a, b = str(tmp_path / "whole"), str(tmp_path / "chunked")
    export_checkpoint(tiny[model], a, fmt=fmt, progress=False, workers=1)
    export_checkpoint(tiny[model], b, fmt=fmt, progress=False, workers=2, chunk_bytes=4096)
    for fn in sorted(os.listdir(a)):
        if fn.endswith(".safetensors"):
            assert open(os.path.join(a, fn), "rb").read() == open(os.path.join(b, fn), "rb").read(), fn


@pytest.mark.parametrize("dtype, warns", [(torch.float32, True), (torch.bfloat16, False)])
def test_served_exact_scheme_exported_for_marlin_says_so(tmp_path, dtype, warns):
    """A scheme trained for llama.cpp's exact q*s (served: exact), exported as compressed-tensors
    (Marlin serves bf16(q*s)): fp32 weights are served bf16-rounded, and the export says so; bf16
    weights are served bit for bit (both rules give the same bits), so nothing is said."""
    import warnings as w

    from int4_qat.export.pipeline import export_hf_dir
    from int4_qat.scheme import QuantScheme

    hf = make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "hf", dtype=dtype)
    scheme = QuantScheme(format="int4", group_size=32, served="exact")
    with w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        export_hf_dir(str(hf), str(tmp_path / "out"), scheme, progress=False)
    said = [str(x.message) for x in seen if "served: exact" in str(x.message)]
    assert bool(said) == warns, said
    if warns:
        assert "float32 weights are served rounded to bf16" in said[0]
