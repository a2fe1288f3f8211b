"""Streaming safetensors writer: bounded memory, temp dir, atomic publish, index last.

A safetensors file is ``[u64 little-endian header length][JSON header][raw tensor bytes]``; the
header maps every tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the data section) plus an optional ``"__metadata__"`` string map. The
header is padded with spaces to a multiple of 8 bytes, as the ``safetensors`` library does
(safetensors/src/tensor.rs, ``prepare``), so readers can align the data section.

Because every output tensor's dtype and shape is known *before* it is computed (packing is a pure
function of the input shape, see :mod:`int4_qat.export.convert`), :class:`ShardWriter` writes the
header first and then streams tensors into the file in header order, one at a time: peak memory
is the tensors in flight, never a whole shard.

:class:`ExportDir` owns the output directory life cycle:

1. everything is written into ``<output>.tmp-<random>/`` *beside* the output (same filesystem,
   so the final rename is atomic);
2. shards are written, then side files (config.json, tokenizer files, ...), then
   ``model.safetensors.index.json`` is written **last**;
3. the temp dir is renamed to ``<output>`` (``os.replace``). On any exception the temp dir is
   deleted, so an interrupted or failed export never leaves a completed-looking directory: a
   reader that sees ``<output>/model.safetensors.index.json`` sees a finished export. A process
   killed with SIGKILL can leave a ``*.tmp-*`` directory, which is never mistaken for an export
   and is removed by the next export to the same output.

What the user gave is never touched (:func:`check_output_location`, run before anything is
written): the output may not be the input, lie inside it, or contain it (paths compared after
resolving symlinks), with or without ``--overwrite``; and ``--overwrite`` replaces only a previous
export (a directory holding ``int4_qat_export.json``) or an empty directory, never other data.
A filesystem error while writing (read-only, full, file-size limit, no permission) removes the
temp dir and is re-raised as an ``OSError`` that names the file or the output.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = [
    "EXPORT_META",
    "check_output_location",
    "SAFETENSORS_DTYPES",
    "TensorSpec",
    "ShardWriter",
    "ExportDir",
    "INDEX_NAME",
    "shard_name",
]

INDEX_NAME = "model.safetensors.index.json"
#: Written into every export (the scheme, for verification); marks a directory --overwrite may replace.
EXPORT_META = "int4_qat_export.json"

# torch dtype -> safetensors dtype tag (safetensors/src/tensor.rs `Dtype`)
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def shard_name(i: int, n: int) -> str:
    """HF shard naming (``transformers.utils.hub``): ``model-00001-of-00003.safetensors``."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a dense tensor of ``dtype`` and ``shape`` (without allocating it)."""
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one output tensor, known before its data is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class ShardWriter:
    """Write one safetensors file whose tensors are announced up front and streamed in order.

    >>> w = ShardWriter(path, [TensorSpec("a", torch.bfloat16, (2, 3))])
    >>> w.write("a", tensor)      # in the announced order; dtype and shape are checked
    >>> w.close()                 # checks that every announced tensor was written
    """

    def __init__(self, path: str, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        self.specs = list(specs)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for s in self.specs:
            if s.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
            if s.name in header:
                raise ValueError(f"{s.name}: tensor announced twice in shard {os.path.basename(path)}")
            header[s.name] = {
                "dtype": SAFETENSORS_DTYPES[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(path, "wb")
        with self._naming_errors():
            self._f.write(len(raw).to_bytes(8, "little"))
            self._f.write(raw)
        self._next = 0
        self._written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (the whole announced tensor, or the next chunk of its dim 0)."""
        if self._next >= len(self.specs):
            raise RuntimeError(f"{self.path}: unexpected extra tensor {name!r}")
        spec = self.specs[self._next]
        if (name != spec.name or tensor.dtype != spec.dtype or tensor.dim() != len(spec.shape)
                or tuple(tensor.shape[1:]) != spec.shape[1:]):
            raise RuntimeError(
                f"{self.path}: expected {spec.name} {spec.dtype} {list(spec.shape)}, got {name} "
                f"{tensor.dtype} {list(tensor.shape)} (converter planned a different layout)"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._written += data.numel()
        if self._written > spec.nbytes:
            raise RuntimeError(f"{self.path}: more data than announced for {spec.name} {list(spec.shape)}")
        with self._naming_errors():
            self._f.write(memoryview(data.numpy()))
        if self._written == spec.nbytes:
            self._next += 1
            self._written = 0

    def close(self) -> None:
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            self._f.close()
            raise RuntimeError(f"{self.path}: tensors announced but not written: {missing[:5]}")
        with self._naming_errors():
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def _naming_errors(self):
        return _naming_os_errors(self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


class _naming_os_errors:
    """Context manager: an ``OSError`` without a file name (``write`` on a full disk) gets ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), self.path) from exc
        return False


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_location(output: str, inputs: Iterable[str], overwrite: bool = False) -> None:
    """Refuse, before anything is written, an output that would touch what the user gave:
    ``output`` equal to, inside, or containing an input (symlinks resolved); with ``overwrite``,
    an existing ``output`` that is not a previous export (``EXPORT_META``) or an empty directory."""
    out = os.path.realpath(output)
    for given in inputs:
        src = os.path.realpath(given)
        rel = ("is the input" if out == src else "lies inside the input" if _within(out, src)
               else "contains the input" if _within(src, out) else None)
        if rel:
            raise ValueError(f"output {output} {rel} {given}: exporting there would overwrite or "
                             f"delete the source; fix: choose an output directory outside {given}")
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output):
        raise ValueError(f"output {output} exists and is not a directory; fix: choose another output "
                         f"path or remove that file yourself")
    entries = sorted(os.listdir(output))
    if not entries:
        return
    if not overwrite:
        raise ValueError(f"output {output} already exists and is not empty; choose another "
                         "directory or pass --overwrite")
    if EXPORT_META not in entries:
        raise ValueError(f"output {output} holds files that are not an export of this tool "
                         f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}): --overwrite "
                         f"replaces only a previous export (a directory with {EXPORT_META}); fix: "
                         f"choose another output directory, or remove it yourself")


@dataclass
class ExportDir:
    """Temp dir beside ``output``; :meth:`commit` writes the index last and renames into place.

    Use as a context manager: leaving the block with an exception removes the temp dir.
    :func:`check_output_location` runs at construction, before anything is written (``inputs``:
    the directories the export reads).
    """

    output: str
    overwrite: bool = False
    inputs: tuple[str, ...] = ()
    tmp: str = field(init=False, default="")
    weight_map: dict[str, str] = field(init=False, default_factory=dict)
    total_size: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.output = os.path.abspath(self.output)
        check_output_location(self.output, self.inputs, self.overwrite)

    def __enter__(self) -> "ExportDir":
        parent = os.path.dirname(self.output)
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(self.output)
        for stale in os.listdir(parent):  # leftovers of a killed export to the same output
            if stale.startswith(f".{base}.tmp-"):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        if exc_type is not None and issubclass(exc_type, OSError) and exc.filename is None:
            # e.g. json.dump / shutil.copy2 of a side file on a full disk: say where
            raise OSError(exc.errno, exc.strerror or str(exc), self.output) from exc

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def record_shard(self, fname: str, specs: Iterable[TensorSpec]) -> None:
        for s in specs:
            if s.name in self.weight_map:
                raise ValueError(f"tensor {s.name} written twice ({self.weight_map[s.name]}, {fname})")
            self.weight_map[s.name] = fname
            self.total_size += s.nbytes

    def commit(self, extra_metadata: dict | None = None) -> str:
        """Write the index (last), then atomically move the temp dir to ``output``."""
        index = {
            "metadata": {"total_size": self.total_size, **(extra_metadata or {})},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        tmp_index = self.path(INDEX_NAME + ".partial")
        with open(tmp_index, "w") as f:
            json.dump(index, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_index, self.path(INDEX_NAME))
        if os.path.exists(self.output):
            old = self.output + ".old-" + os.path.basename(self.tmp)
            os.replace(self.output, old)
            os.replace(self.tmp, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.output)
        self.tmp = ""
        return self.output
