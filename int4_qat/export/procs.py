"""The processes of one export: one process, or N under ``torchrun`` (one or many nodes).

An export splits its *output shards* over processes (:func:`assign_shards`); each process writes
its own shards into the shared temp dir beside the output, and rank 0 writes ``config.json`` and
the other side files, then the index last, then renames the temp dir into place. The processes
only need a few small collectives -- "did every rank succeed?", "where is the temp dir?" and a
final barrier -- which run on a gloo group (no GPU needed; inside a training job whose default
group is NCCL, a gloo group over the same ranks is created).

Environment: torchrun's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` (or Slurm's,
via :func:`int4_qat.parallel.dist_env`). Multi-node on a shared filesystem works as is: the temp
dir lives beside the output, which every node sees.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

__all__ = ["ExportProcs", "assign_shards", "single_process"]

_TIMEOUT = datetime.timedelta(hours=6)   # a rank may wait for the slowest one's shards
_GLOO: dict = {}                          # one gloo group per NCCL job, reused by every export


@dataclass
class ExportProcs:
    rank: int = 0
    world: int = 1
    group: object = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> "ExportProcs":
        """One process, or the torchrun / Slurm job this process belongs to (gloo group)."""
        import torch.distributed as dist

        from int4_qat.parallel import dist_env, init_process_group

        if dist.is_available() and dist.is_initialized():
            group = None
            if dist.get_backend() != "gloo":
                if "group" not in _GLOO:
                    _GLOO["group"] = dist.new_group(backend="gloo", timeout=_TIMEOUT)
                group = _GLOO["group"]
            return cls(dist.get_rank(), dist.get_world_size(), group)
        env = dist_env()
        if env.world_size == 1:
            return cls()
        if env.source != "torchrun":
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        init_process_group("gloo", init_method="env://", rank=env.rank, world_size=env.world_size,
                           timeout=_TIMEOUT)
        return cls(env.rank, env.world_size, None)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj, src: int = 0):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def raise_any(self, error: BaseException | None) -> None:
        """Collective: if any rank failed, raise on every rank (``ValueError`` with the first
        failing rank's message, so bad input reads the same everywhere)."""
        msgs = self.gather(None if error is None else (type(error).__name__, str(error)))
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if not bad:
            return
        if error is not None:
            raise error
        r, (kind, msg) = bad[0]
        raise (ValueError if kind == "ValueError" else RuntimeError)(
            msg if kind == "ValueError" else f"export failed on rank {r}: {kind}: {msg}")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def single_process() -> ExportProcs:
    return ExportProcs()


def assign_shards(sizes: list[int], world: int) -> list[list[int]]:
    """Shard indices per rank: largest first to the least-loaded rank (ties: lower rank). Depends
    only on the shard sizes and ``world``; the shards themselves never depend on ``world``."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += sizes[i]
    return [sorted(x) for x in out]
