"""A running Megatron-Core model as an export source: local shards in, packed tensors out.

The same :class:`~int4_qat.export.megatron_source.MegatronSource` that streams a checkpoint from
disk assembles HF tensors here from the *live* model of a torchrun job (every rank holds its TP
slice, its EP rank's experts, its pipeline stage's layers). This is the path an RL trainer hands
freshly packed INT4 weights to rollout engines after a step (the reference RL system's weight
sync): the same Rule table, the same converter, the same numerics -- only the pieces come from
memory instead of files.

Reads are **collective**: every rank of the job calls ``read(slot, dst=r)`` for the same slots in
the same order (the export pipeline walks every shard on every rank); the ranks that hold the
tensor gather its TP / expert-TP slices (``all_gather`` in their TP or expert-TP group, then
``unshard`` with the rule's split), and the first of them sends the full tensor to ``dst`` (the
rank that owns the output shard; ``dst=None`` broadcasts to all). Other ranks return ``None``.
Which rank holds what is exchanged once, at construction (layers of each pipeline stage, each EP
rank's expert range, the TP / expert-TP group of every rank). Memory per rank: one full tensor at
a time (plus the conversion on the owner). Tensors cross gloo as float32 when they are bf16 on
CPU (exact), as ``int4_qat.arch.hf_io`` does for its gathers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from int4_qat.arch.base import unshard
from int4_qat.export.megatron_source import MegatronSource, Slot

__all__ = ["LivePieces", "live_source", "export_live"]


def _wire(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype == torch.bfloat16 and t.device.type == "cpu" else t


class LivePieces:
    """The Megatron tensors of a live, possibly TP/EP/PP-sharded model (see the module docstring)."""

    collective = True

    def __init__(self, model, arch):
        from megatron.core import parallel_state as ps

        from int4_qat.arch.hf_io import _parallel, _slots

        self.arch = arch
        index = {r.mcore: i for i, r in enumerate(arch.rules())}
        self.rules = arch.rules()
        self.local: dict[Slot, torch.Tensor] = {}
        for s in _slots(model, arch):
            self.local[Slot(index[s.rule.mcore], s.layer, s.expert)] = s.tensor
        self.rank = dist.get_rank()
        self.device = next(iter(self.local.values())).device
        self.groups = {"tp": ps.get_tensor_model_parallel_group(), "etp": ps.get_expert_tensor_parallel_group()}
        _, self.tp, _, self.etp, _, _ = _parallel()
        dense = {(s.rule, s.layer): str(t.dtype) for s, t in self.local.items() if s.expert is None}
        experts: dict = {}
        for s, t in self.local.items():
            if s.expert is not None:
                lo, hi, _ = experts.get((s.rule, s.layer), (s.expert, s.expert + 1, None))
                experts[(s.rule, s.layer)] = (min(lo, s.expert), max(hi, s.expert + 1), str(t.dtype))
        mine = {"dense": dense, "experts": experts,
                "tp": dist.get_process_group_ranks(self.groups["tp"]),
                "etp": dist.get_process_group_ranks(self.groups["etp"])}
        self.directory = [None] * dist.get_world_size()
        dist.all_gather_object(self.directory, mine)

    def _holders(self, slot: Slot) -> tuple[list[int], str]:
        """(the ranks that gather ``slot``, its dtype): the TP / expert-TP group of its lowest holder."""
        key = (slot.rule, slot.layer)
        for d in self.directory:
            if slot.expert is None and key in d["dense"]:
                return d["tp"], d["dense"][key]
            if slot.expert is not None and key in d["experts"]:
                lo, hi, dtype = d["experts"][key]
                if lo <= slot.expert < hi:
                    return d["etp"], dtype
        raise ValueError(f"live model: no rank holds Megatron tensor "
                         f"{self.rules[slot.rule].mcore[0].format(layer=slot.layer, expert=slot.expert)}")

    def __contains__(self, slot: Slot) -> bool:
        try:
            self._holders(slot)
        except ValueError:
            return False
        return True

    def dtype(self, slot: Slot) -> torch.dtype:
        return getattr(torch, self._holders(slot)[1].replace("torch.", ""))

    def describe(self, slot: Slot) -> str:
        return "live:" + self.rules[slot.rule].mcore[0].format(layer=slot.layer, expert=slot.expert)

    def row_bounds(self, slot: Slot) -> list[int]:
        return [0, self.rules[slot.rule].shape(self.arch.shape)[0]]

    def read(self, slot: Slot, rows=None, dst: int | None = None) -> torch.Tensor | None:
        """Collective: the full (TP=1 layout) Megatron tensor on ``dst`` (every rank if None)."""
        from int4_qat.arch.hf_io import _all_gather

        group_ranks, dtype = self._holders(slot)
        dtype = getattr(torch, dtype.replace("torch.", ""))
        rule = self.rules[slot.rule]
        src = group_ranks[0]
        full = None
        if self.rank in group_ranks:
            size = self.etp if slot.expert is not None else self.tp
            group = self.groups["etp" if slot.expert is not None else "tp"]
            full = unshard(_all_gather(self.local[slot], group, size), rule.split)
        shape = tuple(rule.shape(self.arch.shape))
        if dst is None:
            buf = (
                _wire(full.contiguous())
                if self.rank == src
                else _wire(torch.empty(shape, dtype=dtype, device=self.device))
            )
            dist.broadcast(buf, src=src)
            full = buf.to(dtype)
        elif dst not in group_ranks and self.rank in (src, dst):
            if self.rank == src:
                dist.send(_wire(full.contiguous()), dst)
                full = None
            else:
                buf = _wire(torch.empty(shape, dtype=dtype, device=self.device))
                dist.recv(buf, src)
                full = buf.to(dtype)
        if self.rank != dst and dst is not None:
            return None
        full = full.detach().to("cpu")
        return full if rows is None else full[rows[0] : rows[1]]


def live_source(model, arch) -> MegatronSource:
    """The HF view of a live model (collective: every rank must build it, and read in step)."""
    return MegatronSource(arch, LivePieces(model, arch), root="<live model>")


def export_live(model, arch, output_dir: str, scheme, **kw):
    """Collective: export the live ``model`` (every rank of its job calls this). Byte-identical to
    exporting the checkpoint it would save. ``kw``: options of
    :func:`int4_qat.export.pipeline.export_source`."""
    from int4_qat.export.pipeline import export_source

    source = live_source(model, arch)
    dtypes = source.weight_dtypes()
    source.config["torch_dtype"] = max(dtypes, key=dtypes.get)
    kw.setdefault("source_desc", "<live model>")
    return export_source(source, output_dir, scheme, **kw)
