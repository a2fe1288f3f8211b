"""Training checkpoints: Megatron distributed checkpoints + ModelOpt state, saved atomically.

Layout (docs/DESIGN.md §5)::

    ckpt/
      latest                      "iter_0000020\\n" — written LAST, atomically (temp file + os.replace)
      iter_0000020/
        .metadata, __*_*.distcp, common.pt, metadata.json     megatron.core.dist_checkpointing
        modelopt_state/           ModelOpt's mode + config (modelopt/torch/opt/plugins/
                                  mcore_dist_checkpointing.py save_sharded_modelopt_state); the
                                  quantizers' per-module state travels as ``_extra_state`` inside
                                  the model's sharded state dict
        recipe.yaml               the resolved recipe that produced it
        config.json               the HF config of the architecture (so the dir is self-contained)
        checksums.json            size + XXH3-64 of every file above (int4_qat/checksums.py)
        train_state.json          step, consumed samples, layout, format, data fingerprint,
                                  init source — and "complete": true

What the distributed checkpoint holds: ``model`` (GPTModel.sharded_state_dict: every tensor keyed
by its *global* name and offset, so it reloads under another TP/EP/PP, and the exporter streams
it tensor by tensor without a model: int4_qat/export/megatron_source.py), ``optimizer``
(Megatron optimizer sharded state: Adam moments and the fp32 main params), ``scheduler``
(OptimizerParamScheduler state), ``step``, ``consumed_samples`` (the data position) and ``rng``
(one ShardedObject per rank: torch CPU generator, Python ``random``, and on GPU the CUDA RNG
tracker states).

Cross-spec loads: a checkpoint written by the Transformer-Engine spec (GPU) names a few tensors
differently from the local spec (CPU export, tests) and vice versa -- the MoE layers' pre-MLP norm
(TE ``pre_mlp_layernorm.weight``, local ``mlp.linear_fc1.layer_norm_weight`` through Megatron's
``sharded_state_dict_keys_map``) and MLA's latent norms (TE ``linear_q_up_proj.layer_norm_weight``
/ ``linear_kv_up_proj.layer_norm_weight``, local ``q_layernorm.weight`` / ``kv_layernorm.weight``).
Every load asks for the model's own keys; a key the checkpoint lacks is read from the other spec's
name when exactly one alternative is stored (:func:`spec_aliases`: the architecture's Rule
tables, ``Rule.mcore`` = local name first, TE name second, plus the local spec's key map). The
optimizer's keys follow the model's, so a cross-spec resume renames them too. Routed experts are a
``SequentialMLP`` in both specs, so their keys never differ.

Atomicity: every rank writes into ``iter_XXXXXXX.tmp/``; after a barrier rank 0 writes the small
files (``train_state.json`` last), renames the directory to ``iter_XXXXXXX`` and only then
replaces ``latest``. A crash at any point leaves either the previous ``latest`` or the new one,
never a pointer to a half-written directory; a ``.tmp`` directory, or one without
``train_state.json`` ``"complete": true``, is refused by :func:`resolve_checkpoint` with a clear
error. Leftover ``.tmp`` directories are deleted by the next successful save. A filesystem error
during a save (full, read-only, file-size limit) removes the ``.tmp`` directory and is raised as an
``OSError`` naming it; ``latest`` still names the previous complete checkpoint.

Integrity: ``checksums.json`` is written before ``train_state.json``; every load (resume,
``--init-from``, export) first runs :func:`verify_checkpoint_files`, which names each truncated,
missing or corrupted file (work split over the ranks; see :mod:`int4_qat.checksums`). Checkpoints
saved before checksums existed load with a note. Whether a checkpoint may be *resumed* with a
given recipe is :mod:`int4_qat.resume`'s question.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from int4_qat import checksums

__all__ = [
    "LATEST",
    "TRAIN_STATE",
    "verify_checkpoint_files",
    "iter_name",
    "save_checkpoint",
    "resolve_checkpoint",
    "find_latest",
    "read_train_state",
    "load_checkpoint",
    "load_model_weights",
    "load_model_for_export",
    "checkpoint_arch",
    "CheckpointError",
    "spec_aliases",
]

LATEST = "latest"
TRAIN_STATE = "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model):
    """DDP / Float16Module → the GPTModel (ModelOpt-converted) inside."""
    m = model
    while hasattr(m, "module"):
        m = m.module
    return m


# --------------------------------------------------------------------------- RNG
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict | None = None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("rng_state", state if state is not None else _rng_state(), (world,),
                         (_rank(),), replica_id=0)


# --------------------------------------------------------------------------- save
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model, optimizer=None, scheduler=None,
                    *, consumed_samples: int = 0, recipe=None, extra: dict | None = None,
                    _after_tensors: Callable[[Path], None] | None = None) -> Path:
    """Save ``ckpt_dir/iter_{step}`` atomically (see the module docstring); every rank calls it.

    ``model`` may be the DDP-wrapped model. ``_after_tensors`` is a test hook run on rank 0 after
    the distributed tensors are written and before the directory is renamed (to simulate a crash).
    Returns the final directory.
    """
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iter_name(step)
    tmp = ckpt_dir / (iter_name(step) + ".tmp")
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    inner = _unwrap(model)
    model_sd = inner.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd, "step": step, "consumed_samples": consumed_samples,
                             "rng": _rng_sharded()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    try:
        dist_checkpointing.save(state, str(tmp))
        save_sharded_modelopt_state([inner], str(tmp))   # no-op for a model without ModelOpt modes
        # each rank hashes the tensor files it has just written (still in its page cache)
        hashed = _gather(checksums.file_entries(tmp, sorted(p.name for p in tmp.glob(f"__{_rank()}_*.distcp"))))
        _barrier()
        if _rank() == 0:
            if _after_tensors is not None:
                _after_tensors(tmp)
            if recipe is not None:
                (tmp / "recipe.yaml").write_text(recipe.to_yaml())
                cfg = Path(recipe.model.config_json())
                if cfg.is_file():
                    shutil.copyfile(cfg, tmp / "config.json")
            entries = {k: v for part in hashed for k, v in part.items()}
            entries.update(checksums.file_entries(tmp, exclude=entries))    # the small rest
            checksums.write_checksums(tmp, entries)
            meta = {"complete": True, "step": step, "consumed_samples": consumed_samples,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "quantized": (tmp / "modelopt_state").is_dir(), **(extra or {})}
            _write_atomic(tmp / TRAIN_STATE, json.dumps(meta, indent=1) + "\n")
            if final.exists():                      # re-saving the same step: replace the old one
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(ckpt_dir / LATEST, final.name + "\n")
            for stale in ckpt_dir.glob("iter_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException as e:     # torch DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        err = _os_error_in(e)
        writer = type(e).__name__ == "CheckpointException"   # torch DCP's writer (maybe a subprocess)
        if err is None and not writer:
            raise                               # not a write failure: leave the .tmp to inspect
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)   # free the space; latest is unchanged
        kept = f"nothing was kept; {ckpt_dir / LATEST} still names the last complete checkpoint, if any"
        if err is not None:
            raise OSError(err.errno, f"saving checkpoint step {step} failed: {err.strerror or err} ({kept})",
                          str(err.filename or tmp)) from e
        # the async writer reports a failed write as text, without the errno
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
        first = errs[-1] if errs else (lines[0] if lines else type(e).__name__)
        raise OSError(None, f"saving checkpoint step {step} failed in torch's checkpoint writer ({first}; "
                            f"{kept}); fix: check free space, quota, file-size limit (ulimit -f) and "
                            f"permissions there", str(tmp)) from e
    _barrier()
    return final


def _gather(obj) -> list:
    """``obj`` from every rank (a list of one element without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _os_error_in(e: BaseException) -> OSError | None:
    """The ``OSError`` behind ``e``: itself, its cause chain, or (torch distributed checkpoint's
    ``CheckpointException``) one of the per-rank failures it collected."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack += [v for v in failures.values() if isinstance(v, BaseException)]
            stack += [getattr(v, "exc", None) for v in failures.values()]
    return None


def verify_checkpoint_files(iter_dir: str | os.PathLike, log: Callable[[str], None] | None = None) -> int | None:
    """Check every file of ``iter_dir`` against its ``checksums.json`` (collective under a process
    group: each rank checks a share, problems are gathered; single process: all files).

    Raises :class:`CheckpointError` naming each missing / truncated / corrupted file. Returns the
    number of files the checkpoint lists, or ``None`` for an older checkpoint without checksums
    (``log`` gets a note then). This is also what an export reader calls before reading tensors.
    """
    iter_dir = Path(iter_dir)
    try:
        entries = checksums.read_checksums(iter_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if entries is None:
        if log is not None:
            log(f"note: {iter_dir} has no {checksums.CHECKSUMS} (saved before checksums existed): "
                f"its files cannot be verified before loading")
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = checksums.assign(entries, world)[_rank()]
    problems = [p for part in _gather(checksums.check_files(iter_dir, entries, mine)) for p in part]
    if problems:
        raise CheckpointError(checksums.format_problems(iter_dir, problems))
    return len(entries)


# --------------------------------------------------------------------------- locate
def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The iteration ``ckpt_dir/latest`` names, or ``None`` when there is no ``latest`` yet."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not name.startswith("iter_") or name.endswith(".tmp") or "/" in name:
        raise CheckpointError(f"{latest}: does not name an iteration directory ({name!r})")
    return resolve_checkpoint(ckpt_dir / name)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete iteration directory from ``path`` (an ``iter_*`` dir or a dir with ``latest``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if (p / LATEST).is_file():
        found = find_latest(p)
        assert found is not None
        return found
    if p.name.endswith(".tmp"):
        raise CheckpointError(f"checkpoint {p} is an interrupted save (a .tmp directory); use "
                              f"{p.parent / LATEST} or an iter_* directory it names")
    state = p / TRAIN_STATE
    try:
        meta = json.loads(state.read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    if not meta.get("complete") or not (p / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {p} is incomplete (no complete {TRAIN_STATE} / "
                              f"dist-checkpoint .metadata): the save was interrupted")
    return p


def read_train_state(iter_dir: str | os.PathLike) -> dict:
    return json.loads((Path(iter_dir) / TRAIN_STATE).read_text())


# --------------------------------------------------------------------------- load
def _restore_quant(inner, iter_dir: Path) -> None:
    """Re-apply the saved ModelOpt modes to a plain model (no-op if already converted / none saved)."""
    if not (iter_dir / "modelopt_state").is_dir():
        return
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    from int4_qat.modelopt_backend import register_backend

    register_backend()   # the saved quantizer configs name our backend
    holder = [inner]
    restore_sharded_modelopt_state(holder, str(iter_dir))
    if holder[0] is not inner:
        raise CheckpointError(f"{iter_dir}: ModelOpt returned a new model object on restore; "
                              "convert the model before wrapping it")


def _local_spec_keys_map() -> dict[str, str]:
    """Megatron's local-spec ``sharded_state_dict_keys_map`` (param-name prefix -> saved key prefix
    inside a layer, megatron/core/models/gpt/gpt_layer_specs.py get_gpt_layer_local_spec)."""
    import warnings

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # "Apex is not installed"
        return dict(get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map)


def spec_aliases(key: str, rules, keys_map: dict[str, str] | None = None) -> list[str]:
    """The other names one sharded key may have in a checkpoint of the other layer spec: the
    local spec's key map applied either way, then every alternative of the Rules (``Rule.mcore``)
    that match any of those names. ``key`` itself is not in the result."""
    import re

    from int4_qat.arch.base import template_regex

    keys_map = _local_spec_keys_map() if keys_map is None else keys_map
    names = {key}
    m = re.match(r"(decoder\.layers\.\d+\.)(.*)$", key)
    if m:
        pre, rest = m.groups()
        for a, b in keys_map.items():
            if rest.startswith(a):
                names.add(pre + b + rest[len(a):])
            if rest.startswith(b):
                names.add(pre + a + rest[len(b):])
    for name in list(names):
        for rule in rules:
            for t in rule.mcore:
                mm = template_regex(t).match(name)
                if mm:
                    names.update(t2.format(**mm.groupdict()) for t2 in rule.mcore)
    names.discard(key)
    return sorted(names)


def _match_checkpoint_names(sd: dict, iter_dir: Path) -> dict[str, str]:
    """Point the sharded tensors of ``sd`` whose key the checkpoint lacks at the other spec's name
    (see the module docstring); returns ``{model key: checkpoint key}`` of what was renamed."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    stored = set(FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata)
    missing = [v for v in sd.values() if isinstance(v, ShardedTensor) and v.key not in stored]
    if not missing:
        return {}
    rules = []
    if (iter_dir / "config.json").is_file():
        from int4_qat.arch import load_arch

        rules = load_arch(iter_dir).rules()
    keys_map = _local_spec_keys_map()
    renamed = {}
    for v in missing:
        hits = [a for a in spec_aliases(v.key, rules, keys_map) if a in stored]
        if len(hits) == 1:
            renamed[v.key] = hits[0]
            v.key = hits[0]
    return renamed


def _load_model_state(inner, iter_dir: Path, weights_only: bool) -> None:
    """Load the model's sharded state; ``weights_only`` skips every ``_extra_state`` object.

    Weights-only is what ``--init-from`` needs: a BF16 checkpoint has plain-Megatron extra
    states (keyed per expert *group*) where a quantized model has ModelOpt quantizer states (keyed
    per expert), so those objects do not correspond; the quantizers keep their fresh state.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sd = inner.sharded_state_dict()
    if weights_only:
        sd = {k: v for k, v in sd.items()
              if not (isinstance(v, ShardedObject) and k.endswith("_extra_state"))}
    _match_checkpoint_names(sd, iter_dir)
    try:
        loaded = dist_checkpointing.load({"model": sd}, str(iter_dir),
                                         strict=StrictHandling.RAISE_UNEXPECTED)
    except Exception as e:   # CheckpointingException for keys the checkpoint lacks, shape errors
        raise CheckpointError(f"{iter_dir}: cannot load the model from this checkpoint "
                              f"(different architecture or quantization?): {e}") from e
    result = inner.load_state_dict(loaded["model"], strict=not weights_only)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{iter_dir}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]}")


def load_model_weights(model, path: str | os.PathLike, log: Callable[[str], None] | None = None) -> Path:
    """Model weights only (``--init-from CKPT``): no optimizer, step or data position.

    Works from a BF16 checkpoint into a quantized model (the quantizers' state is then the fresh
    one) and under any TP/EP/PP layout. The files are verified first. Returns the iteration
    directory used.
    """
    iter_dir = resolve_checkpoint(path)
    verify_checkpoint_files(iter_dir, log)
    _load_model_state(_unwrap(model), iter_dir, weights_only=True)
    return iter_dir


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, scheduler=None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Resume: model, optimizer, scheduler and this rank's RNG from ``path``.

    Returns ``{"step", "consumed_samples", "iter_dir"}``. ``path`` is an ``iter_*`` dir or a
    checkpoint root with ``latest``. Every rank calls it. The files are verified first
    (:func:`verify_checkpoint_files`); a load that still fails is a :class:`CheckpointError`
    naming the directory.
    """
    from megatron.core import dist_checkpointing

    iter_dir = resolve_checkpoint(path)
    verify_checkpoint_files(iter_dir, log)
    meta = read_train_state(iter_dir)
    inner = _unwrap(model)
    model_sd = inner.sharded_state_dict()
    _match_checkpoint_names(model_sd, iter_dir)    # before the optimizer derives its keys from it
    request: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    same_world = meta.get("world_size") == world
    if same_world:
        request["rng"] = _rng_sharded()
    try:
        loaded = dist_checkpointing.load(request, str(iter_dir))
    except Exception as e:   # an unverifiable (old) checkpoint with a damaged file ends up here
        raise CheckpointError(f"{iter_dir}: cannot load this checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); fix: resume from an "
                              f"earlier iter_* directory, or start a new run") from e
    inner.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        _set_rng_state(loaded["rng"])
    return {"step": int(loaded["step"]), "consumed_samples": int(loaded["consumed_samples"]),
            "iter_dir": iter_dir}


def checkpoint_arch(iter_dir: str | os.PathLike):
    """``(arch, recipe or None)`` of a checkpoint iteration: its own ``config.json`` (saved beside
    the tensors), else the config its ``recipe.yaml`` names. No model is built."""
    from int4_qat.arch import load_arch

    iter_dir = Path(iter_dir)
    recipe = None
    if (iter_dir / "recipe.yaml").is_file():
        from int4_qat.recipe import Recipe

        recipe = Recipe.load(iter_dir / "recipe.yaml")
    if (iter_dir / "config.json").is_file():
        return load_arch(iter_dir), recipe
    if recipe is not None:
        return load_arch(recipe.model.config_json().parent), recipe
    raise CheckpointError(f"{iter_dir}: neither config.json nor recipe.yaml; cannot tell the architecture")


def load_model_for_export(ckpt_dir: str | os.PathLike):
    """``(model, arch, recipe)``: the trained model on one CPU process at TP=EP=PP=1.

    For tests and small-model measurements (train-infer consistency, the export test oracle
    ``int4_qat.testing.export_via_model``): it holds the whole model in fp32. The product export
    streams the checkpoint instead (``int4_qat.export.megatron_source``).

    Initialises a single-process gloo group with ``int4_qat.compat.cpu`` when none exists (refuses
    to run inside a multi-process group), builds the architecture from the checkpoint's own
    ``config.json``, re-applies the saved ModelOpt quantization (if the run was quantized) and
    loads the weights — dist_checkpointing reshards whatever TP/EP/PP the run used. ``recipe`` is
    the checkpoint's ``recipe.yaml`` (None if absent).
    """
    from int4_qat.arch import build_model
    from int4_qat.compat import cpu as compat_cpu

    iter_dir = resolve_checkpoint(ckpt_dir)
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise CheckpointError("load_model_for_export runs on one process; call it outside torchrun")
    verify_checkpoint_files(iter_dir)
    compat_cpu.init_single_process_gloo(force=torch.cuda.is_available())
    compat_cpu.activate_training(force=torch.cuda.is_available())
    arch, recipe = checkpoint_arch(iter_dir)
    model = build_model(arch, use_te=False, params_dtype=torch.float32)
    _restore_quant(model, iter_dir)
    _load_model_state(model, iter_dir, weights_only=False)
    model.eval()
    return model, arch, recipe
