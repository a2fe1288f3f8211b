"""May this checkpoint be resumed with this recipe? Refuse anything that would make the records lie.

A resumed run loads the model *with its quantizers* (ModelOpt's state travels inside the
checkpoint), the optimizer, the scheduler and the data position from ``checkpoint_dir/latest``,
then keeps training and writes a new ``recipe.yaml`` / ``train_state.json`` / ``metrics.jsonl``.
If the recipe given now differs from the checkpoint's in something that defines the model, the
quantization or the data order, the forward would keep the checkpoint's behaviour while every
record (and a later export) claimed the new one — the train–infer inconsistency this project
exists to prevent. So :func:`check_resume` compares the checkpoint's ``recipe.yaml``,
``config.json`` and ``train_state.json`` with the run about to start, before anything is built,
and refuses with every difference named, old and new, plus the ways out.

What **may** change on resume (:data:`MAY_CHANGE`), and why it is safe:

* ``train.steps``, ``lr``, ``min_lr``, ``warmup_steps``, ``weight_decay``, ``grad_clip`` — the
  optimizer schedule. The trainer builds Megatron's ``OptimizerParamScheduler`` with
  ``override_opt_param_scheduler=True`` so the new values are the ones used from the resumed
  step on (Megatron's default would silently keep the checkpoint's values while the new
  ``recipe.yaml`` claimed the new ones);
* ``train.eval_interval``, ``eval_iters``, ``log_interval``, ``save_interval`` — cadence only;
* ``train.micro_batch`` — how a global batch is split; the global batch (data order) is unchanged;
* ``train.checkpoint_dir``, ``name``, ``export.*``, ``slurm.*`` — where and how, not what;
* ``parallel.*`` — the layout: the distributed checkpoint reshards (RNG streams are restored only
  at the same world size);
* ``model.checkpoint`` — the initial weights, unused on resume (the weights come from the
  checkpoint); where they originally came from stays recorded as ``init_source`` in
  ``train_state.json``;
* ``model.config`` / ``model.tokenizer`` / ``train.data`` *paths* — when what they hold is
  unchanged: the config.json content is compared, and the data by a fingerprint of the packed
  token samples (which also covers the tokenizer).

Everything else must match: ``quant.*`` and ``--no-quant`` (the scheme), the architecture
(``config.json`` content), the data (content fingerprint, ``seed``, ``seq_length``,
``global_batch``, ``eval_fraction``) and ``train.precision``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MAY_CHANGE", "check_resume", "check_resume_data", "data_fingerprint", "resume_problems"]

#: Recipe fields (dotted, or a section prefix ending in ".") a resumed run may change.
MAY_CHANGE = (
    "name", "parallel.", "export.", "slurm.", "model.checkpoint",
    "train.steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay",
    "train.grad_clip", "train.eval_interval", "train.eval_iters", "train.log_interval",
    "train.save_interval", "train.micro_batch", "train.checkpoint_dir",
)


def _allowed(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _scheme_text(quant: dict | None) -> str:
    if not quant:
        return "no fake quant (BF16 baseline, --no-quant)"
    from int4_qat.scheme import QuantScheme

    return QuantScheme.from_dict(quant).describe()


def resume_problems(iter_dir: str | Path, recipe, quant: bool) -> list[str]:
    """One line per field the resume may not change. Data / tokenizer *paths* may change when the
    checkpoint has a data fingerprint (then :func:`check_resume_data` compares the content)."""
    from int4_qat.arch.hf_io import read_config
    from int4_qat.recipe import Recipe

    iter_dir = Path(iter_dir)
    state = json.loads((iter_dir / "train_state.json").read_text())
    problems: list[str] = []
    # the scheme: from train_state (what the checkpoint's quantizers are), not just recipe.yaml
    old_q = state.get("quant") if state.get("quantized") else None
    new_q = recipe.quant.scheme().to_dict() if quant else None
    if state.get("quantized") and old_q is None and (iter_dir / "recipe.yaml").is_file():
        old_q = Recipe.load(iter_dir / "recipe.yaml").quant.scheme().to_dict()
    if bool(old_q) != bool(new_q) or (old_q and old_q != new_q):
        problems.append(f"quant: the checkpoint was trained with {_scheme_text(old_q)}, this run would use "
                        f"{_scheme_text(new_q)} (its quantizers are loaded from the checkpoint, so the "
                        f"forward would not change while the records would)")
    # the architecture: config.json content
    if (iter_dir / "config.json").is_file():
        old_cfg, _ = read_config(iter_dir)
        new_cfg = recipe.model.hf_config()
        diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        if diff:
            problems.append(f"model.config: {recipe.model.config_json()} differs from the checkpoint's "
                            f"config.json in " + ", ".join(f"{k} ({old_cfg.get(k)!r} -> {new_cfg.get(k)!r})"
                                                           for k in diff[:5]))
    if (iter_dir / "recipe.yaml").is_file():
        old = _flatten(Recipe.load(iter_dir / "recipe.yaml").to_dict())
        new = _flatten(recipe.to_dict())
        has_fp = bool(state.get("data", {}).get("fingerprint"))
        for key in sorted(set(old) | set(new)):
            if key.startswith("quant.") or _allowed(key) or old.get(key) == new.get(key):
                continue
            if key == "model.config":
                continue                                   # compared by content above
            if (key == "model.tokenizer" or key.startswith("train.data")) and has_fp:
                continue                                   # compared by the data fingerprint later
            problems.append(f"{key}: checkpoint {old.get(key)!r}, this recipe {new.get(key)!r}")
    return problems


def _refuse(iter_dir: Path, problems: list[str]) -> None:
    from int4_qat.checkpoint import CheckpointError

    root = iter_dir.parent
    may = ", ".join(m.rstrip(".") + ("*" if m.endswith(".") else "") for m in MAY_CHANGE)
    raise CheckpointError(
        f"cannot resume {iter_dir}: this run differs from the checkpoint in what defines the model, "
        f"its quantization or the data order:\n  " + "\n  ".join(problems)
        + f"\nfix: train it as a new run (--out NEW_DIR, with --init-from {iter_dir} to start from these "
          f"weights), or --no-resume to start over in {root} (its checkpoints get replaced), or restore "
          f"the checkpoint's values. A resume may change only: {may}; and the paths of model.config, "
          f"model.tokenizer and train.data when their content is unchanged")


def check_resume(iter_dir: str | Path, recipe, quant: bool) -> None:
    """Refuse (:class:`int4_qat.checkpoint.CheckpointError`) a resume of ``iter_dir`` under
    ``recipe`` that changes anything but :data:`MAY_CHANGE` (the data content is compared once the
    data is loaded: :func:`check_resume_data`)."""
    problems = resume_problems(iter_dir, recipe, quant)
    if problems:
        _refuse(Path(iter_dir), problems)


def data_fingerprint(train_ds, eval_ds) -> dict:
    """What identifies the data order: an XXH3 digest of the packed train and eval samples
    (tokenizer, files, split and seq_length all show in them) and their counts."""
    from int4_qat.checksums import digest

    parts = [digest(ds.samples.contiguous().numpy()) if ds is not None else "-" for ds in (train_ds, eval_ds)]
    return {"fingerprint": ":".join(parts), "train_samples": len(train_ds),
            "eval_samples": len(eval_ds) if eval_ds is not None else 0}


def check_resume_data(iter_dir: str | Path, fingerprint: dict) -> None:
    """Refuse a resume whose data (as packed samples) differs from the checkpoint's."""
    state = json.loads((Path(iter_dir) / "train_state.json").read_text())
    old = state.get("data") or {}
    if old.get("fingerprint") and old.get("fingerprint") != fingerprint["fingerprint"]:
        _refuse(Path(iter_dir), [
            f"train.data / model.tokenizer: the data differs from the checkpoint's "
            f"({old.get('train_samples')} train / {old.get('eval_samples')} eval samples of the saved "
            f"run, {fingerprint['train_samples']} / {fingerprint['eval_samples']} now; content "
            f"fingerprint {old['fingerprint']} != {fingerprint['fingerprint']})"])
