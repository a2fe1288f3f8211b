"""Megatron-Core tensors seen as an HF checkpoint: the source the exporter streams from.

The export pipeline (:mod:`int4_qat.export.pipeline`) consumes a *source*: ``.config`` (the HF
config dict), ``.tensors()`` (``TensorInfo`` per HF tensor: name, dtype, shape, where it comes
from), ``.read_tensor(info, rows=None)`` (a whole tensor, or rows / experts ``[a, b)`` of dim 0),
``.chunks(info, max_bytes)`` (how to split that dim) and ``.read_any(name)``.
:class:`~int4_qat.export.source.HFSource` is one; :class:`MegatronSource` is the other: the HF view
of a Megatron-Core model, assembled tensor by tensor from Megatron *pieces* with the
architecture's one Rule table (:mod:`int4_qat.arch`; ``rule.separate`` turns a full TP=1 Megatron
tensor -- fused ``linear_qkv``, GLU ``linear_fc1`` = [gate; up], MLA projections, gpt-oss stacked
experts -- into its HF tensors). Where the pieces come from is a small interface (``read(slot,
rows)``, ``dtype(slot)``, ``describe(slot)``, ``row_bounds(slot)``) with two implementations:

* :class:`CheckpointPieces` (here): a training checkpoint on disk, read box by box with DCP
  (:class:`~int4_qat.export.dcp_reader.DistCheckpointReader`). No model is built, no process group
  or CUDA is needed, ``int4_qat.compat.cpu`` is not touched: it runs on a login node.
* ``LivePieces`` (:mod:`int4_qat.export.live_source`): a running model's local shards inside a
  torchrun job, gathered with collectives per tensor (the path RL weight sync reuses).

**Checkpoint keys.** A distributed checkpoint stores *sharded-state keys*, which differ from the
``named_parameters`` names the Rule tables list (local spec name first, TE name next). The
differences are conventions of Megatron-Core, handled by one small normaliser
(:func:`checkpoint_pieces`), never by a list of names:

1. the local spec saves ``input_layernorm.*`` as ``self_attention.linear_qkv.layer_norm_*`` and
   ``pre_mlp_layernorm.*`` as ``mlp.linear_fc1.layer_norm_*`` (its ``sharded_state_dict_keys_map``,
   megatron/core/models/gpt/gpt_layer_specs.py); the TE spec keeps a separate
   ``pre_mlp_layernorm`` in MoE layers and fuses MLA's latent norms into
   ``linear_q_up_proj`` / ``linear_kv_up_proj`` ``.layer_norm_weight`` (both names are in the Rule
   tables) -- so each name is tried in both spellings;
2. routed experts are ``mlp.experts.experts.*`` (not ``local_experts``) with the *global* expert
   index: one key per expert ``...experts.experts.{e}.linear_fc1.weight`` (ModelOpt-quantized
   SequentialMLP, megatron/core/transformer/moe/experts.py ``singleton_local_shards``) or all
   experts stacked on a leading axis ``...experts.experts.linear_fc1.weight [E, 2I, H]`` (plain
   SequentialMLP / TEGroupedMLP);
3. a GLU ``linear_fc1`` is stored either as one ``[gate; up]`` key (TP chunks at their global
   offsets, so the global tensor is the TP=1 layout) or as two keys ``..._w`` (gate) / ``..._v``
   (up) (mlp.py ``apply_swiglu_sharded_factory`` with ``singleton_local_shards``).

Optimizer state (``optimizer.*``: Adam moments and fp32 master copies) and ``_extra_state``
objects are never read: the exported weights are the *model parameters as saved* -- exactly the
tensors the training forward fake-quantized (bf16 on GPU runs, fp32 on CPU runs).
Every slot of the config must be found in exactly one spelling, with the shape the config implies,
and every model key of the checkpoint must be claimed by a rule; otherwise a one-line
``ValueError`` names the key (a checkpoint whose config.json does not match its tensors).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from int4_qat.export.source import TensorInfo

__all__ = ["Slot", "Piece", "checkpoint_pieces", "rule_slots", "MegatronSource", "CheckpointPieces",
           "open_checkpoint_source", "checkpoint_export_args", "export_megatron", "CHECKPOINT_KEY_ALIASES"]

#: Megatron-Core's local-spec ``sharded_state_dict_keys_map`` (gpt_layer_specs.py): a norm saved
#: under the name of the Linear it precedes. Applied in both directions.
CHECKPOINT_KEY_ALIASES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                          ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
_LOCAL_EXPERT = "local_experts.{expert}."


class Slot(NamedTuple):
    """One Megatron tensor of the model: rule index in ``arch.rules()``, global layer, expert."""
    rule: int
    layer: int | None
    expert: int | None


@dataclass(frozen=True)
class Piece:
    """Where a slot lives in a checkpoint: one key, or two GLU halves (``_w``, ``_v``) concatenated
    on dim 0; ``expert`` set when the key stacks every expert on dim 0."""
    keys: tuple[str, ...]
    expert: int | None = None


def _spellings(template: str) -> list[str]:
    out = [template]
    for a, b in CHECKPOINT_KEY_ALIASES:
        for x, y in ((a, b), (b, a)):
            if x in template and template.replace(x, y) not in out:
                out.append(template.replace(x, y))
    return out


def checkpoint_pieces(templates, layer: int | None, expert: int | None, glu: bool) -> list[Piece]:
    """Every way a Rule's Megatron tensor (``templates``: its ``mcore`` names) can be stored in a
    distributed checkpoint (the conventions in the module docstring), most specific first."""
    names: list[str] = []
    for t in templates:
        names += [s for s in _spellings(t) if s not in names]
    out: list[Piece] = []
    for n in names:
        if "{expert}" in n:
            forms = [Piece((n.replace(_LOCAL_EXPERT, "experts.{expert}.").format(layer=layer, expert=expert),)),
                     Piece((n.replace(_LOCAL_EXPERT, "experts.").format(layer=layer),), expert)]
        else:
            forms = [Piece((n.format(layer=layer),))]
        for p in forms:
            out.append(p)
            if glu and p.expert is None:
                out.append(Piece((p.keys[0] + "_w", p.keys[0] + "_v")))
    return out


def rule_slots(arch) -> Iterator[Slot]:
    """Every Megatron tensor the config implies, in Rule-table order (layers and experts global)."""
    from int4_qat.arch.expected import rule_layers

    for i, rule in enumerate(arch.rules()):
        for layer in rule_layers(rule, arch):
            for expert in (range(arch.shape.num_experts) if rule.is_expert else [None]):
                yield Slot(i, layer, expert)


# ---------------------------------------------------------------------------- checkpoint pieces
class CheckpointPieces:
    """The Megatron tensors of a distributed checkpoint, matched to the Rule table and checked."""

    def __init__(self, reader, arch):
        self.reader, self.arch = reader, arch
        self.rules = arch.rules()
        self.pieces: dict[Slot, Piece] = {}
        where = reader.dir
        claimed: set[str] = set()
        missing: list[str] = []
        for slot in rule_slots(arch):
            rule = self.rules[slot.rule]
            cands = checkpoint_pieces(rule.mcore, slot.layer, slot.expert, rule.split == "glu")
            found = [p for p in cands if all(k in reader.tensors for k in p.keys)]
            if not found:
                if rule.export:          # a tied output_layer may or may not be saved
                    alt = " / ".join("+".join(c.keys) for c in cands[1:3])
                    missing.append(cands[0].keys[0] + (f" (or {alt})" if alt else ""))
                continue
            if len({p.keys for p in found}) > 1:
                raise ValueError(
                    f"{where}: checkpoint holds {rule.mcore[0].format(layer=slot.layer, expert=slot.expert)} "
                    f"under several names {[p.keys for p in found]}; it was not written by one model"
                )
            piece = found[0]
            self._check_shape(slot, piece)
            self.pieces[slot] = piece
            claimed.update(piece.keys)
        if missing:
            raise ValueError(
                f"{where}: checkpoint lacks {len(missing)} tensor(s) that its config.json "
                f"({arch.model_type}, {arch.shape.layers} layers, {arch.shape.num_experts} experts) "
                f"implies, e.g. {missing[0]}; config.json does not describe this checkpoint"
            )
        model_keys = {k for k in reader.tensors if not k.startswith("optimizer.")}
        unclaimed = sorted(model_keys - claimed)
        if unclaimed:
            raise ValueError(
                f"{where}: checkpoint tensor {unclaimed[0]} {list(reader.tensors[unclaimed[0]].shape)} "
                f"matches no {arch.model_type} rule of its config.json ({len(unclaimed)} such "
                f"tensor(s)); config.json does not describe this checkpoint"
            )
        reader.check_files(claimed)

    def _check_shape(self, slot: Slot, piece: Piece) -> None:
        rule = self.rules[slot.rule]
        want = tuple(rule.shape(self.arch.shape))
        if piece.expert is not None:
            want = (self.arch.shape.num_experts, *want)
        elif len(piece.keys) == 2:
            want = (want[0] // 2, *want[1:])
        for k in piece.keys:
            got = self.reader.tensors[k].shape
            if got != want:
                raise ValueError(
                    f"{self.reader.dir}: checkpoint tensor {k} has shape {list(got)}, but its "
                    f"config.json implies {list(want)} ({self.arch.model_type}); config.json "
                    "does not describe this checkpoint"
                )
        dtypes = {self.reader.tensors[k].dtype for k in piece.keys}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(
                f"{self.reader.dir}: checkpoint tensor(s) {list(piece.keys)} have dtype(s) "
                f"{sorted(map(str, dtypes))}; model weights must be floating point"
            )

    def __contains__(self, slot: Slot) -> bool:
        return slot in self.pieces

    def dtype(self, slot: Slot) -> torch.dtype:
        return self.reader.tensors[self.pieces[slot].keys[0]].dtype

    def describe(self, slot: Slot) -> str:
        p = self.pieces[slot]
        return p.keys[0] + ("" if len(p.keys) == 1 else "(_w/_v)") + ("" if p.expert is None else f"[{p.expert}]")

    def row_bounds(self, slot: Slot) -> list[int]:
        """Dim-0 boundaries of the stored chunks (a row range between two of them reads no chunk
        twice); just ``[0, rows]`` where rows cannot be read separately."""
        p = self.pieces[slot]
        tm = self.reader.tensors[p.keys[0]]
        if p.expert is not None or len(p.keys) != 1:
            return [0, tm.shape[1] if p.expert is not None else 2 * tm.shape[0]]
        return sorted({c[0][0] for c in tm.chunks} | {tm.shape[0]})

    def read(self, slot: Slot, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The full (TP=1 layout) Megatron tensor of ``slot``, or its rows ``[a, b)``."""
        p = self.pieces[slot]
        r = self.reader
        if p.expert is not None:
            shape = r.tensors[p.keys[0]].shape
            off, size = [p.expert] + [0] * (len(shape) - 1), [1, *shape[1:]]
            if rows is not None:
                off[1], size[1] = rows[0], rows[1] - rows[0]
            return r.read(p.keys[0], off, size)[0]
        if len(p.keys) == 2:
            t = torch.cat([r.read(k) for k in p.keys])
            return t if rows is None else t[rows[0] : rows[1]]
        if rows is None:
            return r.read(p.keys[0])
        shape = r.tensors[p.keys[0]].shape
        return r.read(p.keys[0], (rows[0],) + (0,) * (len(shape) - 1), (rows[1] - rows[0], *shape[1:]))


# ---------------------------------------------------------------------------- the HF view
@dataclass(frozen=True)
class _Entry:
    rule: int
    layer: int | None
    expert: int | None  # None for stacked rules (all experts in one HF tensor)
    index: int  # which of rule.hf


class MegatronSource:
    """An HF checkpoint view of Megatron pieces (see the module docstring)."""

    _CACHE = 4  # separated Megatron tensors kept (gate/up, q/k/v partners are read together) ...
    _CACHE_BYTES = 64 << 20  # ... beyond the newest one, at most this much

    def __init__(self, arch, pieces, root: str, config: dict | None = None):
        from int4_qat.arch import expected_hf_tensors

        self.arch, self.pieces, self.root = arch, pieces, str(root)
        self.config = dict(arch.hf_config if config is None else config)
        self._rules = arch.rules()
        self._entries: dict[str, _Entry] = {}
        self._slot_of: dict[str, Slot] = {}
        for slot in rule_slots(arch):
            rule = self._rules[slot.rule]
            if not rule.export:
                continue
            names = rule.hf_names(slot.layer, None if rule.stacked else slot.expert)
            for i, n in enumerate(names):
                self._entries.setdefault(n, _Entry(slot.rule, slot.layer, None if rule.stacked else slot.expert, i))
                self._slot_of.setdefault(n, slot)
        expected = expected_hf_tensors(arch)
        if set(self._entries) != set(expected.required):
            raise RuntimeError(
                f"{arch.model_type}: the Rule traversal and expected_hf_tensors disagree: "
                f"{sorted(set(self._entries) ^ set(expected.required))[:4]}"
            )
        self._infos = [
            TensorInfo(
                n, pieces.dtype(self._slot_of[n]), tuple(expected.required[n]), pieces.describe(self._slot_of[n])
            )
            for n in sorted(self._entries)
        ]
        problems = expected.problems({t.name: (t.dtype, t.shape) for t in self._infos}, self.root)
        if problems:
            raise ValueError(f"{problems[0]} ({len(problems)} problem(s))")
        self._by_name = {t.name: t for t in self._infos}
        self._cache: OrderedDict[Slot, list[torch.Tensor]] = OrderedDict()

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def weight_dtypes(self) -> dict[str, int]:
        """Bytes per dtype of the model tensors (what ``config.json`` ``torch_dtype`` reports)."""
        out: dict[str, int] = {}
        for t in self._infos:
            k = str(t.dtype).replace("torch.", "")
            out[k] = out.get(k, 0) + t.nbytes
        return out

    @property
    def collective(self) -> bool:
        """Reads are collectives (a live model): every rank reads the same tensors in the same
        order, passing ``dst`` (the rank that receives; others get ``None``)."""
        return getattr(self.pieces, "collective", False)

    def _read(self, slot: Slot, rows=None, dst=None):
        return self.pieces.read(slot, rows, dst=dst) if self.collective else self.pieces.read(slot, rows)

    def _separated(self, slot: Slot, dst=None) -> list[torch.Tensor] | None:
        if slot in self._cache:
            self._cache.move_to_end(slot)
            return self._cache[slot]
        rule = self._rules[slot.rule]
        full = self._read(slot, dst=dst)
        if full is None:
            return None
        try:
            hf = rule.separate(self.arch, full)
        except RuntimeError as e:  # a reshape of a mis-shaped tensor
            raise ValueError(f"{self.root}: cannot convert {self.pieces.describe(slot)} to HF: {e}") from None
        # (a collective source never caches: every rank must take part in every read)
        if rule.to_hf is not None and len(hf) > 1 and not self.collective:
            self._cache[slot] = hf
            while len(self._cache) > 1 and (
                len(self._cache) > self._CACHE
                or sum(t.untyped_storage().nbytes() for v in self._cache.values() for t in v[:1]) > self._CACHE_BYTES
            ):
                self._cache.popitem(last=False)
        return hf

    def read_tensor(self, info: TensorInfo, rows: tuple[int, int] | None = None, dst: int | None = None):
        """HF tensor ``info`` (or rows / experts ``[a, b)`` of its dim 0); ``dst``: see ``collective``."""
        e = self._entries[info.name]
        rule = self._rules[e.rule]
        if rule.stacked:
            lo, hi = rows or (0, self.arch.shape.num_experts)
            parts = [self._separated(Slot(e.rule, e.layer, x), dst) for x in range(lo, hi)]
            return None if any(p is None for p in parts) else torch.stack([p[e.index] for p in parts])
        slot = Slot(e.rule, e.layer, e.expert)
        if rows is not None and rule.to_hf is None:
            return self._read(slot, rows, dst)
        hf = self._separated(slot, dst)
        if hf is None:
            return None
        t = hf[e.index]
        return t if rows is None else t[rows[0] : rows[1]]

    def read_any(self, name: str, dst: int | None = None):
        if name not in self._by_name:
            raise ValueError(f"{self.root}: no tensor {name}")
        return self.read_tensor(self._by_name[name], dst=dst)

    def chunks(self, info: TensorInfo, max_bytes: int) -> list[tuple[int, int] | None]:
        """Dim-0 ranges of ``info`` of about ``max_bytes`` that each read whole stored pieces:
        experts of a stacked tensor, the stored row chunks of a tensor the rule does not convert."""
        e = self._entries[info.name]
        rule = self._rules[e.rule]
        n = info.shape[0] if info.shape else 0
        if rule.stacked:
            bounds = list(range(n + 1))
        elif rule.to_hf is None and info.shape:
            bounds = self.pieces.row_bounds(Slot(e.rule, e.layer, e.expert))
        else:
            return [None]
        row = info.nbytes // max(n, 1)
        out, start = [], bounds[0]
        for a, b in zip(bounds, bounds[1:], strict=False):
            if a > start and (b - start) * row > max_bytes:
                out.append((start, a))
                start = a
        out.append((start, bounds[-1]))
        return [None] if len(out) == 1 else out


# ---------------------------------------------------------------------------- entry points
def open_checkpoint_source(path: str | os.PathLike, verify: bool = True):
    """``(MegatronSource, iter_dir, recipe or None)`` for a training checkpoint (an ``iter_*`` dir or
    a checkpoint root with ``latest``). Reads metadata only, plus -- ``verify`` -- the files'
    checksums (``int4_qat.checkpoint.verify_checkpoint_files``: collective when a process group
    exists, each rank a share); ``ValueError`` for bad input."""
    from int4_qat.checkpoint import resolve_checkpoint
    from int4_qat.export.dcp_reader import DistCheckpointReader

    p = Path(path)
    if p.is_dir() and not (p / "latest").is_file() and not (p / ".metadata").exists():
        iters = sorted(x.name for x in p.glob("iter_*") if x.is_dir())
        if iters:
            only_tmp = all(n.endswith(".tmp") for n in iters)
            raise ValueError(
                f"checkpoint {p} has no 'latest' file"
                + (f" and only an interrupted save ({iters[-1]})" if only_tmp else f" (iterations: {iters[-1]} ...)")
                + "; pass a complete iter_* directory, or let the training save finish"
            )
    iter_dir = resolve_checkpoint(p)
    if verify:
        from int4_qat.checkpoint import verify_checkpoint_files

        verify_checkpoint_files(iter_dir)
    from int4_qat.checkpoint import checkpoint_arch

    arch, recipe = checkpoint_arch(iter_dir)
    pieces = CheckpointPieces(DistCheckpointReader(iter_dir), arch)
    source = MegatronSource(arch, pieces, str(iter_dir))
    dtypes = source.weight_dtypes()  # config.json torch_dtype: the weights' own dtype
    source.config["torch_dtype"] = max(dtypes, key=dtypes.get)
    return source, iter_dir, recipe


def checkpoint_export_meta(source: MegatronSource, iter_dir: Path) -> dict:
    """What ``int4_qat_export.json`` records about a training checkpoint input."""
    state = {}
    if (iter_dir / "train_state.json").is_file():
        state = json.loads((iter_dir / "train_state.json").read_text())
    return {
        "checkpoint": {
            "iteration": iter_dir.name,
            "step": state.get("step"),
            "trained_with_fake_quant": state.get("quantized"),
            "weights": "model parameters as saved (the tensors the training forward fake-quantized); "
            "not the optimizer's fp32 master copies",
            "weight_dtypes": source.weight_dtypes(),
        }
    }


def checkpoint_export_args(source: MegatronSource, iter_dir: Path, recipe) -> dict:
    """``export_source`` arguments for a training checkpoint: tokenizer dir, description, metadata."""
    tok = getattr(getattr(recipe, "model", None), "tokenizer", None) if recipe is not None else None
    side = str(tok) if tok and os.path.isdir(str(tok)) else None
    return {"side_dir": side, "source_desc": str(iter_dir), "meta": checkpoint_export_meta(source, iter_dir)}


def export_megatron(path: str, output_dir: str, scheme, **kw):
    """Stream a training checkpoint to a packed export with ``scheme`` (keywords: those of
    :func:`int4_qat.export.pipeline.export_source`)."""
    from int4_qat.export.pipeline import export_source

    source, iter_dir, recipe = open_checkpoint_source(path)
    return export_source(source, output_dir, scheme, **checkpoint_export_args(source, iter_dir, recipe), **kw)
