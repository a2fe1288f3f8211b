"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded + index).

An HF checkpoint directory holds ``config.json`` and either one ``model.safetensors`` or N shards
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` whose ``weight_map``
maps each tensor name to its shard file (the layout ``transformers.PreTrainedModel.save_pretrained``
writes; see transformers/modeling_utils.py and huggingface_hub's ``split_torch_state_dict_into_shards``).
Only safetensors are read -- never pickles (``*.bin`` checkpoints are refused with a clear error).

:class:`HFCheckpointReader` opens shards lazily and memory-maps them, so reading the few tensors a
Megatron rank needs (its TP slice, its experts, its pipeline stage's layers) touches only those.
:func:`write_hf_checkpoint` streams ``(name, tensor)`` pairs into size-bounded shards and writes the
index last, so a reader never sees a half-written checkpoint as complete.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from int4_qat.arch.base import Arch, Rule, shard, template_regex, unshard

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "HFCheckpointReader",
    "read_config",
    "read_index",
    "write_hf_checkpoint",
    "iter_checkpoint",
    "import_hf_checkpoint",
    "export_hf_state_dict",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _read_json(path: Path, what: str):
    """Parsed JSON of ``path``; ValueError naming the file for undecodable or invalid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte offset {e.start}); fix: restore "
                         f"the original file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e}); fix: restore the original file") from None


def read_config(hf_dir: str | os.PathLike) -> tuple[dict, Path]:
    """Return ``(config dict, path of config.json)``; ValueError naming the file if absent/invalid.

    ``"quantization_config": null`` means "not quantized" (as transformers reads it) and is
    dropped from the returned dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no config.json in HF model directory {hf_dir}")
    cfg = _read_json(path, "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got a JSON "
                         f"{type(cfg).__name__}; fix: use the model's own config.json")
    if "quantization_config" in cfg and cfg["quantization_config"] is None:
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    elif "quantization_config" in cfg and not isinstance(cfg["quantization_config"], dict):
        raise ValueError(f"{path}: 'quantization_config' must be a JSON object or null, got "
                         f"{cfg['quantization_config']!r}")
    return cfg, path


def read_index(index: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``, validated *before* any shard is
    opened: a JSON object whose ``weight_map`` maps tensor names to shard file names, every shard
    path lying inside the index's directory (judged by the path itself, ``..`` and absolute
    paths refused; symlinks are followed later, as HF cache snapshots use them)."""
    index = Path(index)
    data = _read_json(index, "the safetensors index")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict):
        got = type(wm).__name__ if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"{index}: 'weight_map' must be a JSON object {{tensor name: shard file}}, "
                         f"got {got}; fix: restore the checkpoint's index")
    for name, fname in wm.items():
        if not isinstance(fname, str) or not fname:
            raise ValueError(f"{index}: tensor {name} maps to {fname!r}, not a shard file name")
        norm = os.path.normpath(fname)
        if os.path.isabs(fname) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
            raise ValueError(f"{index}: tensor {name} maps to {fname!r}, outside the input "
                             f"directory {index.parent}; refusing to open it (shards must lie in the "
                             f"checkpoint directory)")
    return wm


class HFCheckpointReader:
    """Lazy, name-addressed access to the tensors of an HF safetensors checkpoint directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        single = self.dir / SINGLE_NAME
        if index.is_file():
            weight_map = read_index(index)
            self._files = {name: self.dir / fname for name, fname in weight_map.items()}
            for f in sorted(set(self._files.values())):
                if not f.is_file():
                    raise ValueError(f"{index}: shard {f.name} listed in weight_map does not exist")
        elif single.is_file():
            with safe_open(single, framework="pt") as h:
                self._files = {name: single for name in h.keys()}
        else:
            pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(
                p.name for p in self.dir.glob("*.pt"))
            hint = f" (found {pickles}: pickled checkpoints are not read; convert to safetensors)" \
                if pickles else ""
            raise ValueError(f"{self.dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found{hint}")
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def file_of(self, name: str) -> Path:
        if name not in self._files:
            raise ValueError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self._files[name]

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except Exception as e:   # safetensors' own error types: truncated / corrupt header
                raise ValueError(f"{path}: not a readable safetensors file ({e}); fix: restore the "
                                 f"checkpoint's shard") from None
        return self._handles[path]

    def metadata(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{name: (dtype, shape)}`` of every tensor, from the shard headers (nothing is read)."""
        from int4_qat.export.source import _DTYPES

        out = {}
        for name, path in self._files.items():
            sl = self._handle(path).get_slice(name)
            out[name] = (_DTYPES.get(sl.get_dtype(), torch.uint8), tuple(sl.get_shape()))
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of(name)).get_slice(name).get_shape())

    def get(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """The full tensor ``name`` (ValueError naming the file and tensor when it is absent);
        with ``index``, only ``tensor[index]`` is read (one expert of a stacked expert tensor)."""
        path = self.file_of(name)
        h = self._handle(path)
        if name not in h.keys():
            raise ValueError(f"{path}: tensor {name!r} listed in the index is not in this shard")
        if index is not None:
            sl = h.get_slice(name)
            if not 0 <= index < sl.get_shape()[0]:
                raise ValueError(f"{path}: tensor {name!r} {tuple(sl.get_shape())} has no "
                                 f"expert {index} on dim 0")
            return sl[index]
        return h.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_hf_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    shards: Optional[int] = None,
    config: Optional[dict] = None,
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Write ``(name, tensor)`` pairs as safetensors shards + ``model.safetensors.index.json``.

    Shards hold at most ``max_shard_bytes`` (a larger tensor gets a shard of its own). With
    ``shards=N`` the tensors are instead split into N shards of about equal size (this needs them
    all in memory, fine for tests). One shard is still written with an index, like transformers
    does for sharded saves. ``config`` (a dict) is written to ``config.json`` when given.
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    if shards is not None:
        items = list(tensors)
        if shards < 1:
            raise ValueError(f"write_hf_checkpoint: shards must be >= 1, got {shards}")
        total = max(1, sum(t.numel() * t.element_size() for _, t in items))
        # Tensor i goes to shard floor(bytes before i * N / total): N shards of about equal size
        # (fewer only when there are fewer tensors than shards).
        target, cum = [], 0
        for _, t in items:
            target.append(min(shards - 1, cum * shards // total))
            cum += t.numel() * t.element_size()
        tensors = iter(items)
    # Shards are written as soon as they are full (under temporary names, since N is only known
    # at the end), then renamed to model-0000i-of-0000N.safetensors.
    tmp_files: list[tuple[Path, list[str]]] = []
    group: dict[str, torch.Tensor] = {}
    size = total_size = 0
    seen: set[str] = set()

    def flush() -> None:
        tmp = out / f".tmp-shard-{len(tmp_files):05d}.safetensors"
        save_file(group, str(tmp), metadata=meta)
        tmp_files.append((tmp, list(group)))

    for name, t in tensors:
        if name in seen:
            raise ValueError(f"write_hf_checkpoint: tensor {name!r} given twice")
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        full = (target[len(seen) - 1] != target[len(seen) - 2]) if shards is not None \
            else size + nbytes > max_shard_bytes
        if group and full:
            flush()
            group, size = {}, 0
        group[name] = t.detach().contiguous().cpu()
        size += nbytes
        total_size += nbytes
    if group or not tmp_files:
        flush()
    n = len(tmp_files)
    weight_map: dict[str, str] = {}
    for i, (tmp, names) in enumerate(tmp_files):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.replace(out / fname)
        weight_map.update({name: fname for name in names})
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


def iter_checkpoint(hf_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(name, tensor)`` of a checkpoint, in sorted name order."""
    with HFCheckpointReader(hf_dir) as r:
        for name in sorted(r.keys()):
            yield name, r.get(name)


# ====================================================================== Megatron <-> HF tensors
@dataclass
class _Slot:
    """One local Megatron tensor matched to a rule, with its global layer / expert index."""
    name: str
    tensor: torch.Tensor
    rule: Rule
    layer: Optional[int]
    expert: Optional[int]
    local_expert: Optional[int]


def _unwrap(model):
    while hasattr(model, "module"):       # DDP / Float16Module wrappers
        model = model.module
    return model


def _parallel():
    """(tp_rank, tp_size, etp_rank, etp_size, ep_rank, ep_size) of this process."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())


def _slots(model, arch: Arch) -> list[_Slot]:
    """Match every local parameter (and rule-named buffer) of ``model`` to a rule of ``arch``.

    Raises ValueError listing the parameters no rule maps (a mapping-table bug)."""
    model = _unwrap(model)
    patterns = [(template_regex(t), rule) for rule in arch.rules() for t in rule.mcore]
    _, _, _, _, ep_rank, ep_size = _parallel()
    per_rank = arch.num_experts // ep_size if arch.is_moe else 0
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    named = list(model.named_parameters()) + list(model.named_buffers())
    slots, unmapped = [], []
    for name, tensor in named:
        for rx, rule in patterns:  # noqa: B007 - the matching rule is used after the loop
            m = rx.match(name)
            if m:
                break
        else:
            if isinstance(tensor, torch.nn.Parameter):
                unmapped.append(name)
            continue
        layer = expert = local = None
        if "layer" in m.groupdict():
            layer = layers[int(m["layer"])].layer_number - 1      # local -> global (PP offset)
        if "expert" in m.groupdict():
            local = int(m["expert"])
            expert = ep_rank * per_rank + local                   # local -> global (EP)
        slots.append(_Slot(name, tensor, rule, layer, expert, local))
    if unmapped:
        raise ValueError(f"{arch.model_type}: no HF mapping for Megatron parameter(s) {unmapped} "
                         f"(add a Rule in int4_qat/arch/{arch.definition.model_type}.py)")
    return slots


def import_hf_checkpoint(model, arch: Arch, hf_dir: str | os.PathLike) -> dict:
    """Load an HF safetensors checkpoint into this rank's part of a Megatron ``GPTModel``.

    Reads only the tensors this rank needs (its pipeline stage's layers, its EP rank's experts)
    and slices them for its TP / expert-TP rank. Raises ValueError naming the file and tensor for a
    missing or mis-shaped tensor, and for checkpoint tensors no rule maps (unless the architecture
    declares them ignorable). Returns ``{"tensors": n_local_tensors, "hf_tensors": n_read}``.
    """
    tp_rank, tp, etp_rank, etp, _, _ = _parallel()
    cfg_path = Path(hf_dir) / "config.json"
    if cfg_path.is_file() and read_config(hf_dir)[0].get("quantization_config"):
        raise ValueError(f"{cfg_path}: the checkpoint is quantized ('quantization_config'); "
                         "import_hf_checkpoint reads unquantized BF16/FP32 weights only")
    slots = _slots(model, arch)
    with HFCheckpointReader(hf_dir) as reader:
        known = [template_regex(t) for rule in arch.rules() for t in rule.hf]
        known += [re.compile(p) for p in arch.definition.ignore_hf]
        stray = [k for k in reader.keys() if not any(rx.match(k) for rx in known)]
        if stray:
            raise ValueError(f"{hf_dir}: checkpoint tensor(s) {sorted(stray)[:8]} match no "
                             f"{arch.model_type} mapping rule (is config.json from this checkpoint?)")
        # what the per-tensor loop below cannot see (headers only, before anything is loaded): an
        # expert / layer beyond the config's counts, an integer tensor (it would be cast silently).
        # Missing and mis-shaped tensors are reported by the loop, naming the Megatron target.
        from int4_qat.arch.expected import expected_hf_tensors

        problems = [p for p in expected_hf_tensors(arch).problems(reader.metadata(), str(hf_dir))
                    if "is missing" not in p and "has shape" not in p]
        if problems:
            raise ValueError(f"{hf_dir}: the checkpoint does not match the model's config.json:\n  "
                             + "\n  ".join(p.removeprefix(f"{hf_dir}: ") for p in problems)
                             + "\nfix: use the checkpoint that belongs to model.config, or repair it")
        n_read = 0
        for s in slots:
            names = s.rule.hf_names(s.layer, s.expert)
            for n in names:
                if n not in reader:
                    raise ValueError(f"{hf_dir}: tensor {n!r} is missing from the checkpoint "
                                     f"(needed for Megatron {s.name})")
            hf = [reader.get(n, s.expert if s.rule.stacked else None) for n in names]
            n_read += len(hf)
            where = ", ".join(f"{n} {tuple(t.shape)} in {reader.file_of(n).name}"
                              for n, t in zip(names, hf, strict=True))
            try:
                full = s.rule.combine(arch, hf)
                rank, size = (etp_rank, etp) if s.rule.is_expert else (tp_rank, tp)
                part = shard(full, s.rule.split, rank, size, where)
            except RuntimeError as e:  # reshape/cat of a mis-shaped tensor
                raise ValueError(f"{hf_dir}: cannot convert {where} to Megatron {s.name}: {e}") from None
            if tuple(part.shape) != tuple(s.tensor.shape):
                raise ValueError(f"{hf_dir}: shape mismatch for {where}: gives {tuple(part.shape)} "
                                 f"for Megatron {s.name}, which is {tuple(s.tensor.shape)} here")
            with torch.no_grad():
                s.tensor.copy_(part.to(dtype=s.tensor.dtype, device=s.tensor.device))
    return {"tensors": len(slots), "hf_tensors": n_read}


def _all_gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    import torch.distributed as dist

    t = t.detach().contiguous()
    wire = t.float() if t.dtype == torch.bfloat16 and t.device.type == "cpu" else t
    out = [torch.empty_like(wire) for _ in range(size)]
    dist.all_gather(out, wire, group=group)
    return [o.to(t.dtype) for o in out]


def _stage_items(slots: list[_Slot], arch: Arch) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This PP stage's exported tensors, gathered over TP / expert-TP and EP (collective)."""
    from megatron.core import parallel_state as ps

    _, tp, _, etp, _, ep = _parallel()
    stacks: dict = {}      # (id(rule), layer) -> {expert: [HF tensors]} for stacked rules
    for s in slots:
        if not s.rule.export:
            continue
        if s.rule.is_expert:
            full = unshard(_all_gather(s.tensor, ps.get_expert_tensor_parallel_group(), etp), s.rule.split)
            per_rank = arch.num_experts // ep
            for r, t in enumerate(_all_gather(full, ps.get_expert_model_parallel_group(), ep)):
                expert = r * per_rank + s.local_expert
                names = s.rule.hf_names(s.layer, expert)
                if not s.rule.stacked:
                    yield list(zip(names, s.rule.separate(arch, t), strict=True))
                    continue
                # (added for gpt_oss.py) stacked rule: yield once the layer's last expert arrives.
                got = stacks.setdefault((id(s.rule), s.layer), {})
                got[expert] = s.rule.separate(arch, t)
                if len(got) == arch.num_experts:
                    del stacks[(id(s.rule), s.layer)]
                    yield [(n, torch.stack([got[e][i] for e in range(arch.num_experts)]))
                           for i, n in enumerate(names)]
        else:
            full = unshard(_all_gather(s.tensor, ps.get_tensor_model_parallel_group(), tp), s.rule.split)
            yield list(zip(s.rule.hf_names(s.layer), s.rule.separate(arch, full), strict=True))


def export_hf_state_dict(model, arch: Arch, *, dtype: Optional[torch.dtype] = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model, gathered across TP/EP/PP.

    Collective: every rank must iterate it to the end, in step; every rank receives the same
    stream (pipeline stages in order: embedding, layers by global index, final norm, lm_head;
    experts of a layer in EP-gather order). Tensors are detached CPU copies in the parameter's
    dtype, or cast to ``dtype`` when given (Megatron's torch norms stay fp32 in a bf16 model).
    """
    for name, t in _export(model, arch):
        yield name, (t if dtype is None else t.to(dtype))


def _export(model, arch: Arch) -> Iterator[tuple[str, torch.Tensor]]:
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    slots = _slots(model, arch)
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        for item in _stage_items(slots, arch):
            for name, t in item:
                yield name, t.detach().cpu().clone()
        return
    group = ps.get_pipeline_model_parallel_group()
    my_stage = ps.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(group)
    for stage in range(pp):
        src = ranks[stage]
        items = _stage_items(slots, arch) if stage == my_stage else None
        while True:
            item = next(items, None) if items is not None else None
            meta = [None if item is None else [(n, tuple(t.shape), t.dtype) for n, t in item]]
            dist.broadcast_object_list(meta, src=src, group=group)
            if meta[0] is None:
                break
            for k, (name, shape, dtype) in enumerate(meta[0]):
                if item is not None:
                    t = item[k][1].detach().contiguous()
                else:
                    t = torch.empty(shape, dtype=dtype, device=slots[0].tensor.device)
                wire = t.float() if dtype == torch.bfloat16 and t.device.type == "cpu" else t
                dist.broadcast(wire, src=src, group=group)
                yield name, wire.to(dtype).cpu().clone()
