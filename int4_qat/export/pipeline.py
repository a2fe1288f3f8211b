"""The export driver: a *source* (HF BF16 dir, training checkpoint, live model) → packed INT4 /
MXFP4 / NVFP4 checkpoint.

A source (:class:`~int4_qat.export.source.HFSource`, :class:`~int4_qat.export.megatron_source.
MegatronSource`) offers ``.config``, ``.tensors()`` (``TensorInfo``: HF name, dtype, shape) and
reads of one tensor (whole, or dim-0 row / expert ranges) plus ``read_any(name)``. Order of work,
chosen so that a bad input fails *before* anything is written and an interrupted export never
looks finished:

1. resolve the :class:`~int4_qat.scheme.QuantScheme` (recipe, then CLI flags);
2. plan every tensor from metadata (:func:`~int4_qat.export.convert.plan_tensor`), check group
   divisibility and Marlin serving limits, build ``quantization_config``, and split the outputs
   into shards: an HF dir keeps its own sharding; other sources get consecutive (name-sorted)
   tensors in shards of ≤ ``max_shard_bytes`` of *output* -- a plan that does not depend on the
   number of processes;
3. stream: tensor by tensor (large ones in dim-0 chunks of ≤ ``chunk_bytes``); the main thread
   reads, a thread pool converts (torch kernels release the GIL), results are written in order
   into a pre-announced safetensors header (:class:`~int4_qat.export.writer.ShardWriter`); at most
   ``INFLIGHT_BYTES`` of input is in flight (or one larger item, alone), so memory is bounded by
   the largest tensor (or chunk), never by the model. With N processes (``torchrun``, :mod:`.procs`) each
   writes its own shards into the shared temp dir; a source that reads with collectives (a live
   model) is walked by every rank in the same order and only each shard's owner converts it;
4. rank 0 writes ``config.json`` (+ ``quantization_config``), tokenizer / generation files and
   ``int4_qat_export.json`` (the scheme, for verification), then the index last, then the atomic
   rename (:class:`~int4_qat.export.writer.ExportDir`). The output is byte-identical for any
   number of processes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch

from int4_qat.export import convert as cv
from int4_qat.export.ct_config import gpt_oss_modules_to_not_convert, ignore_list, quantization_config
from int4_qat.export.procs import ExportProcs, assign_shards
from int4_qat.export.source import SIDE_FILES, HFSource, TensorInfo, open_hf_source
from int4_qat.export.streaming import CHUNK_BYTES, INFLIGHT_BYTES, write_shards
from int4_qat.export.writer import EXPORT_META, ExportDir, check_output_location, shard_name

__all__ = ["ExportResult", "export_checkpoint", "export_hf_dir", "export_source", "resolve_scheme",
           "plan_shards", "EXPORT_META", "CHUNK_BYTES", "INFLIGHT_BYTES", "MAX_SHARD_BYTES"]

MAX_SHARD_BYTES = 2 * 10**9  # output bytes per shard, for sources without their own sharding


@dataclass
class ExportResult:
    output: str
    scheme: dict
    input_bytes: int = 0
    output_bytes: int = 0
    packed: list[str] = field(default_factory=list)
    copied: int = 0
    seconds: float = 0.0
    shards: int = 0
    processes: int = 1


def resolve_scheme(fmt: str | None, group_size: int | None, scope: str | None, recipe_path: str | None,
                   input_dir: str | None = None):
    """The scheme: a recipe (``--recipe``, or ``recipe.yaml`` in a training checkpoint) fixes it;
    CLI flags may only restate it. Without a recipe the flags build it."""
    from int4_qat.scheme import QuantScheme

    serving = (1, 1)   # (serving_tp, serving_ep)
    if recipe_path is None and input_dir and os.path.isfile(os.path.join(input_dir, "recipe.yaml")):
        recipe_path = os.path.join(input_dir, "recipe.yaml")
    if recipe_path is not None:
        from int4_qat.recipe import Recipe

        recipe = Recipe.load(recipe_path)
        scheme = recipe.quant.scheme()
        serving = (recipe.export.serving_tp, recipe.export.serving_ep)
        asked = {"format": fmt, "group_size": group_size, "scope": scope}
        have = scheme.to_dict()
        for k, v in asked.items():
            if v is not None and str(v) != str(have[k]):
                raise ValueError(
                    f"--{k.replace('_', '-')} {v} contradicts {recipe_path} quant.{k}={have[k]}: the model "
                    "was trained with the recipe's scheme; exporting another one breaks train-infer "
                    "consistency. Drop the flag or edit the recipe."
                )
        return scheme, serving
    if fmt is None:
        raise ValueError("--format is required when no recipe is given (int4, mxfp4 or nvfp4)")
    kw = {"format": fmt}
    if group_size is not None:
        kw["group_size"] = group_size
    if scope is not None:
        kw["scope"] = scope
    return QuantScheme(**kw), serving


# ---------------------------------------------------------------------------- planning
def _plan_all(infos: list[TensorInfo], scheme, model_type: str) -> list[cv.TensorPlan]:
    return [cv.plan_tensor(t.name, t.dtype, t.shape, scheme, model_type) for t in infos]


def _module_sets(plans: list[cv.TensorPlan]) -> tuple[list[str], list[str]]:
    """(quantized modules, unquantized Linear-like modules) for the ignore list."""
    q = [p.module for p in plans if p.kind != "copy"]
    unq = []
    for p in plans:
        spec = p.outputs[0]
        if p.kind == "copy" and p.source.endswith(".weight") and len(spec.shape) == 2 and spec.dtype.is_floating_point:
            unq.append(p.source[: -len(".weight")])
    return q, unq


def _final_config(config: dict, scheme, plans: list[cv.TensorPlan]) -> dict:
    quantized, unquantized = _module_sets(plans)
    if not quantized:
        raise ValueError(f"scheme {scheme.describe()} quantizes no tensor of this checkpoint "
                         f"(model_type {config.get('model_type')!r}); nothing to export")
    config = dict(config)
    if config.get("model_type") == "gpt_oss":
        # transformers utils/quantization_config.py Mxfp4Config.to_dict; gpt-oss's published config
        config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": gpt_oss_modules_to_not_convert(unquantized),
        }
    else:
        config["quantization_config"] = quantization_config(scheme, ignore_list(unquantized, quantized))
    return config


def plan_shards(plans: list[cv.TensorPlan], max_bytes: int) -> list[list[cv.TensorPlan]]:
    """Consecutive plans in shards of at most ``max_bytes`` of output (a larger tensor alone)."""
    shards: list[list[cv.TensorPlan]] = [[]]
    size = 0
    for p in plans:
        b = sum(s.nbytes for s in p.outputs)
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += b
    return shards


def _plan_job(source, scheme, serving_tp: int, serving_ep: int, allow_unservable: bool, max_shard_bytes: int):
    """(plans per output shard, final config, every plan) from metadata only."""
    model_type = source.config.get("model_type", "")
    if isinstance(source, HFSource):    # keep the input's sharding, tensor order within shards
        groups = [s.tensors for s in source.shards]
    else:
        groups = [sorted(source.tensors(), key=lambda t: t.name)]
    flat = cv.attach_siblings(_plan_all([t for g in groups for t in g], scheme, model_type), scheme)
    if isinstance(source, HFSource):
        it = iter(flat)
        shards = [[next(it) for _ in g] for g in groups]
    else:
        shards = plan_shards(flat, max_shard_bytes)
    config = _final_config(source.config, scheme, flat)
    if not allow_unservable:
        cv.check_marlin(scheme, source.config, serving_tp, any(p.kind != "copy" for p in flat),
                        serving_ep=serving_ep)
    _warn_served_rule(scheme, source, flat)
    return shards, config, flat


def _warn_served_rule(scheme, source, flat: list[cv.TensorPlan]) -> None:
    """A scheme trained for an engine that decodes ``q * s`` exactly (``served: exact``, llama.cpp),
    exported for compressed-tensors / Marlin, which serve ``bf16(q * s)``: for weights wider than
    bf16 the served weight is the training one rounded to bf16 (<= 2^-9 relative). Same codes and
    scales, so it is a valid checkpoint; say so rather than claim bit-exact consistency."""
    if getattr(scheme, "served", None) != "exact":
        return
    infos = {t.name: t for t in source.tensors()}
    wide = sorted({str(infos[p.source].dtype).replace("torch.", "") for p in flat
                   if p.kind != "copy" and infos[p.source].dtype != torch.bfloat16})
    if wide:
        warnings.warn(f"scheme {scheme.describe()} was trained for an engine that serves q*s exactly "
                      f"(quant.served: exact, e.g. llama.cpp: tools/export.py --container gguf); "
                      f"compressed-tensors / Marlin serve bf16(q*s), so these {'/'.join(wide)} weights "
                      f"are served rounded to bf16 (<= 2^-9 relative) -- not bit-identical to training",
                      stacklevel=3)


def _inputs(source, side_dir: str | None) -> tuple[str, ...]:
    """The directories an export reads (the output must not touch them: writer.check_output_location)."""
    return tuple(d for d in (getattr(source, "root", None), side_dir) if d)


class _RankDir:
    """Another rank's view of rank 0's temp dir (it only writes its shards there)."""

    def __init__(self, tmp: str):
        self.tmp = tmp

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)


# ---------------------------------------------------------------------------- driver
def export_source(source, output_dir: str, scheme, *, serving_tp: int = 1, serving_ep: int = 1,
                  workers: int | None = None, overwrite: bool = False, progress: bool = True,
                  chunk_bytes: int = CHUNK_BYTES, max_shard_bytes: int = MAX_SHARD_BYTES,
                  allow_unservable: bool = False, side_dir: str | None = None,
                  source_desc: str | None = None, meta: dict | None = None, procs: ExportProcs | None = None,
                  check_only: bool = False, _fail_after: int | None = None, _t0: float | None = None) -> ExportResult:
    """Export ``source`` with an already-resolved ``scheme`` (see the module docstring).

    ``procs``: the processes sharing the work (default: this process, or the torchrun job it is
    part of). Bad input raises ``ValueError`` on every rank before any output exists.
    ``check_only``: plan and check everything (input, scheme, servability, output dir), write
    nothing, return the planned sizes. ``_fail_after`` (tests) raises after that many of this
    rank's shards were written.
    """
    t0 = _t0 or time.perf_counter()
    if check_only:
        shards, _, flat = _plan_job(source, scheme, serving_tp, serving_ep, allow_unservable, max_shard_bytes)
        ExportDir(output_dir, overwrite=overwrite, inputs=_inputs(source, side_dir))
        infos = {t.name: t for t in source.tensors()}
        return ExportResult(output=os.path.abspath(output_dir), scheme=scheme.to_dict(), shards=len(shards),
                            input_bytes=sum(t.nbytes for t in infos.values()),
                            output_bytes=sum(s.nbytes for p in flat for s in p.outputs),
                            packed=[p.module for p in flat if p.kind != "copy"],
                            copied=sum(p.kind == "copy" for p in flat), seconds=time.perf_counter() - t0)
    procs = procs or ExportProcs.from_env()
    out, err = None, None
    try:      # 1. plan (every rank, identically) and, on rank 0, the temp dir beside the output
        shards, config, flat = _plan_job(source, scheme, serving_tp, serving_ep, allow_unservable, max_shard_bytes)
        if procs.rank == 0:     # refuses an existing output, or one that would touch an input, up front
            out = ExportDir(output_dir, overwrite=overwrite, inputs=_inputs(source, side_dir))
            out.__enter__()
    except (ValueError, OSError) as e:
        err = e
    _collect(procs, out, err)
    tmp = procs.broadcast(out.tmp if out is not None else None)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    infos = {t.name: t for t in source.tensors()}
    in_bytes = [sum(infos[p.source].nbytes for p in s) for s in shards]
    owner = {i: r for r, idx in enumerate(assign_shards(in_bytes, procs.world)) for i in idx}
    err = None
    try:      # 2. this rank's shards
        write_shards(source, infos, shards, names, owner, procs, out if out is not None else _RankDir(tmp),
                      scheme, workers, chunk_bytes, progress, _fail_after)
    except Exception as e:  # noqa: BLE001 - reported to every rank
        err = e
    _collect(procs, out, err)
    err = None
    if out is not None:     # 3. rank 0: side files, the index last, the rename
        try:
            for name, plans in zip(names, shards, strict=True):
                out.record_shard(name, [s for p in plans for s in p.outputs])
            _write_side_files(out, side_dir or getattr(source, "root", None), config, scheme,
                              source_desc or getattr(source, "root", ""), meta)
            out.commit({"format": scheme.format.value})
        except Exception as e:  # noqa: BLE001
            err = e
    _collect(procs, out, err)   # every rank returns once the export is in place
    return ExportResult(output=os.path.abspath(output_dir), scheme=scheme.to_dict(), input_bytes=sum(in_bytes),
                        output_bytes=sum(s.nbytes for p in flat for s in p.outputs),
                        packed=[p.module for p in flat if p.kind != "copy"],
                        copied=sum(p.kind == "copy" for p in flat), seconds=time.perf_counter() - t0,
                        shards=len(shards), processes=procs.world)


def _collect(procs: ExportProcs, out: ExportDir | None, err: BaseException | None) -> None:
    """Collective: raise on every rank if any failed; rank 0 then removes the temp dir."""
    try:
        procs.raise_any(err)
    except BaseException as e:
        if out is not None and out.tmp:
            out.__exit__(type(e), e, e.__traceback__)
        raise


def export_checkpoint(input_dir: str, output_dir: str, *, fmt: str | None = None, group_size: int | None = None,
                      scope: str | None = None, recipe: str | None = None, serving_tp: int | None = None,
                      serving_ep: int | None = None, workers: int | None = None, overwrite: bool = False,
                      progress: bool = True, chunk_bytes: int = CHUNK_BYTES, max_shard_bytes: int = MAX_SHARD_BYTES,
                      allow_unservable: bool = False, procs: ExportProcs | None = None,
                      check_only: bool = False, verify_checksums: bool = True,
                      _fail_after: int | None = None) -> ExportResult:
    """Export ``input_dir``: an HF BF16 dir, or a training checkpoint (a checkpoint root with
    ``latest``, or an ``iter_*`` dir), streamed without building the model
    (:mod:`int4_qat.export.megatron_source`).

    Raises ``ValueError`` naming the file / tensor for bad input, before any output exists.
    ``verify_checksums``: check a training checkpoint's files against its ``checksums.json`` first
    (``int4_qat.checkpoint.verify_checkpoint_files``, split over the export's processes); it reads
    every file of the iteration once, optimizer state included.
    """
    t0 = time.perf_counter()
    check_output_location(output_dir, [input_dir], overwrite)   # never touch the source (writer.py)
    kw = dict(workers=workers, overwrite=overwrite, progress=progress, chunk_bytes=chunk_bytes,
              max_shard_bytes=max_shard_bytes, allow_unservable=allow_unservable, procs=procs,
              check_only=check_only, _fail_after=_fail_after, _t0=t0)
    if is_training_checkpoint(input_dir):
        from int4_qat.export.megatron_source import checkpoint_export_args, open_checkpoint_source

        if not check_only:      # the job's group first: its ranks split the checksum pass
            kw["procs"] = procs = procs or ExportProcs.from_env()
        source, iter_dir, ck_recipe = open_checkpoint_source(input_dir, verify=verify_checksums and not check_only)
        scheme, (recipe_tp, recipe_ep) = resolve_scheme(fmt, group_size, scope, recipe, str(iter_dir))
        return export_source(source, output_dir, scheme, serving_tp=serving_tp or recipe_tp,
                             serving_ep=serving_ep or recipe_ep,
                             **checkpoint_export_args(source, iter_dir, ck_recipe), **kw)
    scheme, (recipe_tp, recipe_ep) = resolve_scheme(fmt, group_size, scope, recipe, input_dir)
    return export_hf_dir(input_dir, output_dir, scheme, serving_tp=serving_tp or recipe_tp,
                         serving_ep=serving_ep or recipe_ep, **kw)


def is_training_checkpoint(d: str) -> bool:
    """A checkpoint root (``latest`` or ``iter_*`` dirs) or an iteration dir (``.metadata``,
    ``train_state.json``, ``recipe.yaml``), rather than an HF dir."""
    if not os.path.isdir(d):
        return False
    names = os.listdir(d)
    return (any(f in names for f in ("recipe.yaml", "latest", ".metadata", "train_state.json"))
            or any(n.startswith("iter_") and os.path.isdir(os.path.join(d, n)) for n in names))


def export_hf_dir(input_dir: str, output_dir: str, scheme, **kw) -> ExportResult:
    """Export an HF safetensors dir with an already-resolved ``scheme`` (see :func:`export_source`)."""
    side = kw.pop("side_dir", None)
    return export_source(open_hf_source(input_dir), output_dir, scheme, side_dir=side,
                         source_desc=input_dir, **kw)


def _write_side_files(out: ExportDir, root: str | None, config: dict, scheme, source_desc: str,
                      extra: dict | None = None) -> None:
    with open(out.path("config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if root:
        for name in SIDE_FILES:
            src = os.path.join(root, name)
            if os.path.isfile(src):
                shutil.copy2(src, out.path(name))
    meta = {
        "scheme": scheme.to_dict(),
        "source": os.path.abspath(source_desc),
        "model_type": config.get("model_type"),
        "writer": "int4_qat.export",
        **(extra or {}),
    }
    with open(out.path(EXPORT_META), "w") as f:
        json.dump(meta, f, indent=2)
