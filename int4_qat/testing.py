"""Test helpers: tiny, deterministic Hugging Face checkpoints built from a config (no downloads).

``make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "hf")`` instantiates the transformers model of
``recipes/models/tiny-qwen3-moe/config.json`` with a fixed seed and saves it the way
``save_pretrained`` does (HF tensor names, per-expert ``mlp.experts.{e}.gate_proj`` layout for
Qwen3-MoE, ``config.json``, ``generation_config.json``), re-sharded into exactly ``shards``
safetensors files plus ``model.safetensors.index.json``.

transformers initialises RMSNorm weights to exactly 1 and some routers to 0. A parity test on
such a model cannot see a swapped q/k norm or a broken router, so every parameter that comes out
*constant* is redrawn: 1-D ones as ``1 + 0.1 * N(0, 1)``, others as ``N(0, initializer_range)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from int4_qat.arch.hf_io import HFCheckpointReader, write_hf_checkpoint

__all__ = ["REPO_ROOT", "TINY_CONFIGS_DIR", "tiny_config_dir", "tiny_config", "make_tiny_hf_checkpoint",
           "build_tiny_hf_model", "rewrite_checkpoint", "megatron_from_hf", "random_hf_checkpoint",
           "export_via_model", "synthetic_checkpoint", "fake_quant_hf_state_dict"]

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIGS_DIR = REPO_ROOT / "recipes" / "models"


def tiny_config_dir(model_type_or_config_dir: str | os.PathLike) -> Path:
    """A directory holding a tiny ``config.json``: the argument itself if it is one, else the
    ``recipes/models/tiny-*/`` directory whose config has that ``model_type``."""
    p = Path(model_type_or_config_dir)
    if (p / "config.json").is_file():
        return p
    found = []
    for cfg in sorted(TINY_CONFIGS_DIR.glob("tiny-*/config.json")):
        if json.loads(cfg.read_text()).get("model_type") == str(model_type_or_config_dir):
            found.append(cfg.parent)
    if not found:
        known = sorted(json.loads(c.read_text()).get("model_type", "?")
                       for c in TINY_CONFIGS_DIR.glob("tiny-*/config.json"))
        raise ValueError(f"no tiny config for {str(model_type_or_config_dir)!r}: not a directory "
                         f"with config.json, nor a model_type in {TINY_CONFIGS_DIR} ({known})")
    return found[0]


def tiny_config(model_type_or_config_dir: str | os.PathLike = "qwen3_moe", **overrides) -> dict:
    """The tiny ``config.json`` (see :func:`tiny_config_dir`) as a dict with ``overrides`` applied:
    the one way a test or bench derives a larger or edited model from the shipped tiny configs."""
    cfg = json.loads((tiny_config_dir(model_type_or_config_dir) / "config.json").read_text())
    cfg.update(overrides)
    return cfg


def build_tiny_hf_model(config_dir: str | os.PathLike, seed: int = 0):
    """The transformers ``*ForCausalLM`` for ``config_dir`` in fp32, seeded, with constant
    parameters redrawn (see module docstring). Returns the model in eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(config_dir))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if p.ndim == 1 else std * noise)
    return model.eval()


def make_tiny_hf_checkpoint(model_type_or_config_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            shards: int = 2) -> Path:
    """Write a tiny HF checkpoint (``shards`` safetensors + index, config, generation config)
    to ``out_dir`` and return it. Deterministic in ``seed``."""
    cfg_dir = tiny_config_dir(model_type_or_config_dir)
    model = build_tiny_hf_model(cfg_dir, seed).to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # save_pretrained applies transformers' checkpoint conversion (e.g. fused in-memory
        # experts -> per-expert on-disk names), so the names are the hub's.
        model.save_pretrained(tmp)
        with HFCheckpointReader(tmp) as r:
            tensors = [(n, r.get(n)) for n in sorted(r.keys())]
        for extra in ("config.json", "generation_config.json"):
            if (Path(tmp) / extra).is_file():
                shutil.copy(Path(tmp) / extra, out / extra)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    write_hf_checkpoint(tensors, out, shards=shards)
    return out


def rewrite_checkpoint(ckpt_dir: str | os.PathLike, transform, shards: int = 2) -> Path:
    """Rewrite ``ckpt_dir`` in place with ``transform(name, tensor) -> tensor`` applied to every
    tensor (tests use it to give features that transformers initialises to ~0 a size that bites)."""
    import json

    from int4_qat.arch.hf_io import iter_checkpoint

    out = Path(ckpt_dir)
    tensors = [(name, transform(name, t)) for name, t in iter_checkpoint(out)]
    write_hf_checkpoint(tensors, out, shards=shards, config=json.loads((out / "config.json").read_text()))
    return out


def megatron_from_hf(ckpt_dir: str | os.PathLike):
    """``(model.eval(), arch)``: the Megatron model (local spec) with ``ckpt_dir``'s weights imported."""
    from int4_qat.arch import build_model, import_hf_checkpoint, load_arch

    arch = load_arch(ckpt_dir)
    model = build_model(arch, use_te=False)
    import_hf_checkpoint(model, arch, ckpt_dir)
    return model.eval(), arch


def random_hf_checkpoint(config: dict, out_dir: str | os.PathLike, *, shards: int = 2, seed: int = 0,
                         dtype: torch.dtype = torch.bfloat16, std: float = 0.02) -> Path:
    """A structurally complete HF checkpoint for ``config`` (every tensor
    ``int4_qat.arch.expected_hf_tensors`` lists, N(0, std) values, 1-D tensors around 1) without
    instantiating a transformers model: for sizes where building the model would be slow."""
    from int4_qat.arch import expected_hf_tensors, load_arch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    expected = expected_hf_tensors(load_arch(out)).required

    def tensors():
        for name in sorted(expected):
            t = torch.randn(expected[name], generator=gen) * std
            yield name, (t / std * 0.1 + 1 if t.dim() == 1 else t).to(dtype)
    if shards == 1:
        return write_hf_checkpoint(tensors(), out, max_shard_bytes=1 << 62)
    total = sum(torch.Size(s).numel() for s in expected.values()) * torch.empty((), dtype=dtype).element_size()
    return write_hf_checkpoint(tensors(), out, max_shard_bytes=max(1, total // shards + 1))


def export_via_model(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                     hf_dir: str | os.PathLike | None = None, **kw) -> Path:
    """The test oracle for the streaming checkpoint export: the previous, gather-to-one-process
    path. Builds the whole model on one CPU process (``int4_qat.checkpoint.load_model_for_export``,
    fp32, ``int4_qat.compat.cpu``), writes its gathered weights as an intermediate HF dir
    (``hf_dir``, kept; a temp dir by default) and exports that dir with the checkpoint's scheme.
    Memory and disk: the whole model, twice -- tests only. ``kw``: ``export_hf_dir`` options."""
    from int4_qat.arch import export_hf_state_dict, write_hf_checkpoint
    from int4_qat.checkpoint import load_model_for_export, resolve_checkpoint
    from int4_qat.export.pipeline import export_hf_dir, resolve_scheme

    iter_dir = resolve_checkpoint(ckpt_dir)
    scheme, (tp, ep) = resolve_scheme(None, None, None, None, str(iter_dir))
    model, arch, _ = load_model_for_export(iter_dir)
    config = dict(arch.hf_config)
    dtypes = {p.dtype for p in model.parameters()}
    config["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "") if len(dtypes) == 1 else "float32"
    with tempfile.TemporaryDirectory(prefix="oracle-hf-") as tmp:
        hf = Path(hf_dir) if hf_dir is not None else Path(tmp)
        write_hf_checkpoint(export_hf_state_dict(model, arch), hf, config=config)
        del model
        kw.setdefault("progress", False)
        export_hf_dir(str(hf), str(output_dir), scheme, serving_tp=kw.pop("serving_tp", tp),
                      serving_ep=kw.pop("serving_ep", ep), **kw)
    return Path(output_dir)


def synthetic_checkpoint(config: dict, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                         seed: int = 0, recipe_yaml: str | None = None) -> Path:
    """A training-checkpoint root (``out_dir/iter_0000001`` + ``latest``) of random weights, for
    benchmarks and scale tests: the sharded-state keys of a quantized local-spec run (GLU
    ``linear_fc1`` as ``_w`` / ``_v``, one key per expert) derived from the Rule table with the
    checkpoint reader's own key conventions (``int4_qat.export.megatron_source.checkpoint_pieces``),
    written with ``torch.distributed.checkpoint`` one tensor at a time (each tensor is generated
    when DCP asks for it), so any size fits in memory. ``config``: an HF config.json dict."""
    import zlib

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from int4_qat.arch import load_arch
    from int4_qat.export.megatron_source import checkpoint_pieces, rule_slots

    root = Path(out_dir)
    it = root / "iter_0000001"
    it.mkdir(parents=True, exist_ok=True)
    (it / "config.json").write_text(json.dumps(config, indent=2))
    arch = load_arch(it)
    rules = arch.rules()
    shapes: dict[str, tuple[int, ...]] = {}
    for slot in rule_slots(arch):
        rule = rules[slot.rule]
        if not rule.export:
            continue
        glu = rule.split == "glu"
        piece = next(p for p in checkpoint_pieces(rule.mcore, slot.layer, slot.expert, glu)
                     if p.expert is None and len(p.keys) == (2 if glu else 1))
        full = tuple(rule.shape(arch.shape))
        for k in piece.keys:
            shapes[k] = (full[0] // 2, *full[1:]) if glu else full

    class _Lazy(DefaultSavePlanner):
        def resolve_data(self, write_item):
            key = write_item.index.fqn
            g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(key.encode()))
            shape = shapes[key]
            t = torch.randn(shape, generator=g)
            return (1 + 0.1 * t if len(shape) == 1 else 0.02 * t).to(dtype)

    sd = {k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}
    dcp.save(sd, storage_writer=FileSystemWriter(str(it), thread_count=1), planner=_Lazy(), no_dist=True)
    if recipe_yaml is not None:
        (it / "recipe.yaml").write_text(recipe_yaml)
    (it / "train_state.json").write_text(json.dumps({"complete": True, "step": 1, "quantized": True}))
    (root / "latest").write_text(it.name + "\n")
    return root


def fake_quant_hf_state_dict(model: torch.nn.Module, arch) -> dict[str, torch.Tensor]:
    """The HF-named weights a quantized Megatron ``model`` computes with: its ModelOpt quantizers'
    fake-quantized weights in place of the quantized parameters, every other tensor as it is, gathered
    over TP / EP / PP by ``export_hf_state_dict`` (collective under a process group: every rank calls
    it). The parameters are restored before returning. The oracle that exports are compared with."""
    from int4_qat.arch import export_hf_state_dict
    from int4_qat.checkpoint import _unwrap
    from int4_qat.modelopt_backend import fake_quantized_weights

    model = _unwrap(model)
    params = dict(model.named_parameters())
    fq = fake_quantized_weights(model)
    saved = {k: params[k].data.clone() for k in fq}
    try:
        with torch.no_grad():
            for k, v in fq.items():
                params[k].data.copy_(v)
            return {n: t.clone() for n, t in export_hf_state_dict(model, arch)}
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].data.copy_(v)
