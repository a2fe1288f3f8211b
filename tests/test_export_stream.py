"""Streaming export of training checkpoints (int4_qat/export/{dcp_reader,megatron_source}.py):
key conventions, TE-spec names, bf16 parameters vs fp32 master copies, bad input, bounded memory.

Checkpoints are real Megatron-Core saves of tiny models (int4_qat.train.Trainer on CPU, weights
imported from seeded tiny HF checkpoints); the TP / EP / PP layouts and the live-model export are
in tests/test_export_layouts.py.
"""
import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

from int4_qat.export import export_checkpoint
from int4_qat.export.megatron_source import Piece, checkpoint_pieces, open_checkpoint_source
from int4_qat.export.procs import assign_shards
from int4_qat.testing import REPO_ROOT, export_via_model, make_tiny_hf_checkpoint

MODELS = {"qwen3_moe": ("tiny-qwen3-moe", "int4"), "deepseek_v3": ("tiny-deepseek-v3", "int4"),
          "gpt_oss": ("tiny-gpt-oss", "mxfp4")}


def same_export(a, b, skip=("int4_qat_export.json",)) -> list[str]:
    """Files that differ between two export dirs (every file but ``skip``, byte for byte)."""
    fa = sorted(f for f in os.listdir(a) if f not in skip)
    if fa != sorted(f for f in os.listdir(b) if f not in skip):
        return [f"file lists differ: {fa} vs {sorted(os.listdir(b))}"]
    return [f for f in fa if open(os.path.join(a, f), "rb").read() != open(os.path.join(b, f), "rb").read()]


def nothing_written(out) -> bool:
    parent, base = os.path.dirname(str(out)), os.path.basename(str(out))
    return not os.path.exists(out) and not [p for p in os.listdir(parent) if p.startswith(f".{base}.tmp-")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One QAT checkpoint per architecture (fp32, one process) + one BF16-baseline (--no-quant)."""
    import _dist_worker as W
    from int4_qat import data as D
    from int4_qat.train import Trainer

    root = tmp_path_factory.mktemp("ckpts")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in D.system_corpus(max_docs=30)))
    out = {}
    for mt, (model, fmt) in MODELS.items():
        hf = make_tiny_hf_checkpoint(mt, root / f"hf-{mt}")
        for quant in (True, False) if mt == "qwen3_moe" else (True,):
            r = W.tiny_recipe(model, data=[str(corpus)], fmt=fmt)
            tr = Trainer(r, cpu=True, quant=quant, init_from=hf, out=root / f"{mt}-{quant}", resume=False,
                         log=lambda s: None)
            tr.save()
            out[mt if quant else f"{mt}-bf16"] = root / f"{mt}-{quant}" / "ckpt"
    return out


# ------------------------------------------------------------------ conventions (unit)
def test_checkpoint_key_conventions():
    """The normaliser's spellings of one Rule, from Megatron-Core's conventions (module docstring)."""
    e = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight"
    assert checkpoint_pieces((e,), 3, 5, glu=True) == [
        Piece(("decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight",)),
        Piece(("decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight_w",
               "decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight_v")),
        Piece(("decoder.layers.3.mlp.experts.experts.linear_fc1.weight",), expert=5)]
    norm = checkpoint_pieces(("decoder.layers.{layer}.pre_mlp_layernorm.weight",), 1, None, glu=False)
    assert [p.keys[0] for p in norm] == ["decoder.layers.1.pre_mlp_layernorm.weight",
                                         "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"]
    qkv = checkpoint_pieces(("decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",), 0, None, False)
    assert [p.keys[0] for p in qkv] == ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                                        "decoder.layers.0.input_layernorm.weight"]


def test_shard_assignment_is_deterministic_and_balanced():
    sizes = [5, 1, 9, 3, 3, 7, 2]
    for world in (1, 2, 3, 8):
        got = assign_shards(sizes, world)
        assert sorted(i for r in got for i in r) == list(range(len(sizes)))
        assert got == assign_shards(sizes, world)
    loads = [sum(sizes[i] for i in r) for r in assign_shards(sizes, 2)]
    assert max(loads) - min(loads) <= max(sizes)


@pytest.mark.slow
def test_dcp_box_reads_match_full_tensor(ckpts):
    """Boxes that cut across stored chunks (a BF16 baseline stores each expert's fc1 as 2 chunks)."""
    from int4_qat.export.dcp_reader import DistCheckpointReader
    from int4_qat.checkpoint import resolve_checkpoint

    r = DistCheckpointReader(resolve_checkpoint(ckpts["qwen3_moe-bf16"]))
    key = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    tm = r.tensors[key]
    assert tm.shape == (8, 256, 128) and len(tm.chunks) == 16 and not any(k.startswith("optimizer.") for k in r.tensors)
    full = r.read(key)
    for off, size in [((3, 0, 0), (1, 256, 128)), ((2, 100, 5), (3, 60, 100)), ((0, 127, 0), (8, 2, 128))]:
        box = full[tuple(slice(o, o + s) for o, s in zip(off, size, strict=True))]
        assert torch.equal(r.read(key, off, size), box)
    with pytest.raises(ValueError, match="outside"):
        r.read(key, (7, 0, 0), (2, 256, 128))


# ------------------------------------------------------------------ one process: oracle, spec names
@pytest.mark.slow
@pytest.mark.parametrize("which", ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_moe-bf16"])
def test_streamed_export_equals_the_model_path(ckpts, tmp_path, which):
    new, old = tmp_path / "new", tmp_path / "old"
    r = export_checkpoint(str(ckpts[which]), str(new), progress=False)
    export_via_model(ckpts[which], old)
    assert same_export(new, old) == [] and r.shards == 1
    meta = json.loads((new / "int4_qat_export.json").read_text())
    assert meta["checkpoint"]["weight_dtypes"].keys() == {"float32"}
    assert meta["checkpoint"]["trained_with_fake_quant"] is (not which.endswith("bf16"))
    assert "not the optimizer's fp32 master copies" in meta["checkpoint"]["weights"]


#: Transformer-Engine spec names of the tensors the local spec saves differently (TE cannot be
#: installed here): megatron/core/models/gpt/gpt_layer_specs.py, TE layer spec. TE keeps a separate
#: pre-MLP norm in MoE layers and fuses MLA's latent norms into the up projections.
TE_NAMES = {
    "qwen3_moe": [(r"(layers\.\d+)\.mlp\.linear_fc1\.layer_norm_weight$", r"\1.pre_mlp_layernorm.weight")],
    "gpt_oss": [(r"(layers\.\d+)\.mlp\.linear_fc1\.layer_norm_weight$", r"\1.pre_mlp_layernorm.weight")],
    "deepseek_v3": [
        (r"self_attention\.q_layernorm\.weight$", "self_attention.linear_q_up_proj.layer_norm_weight"),
        (r"self_attention\.kv_layernorm\.weight$", "self_attention.linear_kv_up_proj.layer_norm_weight"),
        (r"(layers\.0)\.pre_mlp_layernorm\.weight$", r"\1.mlp.linear_fc1.layer_norm_weight"),
    ],  # dense layer
}


def rename_checkpoint_keys(src, dst, table) -> int:
    """Copy a DCP checkpoint with its keys renamed by ``table`` (regex, replacement) in .metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    shutil.copytree(src, dst)
    md = FileSystemReader(str(dst)).read_metadata()

    def new(k):
        for pat, rep in table:
            k = re.sub(pat, rep, k)
        return k

    renamed = sum(new(k) != k for k in md.state_dict_metadata)
    md.state_dict_metadata = {new(k): v for k, v in md.state_dict_metadata.items()}
    md.storage_data = {dataclasses.replace(i, fqn=new(i.fqn)): v for i, v in md.storage_data.items()}
    with open(os.path.join(dst, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    from int4_qat import checksums  # as a TE-spec run would have saved it: checksums of these files

    checksums.write_checksums(dst, checksums.file_entries(dst))
    return renamed


@pytest.mark.slow
@pytest.mark.parametrize("mt", sorted(TE_NAMES))
def test_te_spec_names_read_the_same(ckpts, tmp_path, mt, monkeypatch):
    from int4_qat.checkpoint import resolve_checkpoint

    it = resolve_checkpoint(ckpts[mt])
    te = tmp_path / "te" / it.name
    n = rename_checkpoint_keys(it, te, TE_NAMES[mt])
    assert n >= 2
    a, b = tmp_path / "local", tmp_path / "te-export"
    export_checkpoint(str(it), str(a), progress=False)
    export_checkpoint(str(te), str(b), progress=False)
    assert same_export(a, b) == []
    # the normaliser is what reads both: without the key-map aliases the local-spec gpt-oss
    # checkpoint (pre-MLP norm saved as mlp.linear_fc1.layer_norm_weight) is not readable
    if mt == "gpt_oss":
        import int4_qat.export.megatron_source as M

        monkeypatch.setattr(M, "CHECKPOINT_KEY_ALIASES", ())
        with pytest.raises(
            ValueError, match=r"checkpoint lacks 2 tensor\(s\) .*e\.g\. decoder\.layers\.0\.pre_mlp_layernorm\.weight;"
        ):
            export_checkpoint(str(it), str(tmp_path / "x"), progress=False)


# ------------------------------------------------------------------ bf16 parameters
@pytest.mark.slow
def test_bf16_parameters_are_quantized_not_fp32_master_copies(tmp_path):
    """A checkpoint whose model parameters are bf16 (GPU runs) and whose optimizer holds fp32
    master copies that differ from them: the export quantizes the bf16 parameters -- what the
    training forward fake-quantized -- and keeps the rest in bf16."""
    import _dist_worker as W
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    from int4_qat import checkpoint as C
    from int4_qat.arch import build_model, import_hf_checkpoint, load_arch, write_hf_checkpoint
    from int4_qat.compat import cpu as compat_cpu
    from int4_qat.export import verify_export
    from int4_qat.scheme import QuantScheme

    hf = make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "hf")
    compat_cpu.init_single_process_gloo()
    compat_cpu.activate_training()
    recipe = W.tiny_recipe("tiny-qwen3-moe", data=["system"], fmt="nvfp4")
    arch = load_arch(hf)
    model = build_model(arch, use_te=False, params_dtype=torch.bfloat16)
    import_hf_checkpoint(model, arch, hf)
    model = recipe.quant.scheme().apply(model)

    class MasterCopies:  # what Megatron's fp16/bf16 optimizer saves (optimizer.py, prefix fp32_param)
        def sharded_state_dict(self, model_sd):
            g = torch.Generator().manual_seed(0)
            return {
                k: make_sharded_optimizer_tensor(
                    v, v.data.float() + 1e-2 * torch.randn(v.data.shape, generator=g), "optimizer.state.fp32_param"
                )
                for k, v in model_sd.items()
                if isinstance(v, (ShardedTensor, ShardedTensorFactory))
            }

    C.save_checkpoint(tmp_path / "ckpt", 1, model, MasterCopies(), recipe=recipe)
    out = tmp_path / "out"
    export_checkpoint(str(tmp_path / "ckpt"), str(out), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    meta = json.loads((out / "int4_qat_export.json").read_text())["checkpoint"]
    assert (
        cfg["torch_dtype"] == "bfloat16" and meta["weight_dtypes"]["bfloat16"] > 100 * meta["weight_dtypes"]["float32"]
    )
    # the export's weights are the bf16 parameters: verify against them in HF layout ...
    source, _, _ = open_checkpoint_source(tmp_path / "ckpt")
    ref = tmp_path / "ref"
    write_hf_checkpoint(((t.name, source.read_tensor(t)) for t in source.tensors()), ref, config=source.config)
    assert verify_export(str(ref), str(out), logits=False).ok
    # ... and not the master copies (whose quantization differs)
    from safetensors import safe_open

    from int4_qat.export.dcp_reader import DistCheckpointReader

    r = DistCheckpointReader(tmp_path / "ckpt" / "iter_0000001", skip_prefixes=())
    master = r.read("optimizer.state.fp32_param.decoder.layers.1.mlp.experts.experts.3.linear_fc2.weight")
    param = r.read("decoder.layers.1.mlp.experts.experts.3.linear_fc2.weight")
    assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
    s = QuantScheme(format="nvfp4")
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight_packed")
    from int4_qat.formats import get_format

    assert torch.equal(packed, get_format("nvfp4").pack(s.quantize(param, "p"))["weight_packed"])
    assert not torch.equal(packed, get_format("nvfp4").pack(s.quantize(master, "m"))["weight_packed"])


# ------------------------------------------------------------------ bad input
def _cli(*args):
    p = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "export.py"), *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("export: error:")]
    return p.returncode, errors, p.stderr


@pytest.mark.slow
def test_bad_checkpoints_one_line_nothing_written(ckpts, tmp_path):
    from int4_qat.checkpoint import resolve_checkpoint

    it = resolve_checkpoint(ckpts["qwen3_moe"])
    out = tmp_path / "out"

    def case(name):
        d = tmp_path / name / "ckpt"
        shutil.copytree(it.parent, d)
        return d, d / it.name

    def refused(path, pattern, **kw):
        # the reader's own checks, as for a checkpoint saved before checksums existed (or
        # --skip-checksums); with checksums.json the damaged file is named even earlier (below)
        with pytest.raises(ValueError, match=pattern) as e:
            export_checkpoint(str(path), str(out), progress=False, verify_checksums=False, **kw)
        assert "\n" not in str(e.value) and nothing_written(out), str(e.value)

    root, d = case("no-latest")
    (root / "latest").unlink()
    refused(root, r"has no 'latest' file .*pass a complete iter_\* directory")
    root, d = case("tmp-only")
    (root / "latest").unlink()
    for x in root.iterdir():
        if x.is_dir():
            x.rename(x.with_name(x.name + ".tmp"))
    refused(root, r"only an interrupted save \(iter_\d+\.tmp\)")
    refused(root / (it.name + ".tmp"), "interrupted save")
    root, d = case("missing")
    (d / "__0_1.distcp").unlink()
    refused(root, r"__0_1\.distcp: missing checkpoint file")
    root, d = case("truncated")
    with open(d / "__0_0.distcp", "r+b") as f:
        f.truncate(os.path.getsize(d / "__0_0.distcp") // 2)
    refused(root, r"__0_0\.distcp: truncated checkpoint file")
    for name, what in (("missing", r"__0_1\.distcp: missing"), ("truncated", r"__0_0\.distcp: truncated")):
        with pytest.raises(ValueError, match=what):  # checksums.json (default): named up front
            export_checkpoint(str(tmp_path / name / "ckpt"), str(out), progress=False)
        assert nothing_written(out)
    for key, value, pattern in [
        ("num_experts", 16, r"router\.weight has shape \[8, 128\], but its config\.json implies \[16, 128\]"),
        (
            "num_hidden_layers",
            3,
            r"checkpoint lacks \d+ tensor\(s\) that its config\.json .* e\.g\. decoder\.layers\.2\.",
        ),
        ("num_hidden_layers", 1, r"checkpoint tensor decoder\.layers\.1\..* matches no qwen3_moe rule"),
        (
            "moe_intermediate_size",
            64,
            r"experts\.0\.linear_fc1\.weight_w has shape \[128, 128\], but its "
            r"config\.json implies \[64, 128\]",
        ),
    ]:
        root, d = case(f"config-{key}-{value}")
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        refused(root, pattern)
    refused(it, r"--format mxfp4 contradicts .*recipe\.yaml quant\.format=int4", fmt="mxfp4")
    # the CLI: exit 2, one line naming the file, nothing written
    rc, errors, err = _cli("--input", tmp_path / "missing" / "ckpt", "--output", out)
    assert rc == 2 and len(errors) == 1 and "__0_1.distcp: missing" in errors[0], err
    rc, errors, err = _cli("--input", it, "--output", out, "--group-size", "64", "--nproc", "2")
    assert rc == 2 and len(errors) == 1 and "--group-size 64 contradicts" in errors[0], err
    assert nothing_written(out)


# ------------------------------------------------------------------ bounded memory
_LIMITED_EXPORT = r"""
import json, resource, sys, torch
from int4_qat.export import export_checkpoint

def status(key):
    d = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(d[key].split()[0]) * 1024

src, out, budget, model_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
export_checkpoint(src, out, progress=False, check_only=True)      # imports and a planning pass
data, rss = status("VmData"), status("VmRSS")
resource.setrlimit(resource.RLIMIT_DATA, (data + budget, resource.getrlimit(resource.RLIMIT_DATA)[1]))
r = export_checkpoint(src, out, progress=False)
peak = status("VmHWM")
try:                      # the limit is real: a model-sized buffer is refused
    torch.empty(model_bytes, dtype=torch.uint8).fill_(1)
    refused = False
except RuntimeError:
    refused = True
print(json.dumps({"limit": data + budget, "rss_before": rss, "peak_rss": peak, "refused": refused,
                  "packed": len(r.packed)}))
"""


@pytest.mark.slow
def test_export_fits_in_a_fraction_of_the_model(tmp_path):
    """An fp32 training checkpoint ~3x larger than the exporting process may hold in total.

    The limit is RLIMIT_DATA (private writable memory: heap and anonymous mmaps, i.e. every torch
    CPU allocation; RLIMIT_AS is useless with torch's large virtual reservations), set in the
    child after its imports and a planning pass to what it has then plus ``BUDGET``. The export
    must succeed and its peak RSS stay within the budget; a model-sized allocation must fail
    (so the limit really binds)."""
    from int4_qat.recipe import Recipe
    from int4_qat.testing import synthetic_checkpoint, tiny_config

    # 44 layers of 37 MB (fp32): attention 24 MB (copied: scope experts), 8 experts 13 MB (packed)
    cfg = tiny_config(
        hidden_size=1024,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        moe_intermediate_size=128,
        intermediate_size=2048,
        num_hidden_layers=44,
        max_window_layers=44,
    )
    d = Recipe.load(REPO_ROOT / "recipes" / "tiny-moe.yaml").to_dict()
    ckpt = synthetic_checkpoint(cfg, tmp_path / "ckpt", dtype=torch.float32, recipe_yaml=Recipe.from_dict(d).to_yaml())
    model_bytes = sum(os.path.getsize(p) for p in (ckpt / "iter_0000001").glob("*.distcp"))
    budget = 160 << 20
    p = subprocess.run(
        [sys.executable, "-c", _LIMITED_EXPORT, str(ckpt), str(tmp_path / "out"), str(budget), str(model_bytes)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    print(
        f"\nmodel {model_bytes / 1e9:.2f} GB fp32; process limit {got['limit'] / 1e9:.2f} GB; RSS "
        f"{got['rss_before'] / 1e6:.0f} MB before -> peak {got['peak_rss'] / 1e6:.0f} MB"
    )
    assert model_bytes > 2.5 * got["limit"]
    assert got["refused"] and got["packed"] == 44 * 8 * 3
    assert got["peak_rss"] - got["rss_before"] < budget
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


# ------------------------------------------------------------------ planner and launcher
def test_planner_states_export_ram_and_disk():
    import int4_qat.export.pipeline as P
    from int4_qat import planner
    from int4_qat.planner import arch_shape, export_plan, plan
    from int4_qat.recipe import Recipe

    # the planner's copy of the exporter's work-item sizes (it must not import torch)
    assert (planner.CHUNK_BYTES, planner.INFLIGHT_BYTES) == (P.CHUNK_BYTES, P.INFLIGHT_BYTES)
    kimi = plan(Recipe.load(REPO_ROOT / "recipes" / "kimi-k2-int4.yaml"))
    e = kimi["export"]
    assert e["processes"] == 16 and e["ram_per_process_gb"] < 4 and e["input_gb"] > 2000
    assert abs(e["disk_gb"] - kimi["serving"]["int4-g32"]["gb"]) < 0.2  # the output only, bf16 rest
    # flat in model size: twice the layers adds metadata, not working memory
    cfg = json.loads((REPO_ROOT / "recipes" / "models" / "qwen3-235b-a22b" / "config.json").read_text())
    a1 = export_plan(arch_shape(cfg), "int4", 128, "experts", tp=4)
    a2 = export_plan(
        arch_shape({**cfg, "num_hidden_layers": 2 * cfg["num_hidden_layers"]}), "int4", 128, "experts", tp=4
    )
    assert a1["working_gb"] == a2["working_gb"] and a2["metadata_gb"] > 1.8 * a1["metadata_gb"]
    assert a2["input_gb"] > 1.9 * a1["input_gb"]


def test_make_export_runs_the_recipes_process_count():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import launch

    from int4_qat.recipe import Recipe

    path = REPO_ROOT / "recipes" / "qwen3-30b-a3b-int4.yaml"
    (cmd,) = launch.export_commands(Recipe.load(path), str(path), [])
    assert cmd[-2:] == ["--nproc", "4"] and "tools/export.py" in cmd[1]
    (cmd,) = launch.export_commands(Recipe.load(REPO_ROOT / "recipes" / "tiny-moe.yaml"), "r.yaml", [])
    assert "--nproc" not in cmd
