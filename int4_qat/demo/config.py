"""The demo's options (:class:`DemoConfig`), its model config.json and its recipes.

``make demo`` trains a resized copy of ``recipes/models/tiny-qwen3-moe`` with recipes derived from
``recipes/tiny-moe.yaml`` (so the demo runs exactly what ``make recipe-tiny-moe`` would, with the
demo's sizes, steps and quant section); every option is validated here, before anything runs,
with a ``ValueError`` that names the command-line flag.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "VARIANTS", "ci_config", "write_model_config", "build_recipe",
           "REPO_ROOT", "BASE_MODEL", "BASE_RECIPE"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = REPO_ROOT / "recipes" / "models" / "tiny-qwen3-moe"
BASE_RECIPE = REPO_ROOT / "recipes" / "tiny-moe.yaml"

#: Demo variant name -> the recipe ``quant:`` section it trains / exports with.
VARIANTS: dict[str, dict[str, Any]] = {
    "int4-g32": {"format": "int4", "group_size": 32},
    "int4-g128": {"format": "int4", "group_size": 128},
    "mxfp4": {"format": "mxfp4"},
    "nvfp4": {"format": "nvfp4"},
}


@dataclass
class DemoConfig:
    """Everything ``tools/demo.py`` can set (defaults = ``make demo``; :func:`ci_config` = tests)."""

    out: Path = REPO_ROOT / "runs" / "demo"
    steps: int = 1200             # stage 1 (BF16) optimizer steps (a better-trained model has a
                                  # PTQ gap well outside the eval noise; README "The demo")
    qat_steps: int = 200          # continuation budget per variant (same for BF16 and every QAT)
    hidden: int = 128
    moe_intermediate: int | None = None   # None = hidden
    layers: int = 2
    experts: int = 8
    heads: int = 4
    seq_length: int = 128
    global_batch: int = 8
    micro_batch: int = 8
    lr: float = 3e-3
    qat_lr: float = 5e-4
    eval_samples: int | None = None   # held-out windows of seq_length tokens (None = all of them)
    bootstrap_resamples: int = 2000   # paired bootstrap of every Δ over the eval windows
    formats: tuple[str, ...] = tuple(VARIANTS)
    scope: str = "all-linear"     # experts-only: ~60 % of the PTQ gap (README "The demo")
    baselines: bool = True        # ModelOpt INT4 AWQ and FP8 rows
    llama_cpp: bool = True        # the llama.cpp column + tokens/s table (int4_qat.demo.llama_cpp)
    calib_batches: int = 8
    seed: int = 1234
    threads: int = 1
    log_every: int = 25

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.formats = tuple(self.formats)
        unknown = [f for f in self.formats if f not in VARIANTS]
        if unknown:
            raise ValueError(f"--formats: unknown {unknown}; choose from {list(VARIANTS)}")
        for k in ("steps", "qat_steps", "hidden", "layers", "experts", "heads", "seq_length",
                  "global_batch", "micro_batch", "threads", "calib_batches", "bootstrap_resamples"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.eval_samples is not None and self.eval_samples < 2:
            raise ValueError(f"--eval-samples must be >= 2 (the bootstrap resamples windows), "
                             f"got {self.eval_samples}")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"--global-batch {self.global_batch} must be a multiple of "
                             f"--micro-batch {self.micro_batch}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads} "
                             f"with an even head dim (RoPE)")
        if self.heads % 2:
            raise ValueError(f"--heads {self.heads}: must be even (2 query heads per KV head)")
        inter = self.moe_intermediate or self.hidden
        for name in self.formats:
            fmt = VARIANTS[name]["format"]
            g = VARIANTS[name].get("group_size", {"mxfp4": 32, "nvfp4": 16}.get(fmt))
            # groups must tile K (hidden for fc1 / gate_up, moe_intermediate for fc2 / down); INT4
            # MoE must also be Marlin-servable (SGLang/vLLM marlin_utils.py: hidden % 128 == 0,
            # intermediate % max(64, G) == 0), which the exporter checks too.
            need_h, need_i = (128, max(64, g)) if fmt == "int4" else (g, g)
            if self.hidden % need_h:
                raise ValueError(f"--hidden {self.hidden}: {name} needs hidden % {need_h} == 0")
            if inter % need_i:
                raise ValueError(f"--moe-intermediate {inter}: {name} needs it % {need_i} == 0")
        if self.scope not in ("experts", "all-linear"):
            raise ValueError(f"--scope {self.scope!r}: choose experts or all-linear")
        if self.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("llama-cpp-python is not installed (make install builds it, "
                             "requirements.txt pins it); install it or pass --no-llama-cpp")

    @property
    def qat_tokens(self) -> int:
        return self.qat_steps * self.global_batch * self.seq_length

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["formats"] = list(self.formats)
        d["qat_tokens"] = self.qat_tokens
        return d


def ci_config(out: str | os.PathLike, **overrides) -> DemoConfig:
    """The reduced configuration the tests run (every row, a few dozen steps, ≤ 3 min)."""
    kw = dict(out=Path(out), steps=60, qat_steps=30, eval_samples=64, calib_batches=2,
              lr=3e-3, qat_lr=1e-3, log_every=10)
    kw.update(overrides)
    return DemoConfig(**kw)


def write_model_config(cfg: DemoConfig, out_dir: Path) -> Path:
    """The demo's HF config.json: tiny-qwen3-moe resized by the options (vocab stays 320 = bytes
    + specials of the byte tokenizer)."""
    base = json.loads((BASE_MODEL / "config.json").read_text())
    head_dim = cfg.hidden // cfg.heads
    base.update(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                moe_intermediate_size=cfg.moe_intermediate or cfg.hidden,
                num_hidden_layers=cfg.layers, max_window_layers=cfg.layers,
                num_experts=cfg.experts, num_experts_per_tok=min(2, cfg.experts),
                num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads // 2,
                head_dim=head_dim, max_position_embeddings=max(512, cfg.seq_length),
                torch_dtype="float32")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(base, indent=2, sort_keys=True) + "\n")
    return out_dir


def build_recipe(cfg: DemoConfig, model_dir: Path, quant: dict[str, Any] | None, *, lr: float,
                 steps: int, name: str):
    """A validated :class:`~int4_qat.recipe.Recipe` from ``recipes/tiny-moe.yaml`` + the options."""
    import yaml

    from int4_qat.recipe import Recipe

    d = yaml.safe_load(BASE_RECIPE.read_text())
    d["name"] = name
    d["model"] = {"config": str(model_dir), "checkpoint": None, "tokenizer": None}
    q = {"scope": cfg.scope, **(quant or {"format": "int4", "group_size": 32})}
    d["quant"] = q
    t = d["train"]
    t.update(data=["system"], seq_length=cfg.seq_length, global_batch=cfg.global_batch,
             micro_batch=cfg.micro_batch, lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps),
             steps=steps, eval_interval=max(1, steps // 5), eval_iters=2, log_interval=10 ** 9,
             seed=cfg.seed, precision="fp32", checkpoint_dir=str(cfg.out / "train" / name / "ckpt"),
             save_interval=10 ** 9)
    d["export"] = {"formats": [q["format"]], "output_dir": str(cfg.out / "export"), "serving_tp": 1}
    d.pop("slurm", None)
    return Recipe.from_dict(d, source=f"demo:{name}")
