"""The streaming core of the exporter: read one tensor (or dim-0 chunk) at a time, convert on a
thread pool, write in order into pre-announced safetensors shards.

Used by :func:`int4_qat.export.pipeline.export_source` (which plans, checks and coordinates the
processes). Memory: the main thread reads the next item only when the items in flight plus its
size fit in ``INFLIGHT_BYTES`` (one larger item is admitted alone) and fewer than ``2 * workers``
are in flight; references to written items are dropped before the next read, so a process holds
about one largest tensor (or stored chunk / row chunk) at a time.
"""
from __future__ import annotations

import os
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from int4_qat.export import convert as cv
from int4_qat.export.source import HFSource, TensorInfo
from int4_qat.export.writer import ShardWriter

__all__ = ["CHUNK_BYTES", "INFLIGHT_BYTES", "write_shards"]

CHUNK_BYTES = 256 << 20  # input bytes per work item for tensors whose rows are independent
INFLIGHT_BYTES = 64 << 20  # input bytes being converted at once (one larger item runs alone)


def _ordered(fn: Callable, descs: Iterable, prepare: Callable, cost: Callable, workers: int,
             budget: int) -> Iterator:
    """``fn(prepare(d))`` for each descriptor ``d``, in order, on a thread pool. ``prepare`` (the
    read) runs in the calling thread, and only once the items in flight plus ``cost(d)`` fit in
    ``budget`` bytes (one item is always admitted) and fewer than ``2 * workers`` are in flight."""
    if workers <= 1:
        for d in descs:
            it = prepare(d)
            out = fn(it)
            yield it, out
            it = out = None     # drop the last item before the next read: one large tensor at a time
        return
    window: deque = deque()
    inflight = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="export") as pool:
        try:
            for d in descs:
                c = cost(d)
                while window and (len(window) >= 2 * workers or inflight + c > budget):
                    it, fut, ic = window.popleft()
                    inflight -= ic
                    yield it, fut.result()
                    it = fut = None
                it = prepare(d)
                window.append((it, pool.submit(fn, it), c))
                inflight += c
            while window:
                it, fut, _ = window.popleft()
                yield it, fut.result()
        finally:
            for _, fut, _ in window:
                fut.cancel()


class _Loader:
    """Reads planned tensors from a source: whole or in dim-0 chunks; ``dst`` = the rank that
    receives them from a collective source (others get ``None``)."""

    def __init__(self, source, infos: dict[str, TensorInfo], chunk_bytes: int):
        self.source, self.infos, self.chunk_bytes, self.dst = source, infos, chunk_bytes, None
        self.collective = getattr(source, "collective", False)
        self._handles: OrderedDict = OrderedDict()   # HF dirs: open safetensors shards (2 at most)

    def chunks(self, plan: cv.TensorPlan) -> list:
        info = self.infos[plan.source]
        if not plan.split_dim0 or not info.shape:
            return [None]
        # a packed chunk (gpt-oss experts) needs ~14x its bytes of quantizer temporaries: keep it small
        size = self.chunk_bytes if plan.kind == "copy" else min(self.chunk_bytes, INFLIGHT_BYTES)
        if hasattr(self.source, "chunks"):
            return self.source.chunks(info, size)
        return cv.chunk_rows(plan, info.shape, info.dtype.itemsize, size) or [None]

    def cost(self, plan: cv.TensorPlan, rows) -> int:
        info = self.infos[plan.source]
        n = info.nbytes if rows is None else info.nbytes // info.shape[0] * (rows[1] - rows[0])
        return n + sum(self.infos[s].nbytes for s in plan.siblings)

    def read(self, name: str, rows=None):
        info = self.infos[name]
        if isinstance(self.source, HFSource):
            path = os.path.join(self.source.root, info.shard)
            if path not in self._handles:
                self._handles[path] = safe_open(path, "pt")
                while len(self._handles) > 2:
                    self._handles.popitem(last=False)
            return self.source.read(self._handles[path], info, rows)
        if self.collective:
            return self.source.read_tensor(info, rows, dst=self.dst)
        return self.source.read_tensor(info, rows)


def _write_plans(writer: ShardWriter | None, plans: list[cv.TensorPlan], load: _Loader, scheme,
                 workers: int, budget: int, progress) -> None:
    """Convert ``plans`` and stream them into ``writer``. ``writer=None``: this rank only takes
    part in a collective source's reads (the shard's owner converts and writes)."""

    def descs():
        for plan in plans:
            chunks = load.chunks(plan)
            for i, rows in enumerate(chunks):
                yield plan, rows, i == len(chunks) - 1

    def prepare(d):
        plan, rows, last = d
        return plan, rows, last, load.read(plan.source, rows), [load.read(n) for n in plan.siblings]

    def work(item):
        plan, rows, last, tensor, sibs = item
        if tensor is None:
            return None, 0
        return cv.convert(plan, tensor, scheme, sibs), tensor.numel() * tensor.element_size()

    held: list[list[torch.Tensor]] = []
    for (plan, rows, last, _, _), (outs, nbytes) in _ordered(work, descs(), prepare, lambda d: load.cost(d[0], d[1]),
                                                             workers, budget):
        if writer is None:
            continue
        writer.write(plan.outputs[0].name, outs[0])
        if rows is None:
            for spec, t in zip(plan.outputs[1:], outs[1:], strict=True):
                writer.write(spec.name, t)
        else:  # chunked: stream output 0, hold the (small) others until the last chunk
            held.append(outs[1:])
            if last:
                for j, spec in enumerate(plan.outputs[1:]):
                    writer.write(spec.name, torch.cat([h[j] for h in held]))
                held = []
        outs = None      # (the input of a copy) freed before the next read
        if progress is not None:
            progress.update(nbytes)


def write_shards(source, infos, shards, names, owner, procs, target, scheme, workers, chunk_bytes, progress,
                  fail_after) -> None:
    """Write this rank's shards (a collective source: take part in every shard's reads)."""
    collective = getattr(source, "collective", False)
    mine = {i for i, r in owner.items() if r == procs.rank}
    load = _Loader(source, infos, chunk_bytes)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = workers or max(1, min(2, (os.cpu_count() or 1) // max(1, local_world)))
    bar = None
    if progress and procs.rank == 0:
        from tqdm import tqdm

        desc = f"export {scheme.describe()}" + (f" (rank 0 of {procs.world})" if procs.world > 1 else "")
        bar = tqdm(total=sum(infos[p.source].nbytes for i in mine for p in shards[i]), unit="B",
                   unit_scale=True, desc=desc)
    threads = torch.get_num_threads()
    if workers > 1:  # parallelism across tensors; one intra-op thread each avoids oversubscription
        torch.set_num_threads(max(1, threads // workers))
    try:
        done = 0
        for i, plans in enumerate(shards):
            if i not in mine and not collective:
                continue
            load.dst = owner[i]
            if i not in mine:
                _write_plans(None, plans, load, scheme, workers, INFLIGHT_BYTES, None)
                continue
            if fail_after is not None and done >= fail_after:
                raise RuntimeError(f"injected failure after {done} shard(s)")
            writer = ShardWriter(target.path(names[i]), [s for p in plans for s in p.outputs])
            try:
                _write_plans(writer, plans, load, scheme, workers, INFLIGHT_BYTES, bar)
                writer.close()
            finally:
                writer.abort()
            done += 1
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
