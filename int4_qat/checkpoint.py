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
        train_state.json          step, consumed samples, layout, format — and "complete": true

What the distributed checkpoint holds: ``model`` (GPTModel.sharded_state_dict: every tensor keyed
by its *global* name and offset, so it reloads under another TP/EP/PP, and the exporter streams
it tensor by tensor without a model: int4_qat/export/megatron_source.py), ``optimizer``
(Megatron optimizer sharded state: Adam moments and the fp32 main params), ``scheduler``
(OptimizerParamScheduler state), ``step``, ``consumed_samples`` (the data position) and ``rng``
(one ShardedObject per rank: torch CPU generator, Python ``random``, and on GPU the CUDA RNG
tracker states).

Atomicity: every rank writes into ``iter_XXXXXXX.tmp/``; after a barrier rank 0 writes the small
files (``train_state.json`` last), renames the directory to ``iter_XXXXXXX`` and only then
replaces ``latest``. A crash at any point leaves either the previous ``latest`` or the new one,
never a pointer to a half-written directory; a ``.tmp`` directory, or one without
``train_state.json`` ``"complete": true``, is refused by :func:`resolve_checkpoint` with a clear
error. Leftover ``.tmp`` directories are deleted by the next successful save.
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

__all__ = [
    "LATEST",
    "TRAIN_STATE",
    "iter_name",
    "save_checkpoint",
    "resolve_checkpoint",
    "find_latest",
    "read_train_state",
    "load_checkpoint",
    "load_model_weights",
    "load_model_for_export",
    "CheckpointError",
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
    dist_checkpointing.save(state, str(tmp))
    save_sharded_modelopt_state([inner], str(tmp))   # no-op for a model without ModelOpt modes
    _barrier()
    if _rank() == 0:
        if _after_tensors is not None:
            _after_tensors(tmp)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
            cfg = Path(recipe.model.config_json())
            if cfg.is_file():
                shutil.copyfile(cfg, tmp / "config.json")
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
    _barrier()
    return final


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


def load_model_weights(model, path: str | os.PathLike) -> Path:
    """Model weights only (``--init-from CKPT``): no optimizer, step or data position.

    Works from a BF16 checkpoint into a quantized model (the quantizers' state is then the fresh
    one) and under any TP/EP/PP layout. Returns the iteration directory used.
    """
    iter_dir = resolve_checkpoint(path)
    _load_model_state(_unwrap(model), iter_dir, weights_only=True)
    return iter_dir


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, scheduler=None) -> dict:
    """Resume: model, optimizer, scheduler and this rank's RNG from ``path``.

    Returns ``{"step", "consumed_samples", "iter_dir"}``. ``path`` is an ``iter_*`` dir or a
    checkpoint root with ``latest``. Every rank calls it.
    """
    from megatron.core import dist_checkpointing

    iter_dir = resolve_checkpoint(path)
    meta = read_train_state(iter_dir)
    inner = _unwrap(model)
    model_sd = inner.sharded_state_dict()
    request: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    same_world = meta.get("world_size") == world
    if same_world:
        request["rng"] = _rng_sharded()
    loaded = dist_checkpointing.load(request, str(iter_dir))
    inner.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        _set_rng_state(loaded["rng"])
    return {"step": int(loaded["step"]), "consumed_samples": int(loaded["consumed_samples"]),
            "iter_dir": iter_dir}


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
    from int4_qat.arch import build_model, load_arch
    from int4_qat.compat import cpu as compat_cpu

    iter_dir = resolve_checkpoint(ckpt_dir)
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise CheckpointError("load_model_for_export runs on one process; call it outside torchrun")
    compat_cpu.init_single_process_gloo(force=torch.cuda.is_available())
    compat_cpu.activate_training(force=torch.cuda.is_available())
    recipe = None
    if (iter_dir / "recipe.yaml").is_file():
        from int4_qat.recipe import Recipe

        recipe = Recipe.load(iter_dir / "recipe.yaml")
    if (iter_dir / "config.json").is_file():
        arch = load_arch(iter_dir)
    elif recipe is not None:
        arch = load_arch(recipe.model.config_json().parent)
    else:
        raise CheckpointError(f"{iter_dir}: neither config.json nor recipe.yaml; cannot tell the architecture")
    model = build_model(arch, use_te=False, params_dtype=torch.float32)
    _restore_quant(model, iter_dir)
    _load_model_state(model, iter_dir, weights_only=False)
    model.eval()
    return model, arch, recipe
