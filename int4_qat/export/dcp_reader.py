"""Read sub-boxes of the global tensors of a Megatron-Core distributed checkpoint, one at a time.

A training iteration dir (docs/DESIGN.md §5) is a ``torch.distributed.checkpoint`` (DCP)
checkpoint written by ``megatron.core.dist_checkpointing``: ``.metadata`` (a pickled
``torch.distributed.checkpoint.metadata.Metadata``) maps every *sharded-state key* to its global
shape, dtype and the chunks that were stored (one chunk per saving rank's local shard: a TP slice,
one expert, one GLU half ...), and every chunk to ``(file, offset, length)`` inside a
``__<rank>_<i>.distcp`` file, where it is a ``torch.save``-d tensor. Keys are global: a reader
does not need the training layout (TP/EP/PP/DP) to ask for "rows 0..4095 of tensor K".

:class:`DistCheckpointReader` answers exactly that question with DCP's own machinery -- the
``FileSystemReader`` (storage), ``create_read_items_for_chunk_list`` (which stored chunks overlap
the requested box, and where) and a minimal ``LoadPlanner`` that copies them into one destination
tensor -- without building a model and without a process group (``no_dist``). Every stored chunk
that overlaps the box is read whole (DCP stores chunks as ``torch.save`` blobs), so the memory of a
read is the box plus one stored chunk at a time; a box that *is* one stored chunk is returned as
loaded, without the extra copy.

Before anything is read, :meth:`DistCheckpointReader.check_files` checks that every chunk of the
keys an export will read lies inside an existing file (a missing or truncated ``.distcp`` file is
a one-line ``ValueError`` naming the file, raised before any output is written). Read failures
are re-raised as ``ValueError`` naming the file and the key.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

__all__ = ["DistCheckpointReader", "TensorMeta"]


class TensorMeta:
    """Global dtype / shape of one checkpoint key and its stored chunks ((offsets, sizes) pairs)."""

    __slots__ = ("key", "dtype", "shape", "chunks")

    def __init__(self, key: str, md: TensorStorageMetadata):
        self.key = key
        self.dtype: torch.dtype = md.properties.dtype
        self.shape: tuple[int, ...] = tuple(md.size)
        self.chunks: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
            (tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class _BoxPlanner(LoadPlanner):
    """Loads the stored chunks overlapping one box of one key into ``self.dest``."""

    def __init__(self, key: str, md: TensorStorageMetadata, offsets, sizes):
        self.key, self.md = key, md
        self.box = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        self.dest = torch.empty(tuple(sizes), dtype=md.properties.dtype)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:  # noqa: D401
        pass

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan(create_read_items_for_chunk_list(self.key, self.md, [self.box]))

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise RuntimeError(f"{self.key}: unexpected bytes entry")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return narrow_tensor_by_index(self.dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class DistCheckpointReader:
    """The tensors of one DCP checkpoint directory, readable box by box (see the module docstring).

    ``tensors``: every tensor key -> :class:`TensorMeta`, except keys starting with
    ``skip_prefixes`` (optimizer state); ``BytesStorageMetadata`` entries (``_extra_state``, RNG
    state) are never read and not kept.
    """

    def __init__(self, path: str | os.PathLike, skip_prefixes: tuple[str, ...] = ("optimizer.",)):
        self.dir = Path(path)
        meta_path = self.dir / ".metadata"
        if not meta_path.is_file():
            raise ValueError(f"{meta_path}: missing: {self.dir} is not a complete distributed checkpoint")
        self._reader = FileSystemReader(str(self.dir))
        try:
            md = self._reader.read_metadata()
        except Exception as e:  # pickle / EOF errors of a damaged file
            raise ValueError(f"{meta_path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
        # Entries never read (optimizer state, bytes objects) are dropped after unpickling: the
        # metadata of a large MoE checkpoint holds several entries per parameter (~3 KB each).
        self.skipped = 0
        for k in [k for k, v in md.state_dict_metadata.items()
                  if k.startswith(skip_prefixes) or not isinstance(v, TensorStorageMetadata)]:
            del md.state_dict_metadata[k]
            self.skipped += 1
        for index in [i for i in md.storage_data if i.fqn not in md.state_dict_metadata]:
            del md.storage_data[index]
        self._reader.set_up_storage_reader(md, True)
        self._md = md
        self.tensors: dict[str, TensorMeta] = {k: TensorMeta(k, v) for k, v in md.state_dict_metadata.items()}

    # ------------------------------------------------------------------ checks
    def check_files(self, keys) -> None:
        """Every stored chunk of ``keys`` lies inside an existing ``.distcp`` file (else ValueError)."""
        wanted = set(keys)
        sizes: dict[str, int] = {}
        for index, info in self._md.storage_data.items():
            if index.fqn not in wanted:
                continue
            path = self.dir / info.relative_path
            if info.relative_path not in sizes:
                try:
                    sizes[info.relative_path] = path.stat().st_size
                except FileNotFoundError:
                    raise ValueError(f"{path}: missing checkpoint file (holds {index.fqn}); the "
                                     "checkpoint is incomplete -- copy it again or use another iteration") from None
            end = info.offset + info.length
            if end > sizes[info.relative_path]:
                raise ValueError(f"{path}: truncated checkpoint file: {index.fqn} needs bytes up to {end}, "
                                 f"the file has {sizes[info.relative_path]}; copy it again or use another iteration")

    # ------------------------------------------------------------------ reads
    def read(self, key: str, offsets=None, sizes=None) -> torch.Tensor:
        """The box ``[offsets, offsets + sizes)`` of global tensor ``key`` (whole tensor by default)."""
        tm = self.tensors.get(key)
        if tm is None:
            raise ValueError(f"{self.dir}: checkpoint has no tensor {key}")
        offsets = tuple(offsets) if offsets is not None else (0,) * len(tm.shape)
        sizes = tuple(sizes) if sizes is not None else tm.shape
        if len(offsets) != len(tm.shape) or any(o < 0 or o + s > d
                                                for o, s, d in zip(offsets, sizes, tm.shape, strict=True)):
            raise ValueError(f"{self.dir}: box {offsets}+{sizes} is outside {key} {list(tm.shape)}")
        md = self._md.state_dict_metadata[key]
        planner = _BoxPlanner(key, md, offsets, sizes)
        plan = planner.create_local_plan()
        covered = sum(math.prod(it.lengths) for it in plan.items)
        if covered != math.prod(sizes):
            raise ValueError(
                f"{self.dir}: the stored chunks of {key} do not cover box {offsets}+{sizes} "
                f"({covered} of {math.prod(sizes)} elements): the checkpoint is incomplete"
            )
        try:
            if len(plan.items) == 1 and self._whole_chunk(plan.items[0], sizes):
                return self._load_chunk(plan.items[0].storage_index, tm)
            plan = self._reader.prepare_local_plan(plan)
            self._reader.read_data(plan, planner).wait()
        except ValueError:
            raise
        except Exception as e:  # torch.load / zip errors of a damaged or truncated .distcp file
            raise ValueError(
                f"{self._file_of(key)}: cannot read checkpoint tensor {key} ({type(e).__name__}: {e})"
            ) from None
        return planner.dest

    def _whole_chunk(self, item, sizes) -> bool:
        info = self._reader.storage_data[item.storage_index]
        return not info.transform_descriptors and tuple(item.lengths) == tuple(sizes) and not any(item.storage_offsets)

    def _load_chunk(self, index: MetadataIndex, tm: TensorMeta) -> torch.Tensor:
        """One stored chunk, as ``torch.load`` returns it (no copy into a second buffer).
        FileSystemReader.read_data does the same load and then copies into the destination."""
        info = self._reader.storage_data[index]
        with open(self.dir / info.relative_path, "rb") as stream:
            t = torch.load(self._reader._slice_file(stream, info), map_location="cpu", weights_only=True)
        if t.dtype != tm.dtype:
            raise ValueError(
                f"{self.dir / info.relative_path}: {tm.key} is stored as {t.dtype}, the metadata says {tm.dtype}"
            )
        return t

    def _file_of(self, key: str) -> Path:
        for index, info in self._md.storage_data.items():
            if index.fqn == key:
                return self.dir / info.relative_path
        return self.dir
