"""Reading an HF BF16 checkpoint directory safely: safetensors only, index checked, lazily.

An HF checkpoint is ``config.json`` plus either one ``model.safetensors`` or shards
``model-0000i-of-0000N.safetensors`` listed by ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {tensor_name: shard_file}}``). Before any output is
produced, :func:`open_hf_source` checks what can be checked from headers alone:

- pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused, never loaded: a
  pickle can run code on load;
- every shard parses (a truncated file fails ``safe_open`` or has a data section shorter than
  its header announces);
- the index and the shards agree exactly (a tensor in a shard but not in the index, or in the
  index but not in its shard, is an error naming the tensor); the index is validated before any
  shard is opened (``int4_qat.arch.hf_io.read_index``: a JSON object, shard paths inside the
  input directory);
- every safetensors header entry is well formed (dtype, shape, ``data_offsets`` that match the
  shape and lie inside the file);
- the tensor set is the one the architecture's ``config.json`` implies
  (:func:`check_structure`, from ``int4_qat.arch.expected_hf_tensors``): every expected tensor
  present with its shape and a float dtype, nothing unexpected (an expert beyond
  ``num_experts``, a layer beyond ``num_hidden_layers``) — so a checkpoint that contradicts its
  config is refused naming the tensor, instead of being exported "successfully".

Tensors are then read one at a time (:meth:`HFSource.read`), so memory stays bounded by the
tensors in flight.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from int4_qat.export.writer import tensor_nbytes

__all__ = ["HFSource", "ShardInfo", "TensorInfo", "open_hf_source", "check_structure", "SIDE_FILES",
           "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files copied verbatim beside the weights (tokenizer, generation defaults, chat template).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass
class ShardInfo:
    path: str
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return os.path.getsize(self.path)


@dataclass
class HFSource:
    """A validated HF checkpoint directory: config, shards in order, tensor metadata."""

    root: str
    config: dict
    shards: list[ShardInfo]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    def tensors(self) -> list[TensorInfo]:
        return [t for s in self.shards for t in s.tensors]

    def read_any(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` from whichever shard holds it (opens that shard)."""
        for s in self.shards:
            for t in s.tensors:
                if t.name == name:
                    with safe_open(s.path, "pt") as h:
                        return self.read(h, t)
        raise ValueError(f"{self.root}: no tensor {name}")

    def read(self, handle, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or rows ``[a, b)`` of dim 0) from an open ``safe_open`` handle."""
        try:
            if rows is None:
                return handle.get_tensor(info.name)
            return handle.get_slice(info.name)[rows[0]:rows[1]]
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{info.shard}: cannot read tensor {info.name}: {e}") from e


def _header(path: str) -> dict:
    """Parse a safetensors header, check every entry is well formed and the file holds all the
    bytes it announces."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: not a JSON object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        end = max(end, _entry_end(path, k, v))
    if 8 + n + end > size:
        raise ValueError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}"
        )
    return header


def _entry_end(path: str, name: str, v) -> int:
    """End offset of one header entry; ValueError naming the tensor when the entry is malformed."""
    bad = f"{path}: corrupt safetensors header: tensor {name}"
    if not isinstance(v, dict):
        raise ValueError(f"{bad} is not an object")
    dtype, shape, offs = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{bad} has no valid 'shape' (got {shape!r})")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1]):
        raise ValueError(f"{bad} has no valid 'data_offsets' [begin, end] (got {offs!r})")
    if dtype not in _DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
    if offs[1] - offs[0] != tensor_nbytes(_DTYPES[dtype], tuple(shape)):
        raise ValueError(f"{bad}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but "
                         f"{dtype} {shape} needs {tensor_nbytes(_DTYPES[dtype], tuple(shape))}")
    return offs[1]


def _shard_info(path: str) -> ShardInfo:
    header = _header(path)
    try:  # the library's own parser must accept it too
        with safe_open(path, "pt") as f:
            names = list(f.keys())
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    info = ShardInfo(path)
    for name in names:
        h = header[name]
        info.tensors.append(TensorInfo(name, _DTYPES[h["dtype"]], tuple(h["shape"]), os.path.basename(path)))
    return info


def check_structure(root: str, tensors: list[TensorInfo], limit: int = 8) -> None:
    """Refuse a tensor set that is not what ``root/config.json`` implies (``ValueError`` listing
    up to ``limit`` problems per kind, each naming the tensor): missing, unexpected (an expert
    beyond ``num_experts``), mis-shaped or non-float tensors. The architecture's strict config
    parse (``int4_qat.arch.load_arch``) runs first, so a config with contradictory or unknown
    fields is refused as well."""
    from int4_qat.arch import expected_hf_tensors, load_arch

    arch = load_arch(root)
    present = {t.name: (t.dtype, t.shape) for t in tensors}
    problems = expected_hf_tensors(arch).problems(present, "", limit=limit)
    if problems:
        raise ValueError(f"{root}: the tensors do not match its config.json:\n  "
                         + "\n  ".join(p.removeprefix(": ") for p in problems)
                         + "\nfix: use the checkpoint's own config.json, or repair the checkpoint")


def open_hf_source(root: str, *, structure: bool = True) -> HFSource:
    """Validate ``root`` as an HF safetensors checkpoint; raise ``ValueError`` naming the problem.
    ``structure=False`` skips :func:`check_structure` (``verify_export`` reports it as a check)."""
    from int4_qat.arch.hf_io import read_config, read_index

    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"input {root} is not a directory")
    cfg_path = os.path.join(root, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"input {root} has no config.json (expected an HF checkpoint directory)")
    config, _ = read_config(root)
    if "quantization_config" in config:
        raise ValueError(
            f"{cfg_path}: input is already quantized ({config['quantization_config'].get('quant_method')}); "
            "export needs the BF16 checkpoint"
        )
    pickles = sorted(p for p in os.listdir(root) if p.endswith(PICKLE_SUFFIXES))
    st_files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
    if pickles:
        raise ValueError(
            f"input {root} contains pickled weights {pickles[:3]}: refusing to load pickles "
            "(they can execute code). Convert them to safetensors first, e.g. "
            "model.save_pretrained(dir, safe_serialization=True) in a trusted environment."
        )
    index_path = os.path.join(root, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = read_index(index_path)       # shape and paths checked before any shard is opened
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(root, fn)):
                raise ValueError(f"{index_path}: shard {fn} (of tensor "
                                 f"{next(k for k, v in weight_map.items() if v == fn)}) does not exist")
        shards = [_shard_info(os.path.join(root, fn)) for fn in files]
        seen: set[str] = set()
        for s in shards:
            for t in s.tensors:
                listed = weight_map.get(t.name)
                if listed is None or os.path.normpath(listed) != os.path.normpath(
                        os.path.relpath(s.path, root)):
                    raise ValueError(
                        f"{index_path}: tensor {t.name} is in shard {t.shard} but the index "
                        f"{'maps it to ' + listed if listed else 'has no entry for it'}"
                    )
                seen.add(t.name)
        missing = sorted(set(weight_map) - seen)
        if missing:
            raise ValueError(f"{index_path}: tensor {missing[0]} is listed but absent from its shard "
                             f"{weight_map[missing[0]]} ({len(missing)} missing)")
    elif not st_files:
        raise ValueError(f"input {root} has no *.safetensors weights")
    elif len(st_files) == 1:
        shards = [_shard_info(st_files[0])]
    else:
        raise ValueError(f"input {root} has {len(st_files)} safetensors files but no model.safetensors.index.json")
    source = HFSource(root, config, shards)
    if structure:
        check_structure(root, source.tensors())
    return source
