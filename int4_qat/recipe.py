"""Recipes: one YAML file per training run, typed and validated once, at load.

A recipe names everything a run needs, in five sections that are handed to their components
separately (the model builder sees ``model``, the launcher ``parallel``, the fake-quant and the
exporter ``quant``, the trainer ``train``, the exporter ``export``)::

    name: tiny-moe
    model:    {config: recipes/models/tiny-qwen3-moe, checkpoint: null, tokenizer: null}
    parallel: {tp: 1, pp: 1, ep: 1, etp: 1, dp: 1, sequence_parallel: false, nodes: 1, gpus_per_node: 1}
    quant:    {format: int4, group_size: 128, scope: experts, scale_rule: amax/7, served: bf16}
    train:    {data: [system], seq_length: 128, global_batch: 8, micro_batch: 2, lr: 1.0e-3, ...}
    export:   {formats: [int4], output_dir: runs/tiny-moe/export, serving_tp: 1}
    slurm:    {time: "04:00:00", partition: null, account: null}      # optional

Rules (the schema is in docs/DESIGN.md §4):

* Every section is a pydantic v2 model with ``extra="forbid"``: a misspelt key is an error, never
  a silently used default. Integers and booleans are strict (``tp: "4"`` or ``tp: 4.5`` is an
  error); floats accept numeric strings because PyYAML reads ``1e-3`` (no dot) as a string, and
  must be finite (``lr: .inf`` / ``.nan`` are errors).
* The YAML is read defensively (:func:`int4_qat.recipe_yaml.load_yaml`): UTF-8 text only, at
  most 1 MiB, a key given twice in one mapping is an error (YAML would silently keep the last),
  and anchors / aliases may not expand the document beyond 100 000 nodes (an alias "bomb" is
  refused in linear time instead of hanging); error messages quote at most a short prefix of a
  bad value.
* :meth:`Recipe.load` turns pydantic's errors into one :class:`RecipeError` (a ``ValueError``)
  whose lines name the file, the dotted key (``parallel.tp``) and the allowed values or keys.
* Relative paths (model dirs, data, checkpoint and export dirs) are resolved against the
  repository root, so a recipe means the same thing from any working directory.
  :meth:`Recipe.to_yaml` writes the resolved recipe (saved next to each checkpoint).
* ``train.data: [system]`` is a documented special value: the real text corpus found on this
  machine by :func:`int4_qat.data.system_corpus_paths`; :meth:`TrainSection.data_paths` expands it.
* Format-specific quant rules: INT4 takes any positive group (32/64/128 are Marlin-servable; that
  is checked by ``tools/launch.py check``) and a scale rule (``amax/7`` as slime/Kimi-K2,
  ``amax/7.5`` as compressed-tensors) and a served rule (``bf16``: the engine serves ``bf16(q*s)``,
  SGLang / vLLM Marlin; ``exact``: it serves ``q*s`` exactly, llama.cpp Q4_0); MXFP4 has block 32
  and NVFP4 block 16 fixed by the formats and take neither.

This module checks one recipe's own consistency only; :meth:`Recipe.missing_inputs` lists the input
paths (model checkpoint, tokenizer, data) that do not exist on this machine, which
``tools/launch.py`` reports on ``check`` and refuses on ``train`` / ``slurm``. Layout-versus-world-size, group-versus-TP
shard and serving limits need the model's config.json and live in :mod:`int4_qat.planner` /
``tools/launch.py check``.
"""
from __future__ import annotations

import enum
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator, model_validator)

from int4_qat.recipe_yaml import MAX_RECIPE_BYTES, MAX_YAML_NODES, load_yaml

__all__ = [
    "REPO_ROOT", "SYSTEM_DATA", "RecipeError", "QuantFormatName", "QuantScope", "ScaleRule", "ServedRule",
    "Precision", "ModelSection", "ParallelSection", "QuantSection", "TrainSection",
    "ExportSection", "SlurmSection", "Recipe", "resolve_path", "load_yaml", "MAX_YAML_NODES",
    "MAX_RECIPE_BYTES",
]

#: The repository root: relative paths in recipes are resolved against it.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: ``train.data: [system]`` — use the text corpus of this machine (int4_qat.data.system_corpus_paths).
SYSTEM_DATA = "system"


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and each offending key."""


# The enums mirror int4_qat.formats.QuantFormat and int4_qat.scheme.Scope value for value (a test
# checks it); they are repeated here so that loading a recipe never imports torch or ModelOpt.
class QuantFormatName(str, enum.Enum):
    INT4 = "int4"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


class QuantScope(str, enum.Enum):
    EXPERTS = "experts"          # routed experts only (slime / Kimi-K2-Thinking convention)
    ALL_LINEAR = "all-linear"    # every Linear except router, embeddings, norms, lm_head


class ScaleRule(str, enum.Enum):
    AMAX_7 = "amax/7"            # s = amax/7, q in [-7, 7]: slime, Kimi-K2-Thinking
    AMAX_7_5 = "amax/7.5"        # s = amax/7.5, q in [-8, 7]: compressed-tensors' own compressor


class ServedRule(str, enum.Enum):
    BF16 = "bf16"                # the engine computes bf16(q * s): SGLang / vLLM Marlin, compressed-tensors
    EXACT = "exact"              # the engine computes q * s exactly (float32): llama.cpp Q4_0


class Precision(str, enum.Enum):
    BF16 = "bf16"
    FP32 = "fp32"                # CPU runs


#: Fixed block sizes of the FP4 formats (OCP MX spec: 32; NVFP4: 16).
FIXED_BLOCK = {QuantFormatName.MXFP4: 32, QuantFormatName.NVFP4: 16}
DEFAULT_INT4_GROUP = 128


def resolve_path(p: str | os.PathLike, root: Path = REPO_ROOT) -> Path:
    """Absolute path: ``~`` expanded, relative paths taken from the repository root."""
    path = Path(os.path.expanduser(str(p)))
    return path if path.is_absolute() else (root / path).resolve()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False,
                              allow_inf_nan=False)


class ModelSection(_Section):
    """Which architecture, which weights, which tokenizer."""
    config: Path = Field(description="dir holding the HF config.json (or the config.json itself)")
    checkpoint: Path | None = Field(None, description="HF BF16 checkpoint dir to import; null = random init")
    tokenizer: Path | None = Field(None, description="HF tokenizer dir; null = byte-level tokenizer")

    @field_validator("config", "checkpoint", "tokenizer", mode="after")
    @classmethod
    def _resolve(cls, v: Path | None) -> Path | None:
        return None if v is None else resolve_path(v)

    def config_json(self) -> Path:
        """Path of the config.json this section names."""
        return self.config if self.config.suffix == ".json" else self.config / "config.json"

    def hf_config(self) -> dict[str, Any]:
        """The parsed HF config.json; ``ValueError`` naming ``model.config`` when unreadable."""
        import json
        path = self.config_json()
        try:
            with open(path) as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"model.config: {path} does not exist (give the dir holding the "
                             f"model's HF config.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"model.config: {path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"model.config: {path} must hold a JSON object")
        return cfg


class ParallelSection(_Section):
    """Megatron-Core layout. Dense part: tp * pp * dp == nodes * gpus_per_node (no CP here).
    Expert part: etp * ep * expert-dp * pp == world size (Megatron's MoE parallel folding)."""
    tp: StrictInt = Field(1, ge=1, description="tensor parallel")
    pp: StrictInt = Field(1, ge=1, description="pipeline parallel")
    ep: StrictInt = Field(1, ge=1, description="expert parallel")
    etp: StrictInt = Field(1, ge=1, description="expert tensor parallel (1 keeps INT4 groups whole)")
    dp: StrictInt = Field(1, ge=1, description="data parallel of the dense part")
    sequence_parallel: StrictBool = False
    nodes: StrictInt = Field(1, ge=1)
    gpus_per_node: StrictInt = Field(1, ge=1)
    # Uneven pipeline split (Megatron TransformerConfig.num_layers_in_{first,last}_pipeline_stage):
    # needed when num_layers % pp != 0, e.g. Qwen3-235B's 94 or Kimi-K2's 61 layers.
    first_stage_layers: StrictInt | None = Field(None, ge=1, description="layers on pipeline stage 0")
    last_stage_layers: StrictInt | None = Field(None, ge=1, description="layers on the last stage")

    @model_validator(mode="after")
    def _uneven_pp(self) -> "ParallelSection":
        if self.pp == 1 and (self.first_stage_layers or self.last_stage_layers):
            raise ValueError("parallel.first_stage_layers / parallel.last_stage_layers need pp > 1 "
                             "(remove them or raise parallel.pp)")
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class QuantSection(_Section):
    """The fake-quant / export scheme. ``scheme()`` builds the one QuantScheme everything uses."""
    format: QuantFormatName = QuantFormatName.INT4
    group_size: StrictInt | None = Field(None, ge=1, description="INT4: any divisor of K (default 128); "
                                         "MXFP4: 32; NVFP4: 16; null = the format's default")
    scope: QuantScope = QuantScope.EXPERTS
    scale_rule: ScaleRule | None = Field(None, description="INT4 only; default amax/7")
    served: ServedRule | None = Field(None, description="INT4 only: the weight the serving engine "
                                      "computes, bf16 (Marlin, default) or exact (llama.cpp)")

    @model_validator(mode="after")
    def _format_rules(self) -> "QuantSection":
        fmt = self.format
        if fmt is QuantFormatName.INT4:
            if self.group_size is None:
                self.__dict__["group_size"] = DEFAULT_INT4_GROUP
            if self.scale_rule is None:
                self.__dict__["scale_rule"] = ScaleRule.AMAX_7
            if self.served is None:
                self.__dict__["served"] = ServedRule.BF16
        else:
            block = FIXED_BLOCK[fmt]
            if self.group_size is None:
                self.__dict__["group_size"] = block
            elif self.group_size != block:
                raise ValueError(f"quant.group_size: {fmt.value} has a fixed block of {block}, got "
                                 f"{self.group_size} (write group_size: {block} or leave it out)")
            if self.scale_rule is not None:
                raise ValueError(f"quant.scale_rule: only int4 takes a scale rule; {fmt.value} "
                                 f"scales are fixed by the format (remove scale_rule)")
            if self.served is not None:
                raise ValueError(f"quant.served: only int4 takes a served rule; {fmt.value} has one "
                                 f"served weight for every engine (remove served)")
        return self

    def scheme(self):
        """The :class:`int4_qat.scheme.QuantScheme` for this section (imported lazily: torch)."""
        from int4_qat.formats import QuantFormat
        from int4_qat.scheme import QuantScheme, Scope
        kwargs: dict[str, Any] = dict(format=QuantFormat(self.format.value), group_size=self.group_size,
                                      scope=Scope(self.scope.value))
        if self.scale_rule is not None:
            kwargs["scale_rule"] = self.scale_rule.value
        if self.served is not None:
            kwargs["served"] = self.served.value
        return QuantScheme(**kwargs)


class TrainSection(_Section):
    """Optimizer, data and checkpoint cadence for ``python -m int4_qat.train``."""
    data: list[str] = Field(min_length=1, description=".txt/.jsonl files or dirs; [system] = this "
                            "machine's text corpus")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    seq_length: StrictInt = Field(ge=1)
    global_batch: StrictInt = Field(ge=1)
    micro_batch: StrictInt = Field(ge=1)
    lr: float = Field(gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_steps: StrictInt = Field(0, ge=0)
    steps: StrictInt = Field(ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    eval_interval: StrictInt = Field(100, ge=1)
    eval_iters: StrictInt = Field(2, ge=0)
    log_interval: StrictInt = Field(1, ge=1)
    seed: StrictInt = 1234
    precision: Precision = Precision.BF16
    checkpoint_dir: Path | None = Field(None, description="null = runs/<name>/ckpt")
    save_interval: StrictInt = Field(100, ge=1)

    @field_validator("data", mode="after")
    @classmethod
    def _resolve_data(cls, v: list[str]) -> list[str]:
        return [d if d == SYSTEM_DATA else str(resolve_path(d)) for d in v]

    @field_validator("checkpoint_dir", mode="after")
    @classmethod
    def _resolve_ckpt(cls, v: Path | None) -> Path | None:
        return None if v is None else resolve_path(v)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSection":
        if self.global_batch % self.micro_batch:
            raise ValueError(f"train.global_batch ({self.global_batch}) must be a multiple of "
                             f"train.micro_batch ({self.micro_batch})")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self

    def data_paths(self) -> list[Path]:
        """The data files/dirs, with ``system`` expanded to this machine's text corpus."""
        out: list[Path] = []
        for d in self.data:
            if d == SYSTEM_DATA:
                from int4_qat.data import system_corpus_paths
                out.extend(Path(p) for p in system_corpus_paths())
            else:
                out.append(Path(d))
        return out


class ExportSection(_Section):
    """What ``tools/export.py`` writes and the serving layout it must load under."""
    formats: list[QuantFormatName] = Field(min_length=1)
    output_dir: Path | None = Field(None, description="null = runs/<name>/export; one subdir per format")
    serving_tp: StrictInt = Field(1, ge=1, description="SGLang --tp-size the export must be servable at")
    serving_ep: StrictInt = Field(1, ge=1, description="SGLang --ep-size; MoE weights are split over "
                                  "serving_tp / serving_ep ranks")
    processes: StrictInt = Field(1, ge=1, description="tools/export.py processes on one node (torchrun); "
                                 "the output is byte-identical for any count")

    @field_validator("output_dir", mode="after")
    @classmethod
    def _resolve(cls, v: Path | None) -> Path | None:
        return None if v is None else resolve_path(v)

    @model_validator(mode="after")
    def _ep_divides_tp(self) -> "ExportSection":
        if self.serving_tp % self.serving_ep:
            raise ValueError(f"export.serving_ep ({self.serving_ep}) must divide export.serving_tp "
                             f"({self.serving_tp}) (SGLang: moe_tp_size = tp_size / ep_size)")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"export.formats lists a format twice: {[f.value for f in self.formats]}")
        return self

    @property
    def moe_tp(self) -> int:
        """How many ways the serving engine splits each expert's intermediate dim."""
        return self.serving_tp // self.serving_ep


class SlurmSection(_Section):
    """Batch-job settings for ``tools/launch.py slurm`` (optional section)."""
    time: str = Field("04:00:00", pattern=r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$",
                      description="#SBATCH --time, [D-]HH:MM[:SS]")
    partition: str | None = None
    account: str | None = None
    port: StrictInt = Field(29500, ge=1024, le=65535, description="c10d rendezvous port on the head node")

    @field_validator("time", mode="before")
    @classmethod
    def _quoted_time(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            # YAML 1.1 reads an unquoted 72:00:00 as the base-60 integer 259200
            raise ValueError(f"slurm.time: got the number {v}; quote the time in the YAML, "
                             f'e.g. time: "72:00:00" (unquoted H:MM:SS is read as base-60)')
        return v


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Recipe(_Section):
    """A whole recipe; see the module docstring and docs/DESIGN.md §4."""
    name: str
    model: ModelSection
    parallel: ParallelSection = ParallelSection()
    quant: QuantSection = QuantSection()
    train: TrainSection
    export: ExportSection
    slurm: SlurmSection = SlurmSection()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"name {v!r}: use lower-case letters, digits, '.', '_' and '-' "
                             f"(it names runs/<name>/ and the make targets)")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> "Recipe":
        if self.train.checkpoint_dir is None:
            self.train.__dict__["checkpoint_dir"] = resolve_path(f"runs/{self.name}/ckpt")
        if self.export.output_dir is None:
            self.export.__dict__["output_dir"] = resolve_path(f"runs/{self.name}/export")
        return self

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_dict(cls, data: Any, source: str = "<recipe>") -> "Recipe":
        """Validate a parsed recipe; ``RecipeError`` lists every problem with its dotted key."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a YAML mapping with keys "
                              f"{', '.join(cls.model_fields)}; got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(_format_errors(e, source)) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """Read and validate ``path`` (a recipe YAML, or a saved ``recipe.yaml``)."""
        try:
            data = load_yaml(path)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every default filled in and every path absolute."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (saved as ``recipe.yaml`` inside each checkpoint);
        ``Recipe.from_dict(yaml.safe_load(r.to_yaml()))`` equals ``r``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def missing_inputs(self) -> list[str]:
        """``"<key>: <path> does not exist"`` for every input path absent on this machine
        (``model.checkpoint``, ``model.tokenizer``, each ``train.data`` entry). ``model.config``
        is not listed: without it nothing can be checked (``model.hf_config()`` raises)."""
        out = []
        for key, p in (("model.checkpoint", self.model.checkpoint), ("model.tokenizer", self.model.tokenizer)):
            if p is not None and not p.exists():
                out.append(f"{key}: {p} does not exist")
        for i, d in enumerate(self.train.data):
            if d != SYSTEM_DATA and not Path(d).exists():
                out.append(f"train.data[{i}]: {d} does not exist")
        return out

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_yaml())
        return p


def _short(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters (a bad value may be huge)."""
    r = repr(v) if not isinstance(v, (dict, list)) or len(v) < 50 else f"<{type(v).__name__} of {len(v)} items>"
    return r if len(r) <= limit else r[:limit] + "..."


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the section that ``loc`` (minus its last element) points into."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return None
        cur = field.annotation
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
    return list(cur.model_fields) if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Recipe, loc)
            msg = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"].startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
            if re.match(r"^[a-z_]+\.[a-z_.]+[ :(]", msg):     # the message names its own key
                lines.append(f"{source}: {msg}")
                continue
        else:
            msg = f"{msg} (got {_short(e.get('input'))})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)
