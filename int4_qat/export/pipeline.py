"""The export driver: HF BF16 (or a training checkpoint) → packed INT4 / MXFP4 / NVFP4 checkpoint.

Order of work, chosen so that a bad input fails *before* anything is written and an interrupted
export never looks finished:

1. resolve the :class:`~int4_qat.scheme.QuantScheme` (recipe, then CLI flags);
2. read every shard header, plan every tensor (:func:`~int4_qat.export.convert.plan_tensor`),
   check group divisibility and Marlin serving limits, build ``quantization_config``;
3. stream: one input shard at a time, tensor by tensor (large tensors in row chunks); the main
   thread reads (``safe_open`` mmap), a thread pool converts (torch kernels release the GIL, so
   both cores work), results are written in order into a pre-announced safetensors header
   (:class:`~int4_qat.export.writer.ShardWriter`) — memory is bounded by the tensors in flight;
4. ``config.json`` (+ ``quantization_config``), tokenizer / generation files and
   ``int4_qat_export.json`` (the scheme, for verification), then the index last, then the atomic
   rename (:class:`~int4_qat.export.writer.ExportDir`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from int4_qat.export import convert as cv
from int4_qat.export.ct_config import gpt_oss_modules_to_not_convert, ignore_list, quantization_config
from int4_qat.export.source import SIDE_FILES, HFSource, TensorInfo, open_hf_source
from int4_qat.export.writer import (EXPORT_META, ExportDir, ShardWriter, TensorSpec, check_output_location,
                                    shard_name)

__all__ = ["ExportResult", "export_checkpoint", "export_hf_dir", "resolve_scheme", "EXPORT_META", "CHUNK_BYTES"]

CHUNK_BYTES = 256 << 20  # input bytes per work item for tensors whose rows are independent


@dataclass
class ExportResult:
    output: str
    scheme: dict
    input_bytes: int = 0
    output_bytes: int = 0
    packed: list[str] = field(default_factory=list)
    copied: int = 0
    seconds: float = 0.0


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


def _ordered(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, at most ``2 * workers`` items in flight.
    ``items`` is consumed lazily in the calling thread (that is where input is read)."""
    if workers <= 1:
        for it in items:
            yield it, fn(it)
        return
    window: deque[tuple[object, Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="export") as pool:
        try:
            for it in items:
                window.append((it, pool.submit(fn, it)))
                if len(window) >= 2 * workers:
                    head, fut = window.popleft()
                    yield head, fut.result()
            while window:
                head, fut = window.popleft()
                yield head, fut.result()
        finally:
            for _, fut in window:
                fut.cancel()


def _write_plans(writer: ShardWriter, plans: list[cv.TensorPlan], load: Callable, scheme, workers: int,
                 progress) -> None:
    """Convert ``plans`` (reading via ``load(plan, rows)``) and stream them into ``writer``."""

    def items():
        for plan in plans:
            chunks = load.chunks(plan)
            for i, rows in enumerate(chunks):
                sibs = [load.sibling(n) for n in plan.siblings]
                yield plan, rows, i == len(chunks) - 1, load(plan, rows), sibs

    def work(item):
        plan, rows, last, tensor, sibs = item
        out = cv.convert(plan, tensor, scheme, sibs)
        return out, tensor.numel() * tensor.element_size()

    held: list[list[torch.Tensor]] = []
    for (plan, rows, last, _, _), (outs, nbytes) in _ordered(work, items(), workers):
        writer.write(plan.outputs[0].name, outs[0])
        if rows is None:
            for spec, t in zip(plan.outputs[1:], outs[1:]):
                writer.write(spec.name, t)
        else:  # chunked: stream output 0, hold the (small) others until the last chunk
            held.append(outs[1:])
            if last:
                for j, spec in enumerate(plan.outputs[1:]):
                    writer.write(spec.name, torch.cat([h[j] for h in held]))
                held = []
        if progress is not None:
            progress.update(nbytes)


class _ShardLoader:
    """Reads planned tensors from one open shard, whole or in row chunks."""

    def __init__(self, source: HFSource, handle, infos: dict[str, TensorInfo], chunk_bytes: int):
        self.source, self.handle, self.infos, self.chunk_bytes = source, handle, infos, chunk_bytes

    def chunks(self, plan: cv.TensorPlan):
        info = self.infos[plan.source]
        return cv.chunk_rows(plan, info.shape, info.dtype.itemsize, self.chunk_bytes) or [None]

    def __call__(self, plan: cv.TensorPlan, rows):
        return self.source.read(self.handle, self.infos[plan.source], rows)

    def sibling(self, name: str) -> torch.Tensor:
        """A fusion partner (NVFP4 shared global scale), possibly from another shard."""
        if name in self.infos:
            return self.source.read(self.handle, self.infos[name])
        return self.source.read_any(name)


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


def export_checkpoint(input_dir: str, output_dir: str, *, fmt: str | None = None, group_size: int | None = None,
                      scope: str | None = None, recipe: str | None = None, serving_tp: int | None = None,
                      serving_ep: int | None = None,
                      workers: int | None = None, overwrite: bool = False, progress: bool = True,
                      chunk_bytes: int = CHUNK_BYTES, allow_unservable: bool = False,
                      _fail_after: int | None = None) -> ExportResult:
    """Export ``input_dir`` (HF BF16 dir, or a training checkpoint dir with ``recipe.yaml``).

    Raises ``ValueError`` naming the file / tensor for bad input, before any output exists.
    ``_fail_after`` (tests) raises after that many shards were written, to prove atomicity.
    """
    t0 = time.perf_counter()
    check_output_location(output_dir, [input_dir], overwrite)   # never touch the source (writer.py)
    if _is_training_checkpoint(input_dir):
        from int4_qat.checkpoint import resolve_checkpoint

        iter_dir = str(resolve_checkpoint(input_dir))
        scheme, (recipe_tp, recipe_ep) = resolve_scheme(fmt, group_size, scope, recipe, iter_dir)
        from int4_qat.export.megatron_source import export_megatron

        return export_megatron(iter_dir, output_dir, scheme, serving_tp=serving_tp or recipe_tp,
                               serving_ep=serving_ep or recipe_ep,
                               overwrite=overwrite, progress=progress, workers=workers,
                               allow_unservable=allow_unservable)
    scheme, (recipe_tp, recipe_ep) = resolve_scheme(fmt, group_size, scope, recipe, input_dir)
    return export_hf_dir(input_dir, output_dir, scheme, serving_tp=serving_tp or recipe_tp,
                         serving_ep=serving_ep or recipe_ep, workers=workers,
                         overwrite=overwrite, progress=progress, chunk_bytes=chunk_bytes,
                         allow_unservable=allow_unservable, _fail_after=_fail_after, _t0=t0)


def _is_training_checkpoint(d: str) -> bool:
    return any(os.path.isfile(os.path.join(d, f)) for f in ("recipe.yaml", "latest"))


def export_hf_dir(input_dir: str, output_dir: str, scheme, *, serving_tp: int = 1, serving_ep: int = 1,
                  workers: int | None = None,
                  overwrite: bool = False, progress: bool = True, chunk_bytes: int = CHUNK_BYTES,
                  allow_unservable: bool = False, _fail_after: int | None = None, _t0: float | None = None,
                  side_dir: str | None = None) -> ExportResult:
    """Export an HF safetensors dir with an already-resolved ``scheme`` (see :func:`export_checkpoint`)."""
    t0 = _t0 or time.perf_counter()
    source = open_hf_source(input_dir)
    model_type = source.model_type
    plans_by_shard = [_plan_all(s.tensors, scheme, model_type) for s in source.shards]
    linked = iter(cv.attach_siblings([p for ps in plans_by_shard for p in ps], scheme))
    plans_by_shard = [[next(linked) for _ in ps] for ps in plans_by_shard]
    all_plans = [p for ps in plans_by_shard for p in ps]
    config = _final_config(source.config, scheme, all_plans)
    if not allow_unservable:
        cv.check_marlin(scheme, source.config, serving_tp, any(p.kind != "copy" for p in all_plans),
                        serving_ep=serving_ep)
    result = ExportResult(output=os.path.abspath(output_dir), scheme=scheme.to_dict())
    workers = workers or min(2, os.cpu_count() or 1)
    total = sum(t.nbytes for t in source.tensors())
    export_dir = ExportDir(output_dir, overwrite=overwrite, inputs=(input_dir,) + ((side_dir,) if side_dir else ()))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"export {scheme.describe()}")
    threads = torch.get_num_threads()
    if workers > 1:  # parallelism across tensors; one intra-op thread each avoids oversubscription
        torch.set_num_threads(max(1, threads // workers))
    try:
        with export_dir as out:
            n = len(source.shards)
            for i, (shard, plans) in enumerate(zip(source.shards, plans_by_shard)):
                if _fail_after is not None and i >= _fail_after:
                    raise RuntimeError(f"injected failure after {i} shard(s)")
                fname = shard_name(i, n)
                specs = [s for p in plans for s in p.outputs]
                writer = ShardWriter(out.path(fname), specs)
                try:
                    with safe_open(shard.path, "pt") as handle:
                        loader = _ShardLoader(source, handle, {t.name: t for t in shard.tensors}, chunk_bytes)
                        _write_plans(writer, plans, loader, scheme, workers, bar)
                    writer.close()
                finally:
                    writer.abort()
                out.record_shard(fname, specs)
            _write_side_files(out, side_dir or source.root, config, scheme, input_dir)
            result.packed = [p.module for p in all_plans if p.kind != "copy"]
            result.copied = sum(p.kind == "copy" for p in all_plans)
            result.input_bytes = total
            result.output_bytes = out.total_size
            out.commit({"format": scheme.format.value})
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _write_side_files(out: ExportDir, root: str | None, config: dict, scheme, source_desc: str) -> None:
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
    }
    with open(out.path(EXPORT_META), "w") as f:
        json.dump(meta, f, indent=2)
