"""``make demo``: train, quantize (PTQ vs QAT), export, reload, compare -- one CPU process.

Stages (every number in the table is measured by this file's code, nothing is copied in):

1. **Train BF16.** A tiny Qwen3-MoE (``recipes/models/tiny-qwen3-moe``, resized by the options)
   is trained in fp32 with :class:`int4_qat.train.Trainer` (Megatron-Core on CPU) on the real text
   of this machine (``train.data: [system]``), byte tokenizer; a held-out document split is the
   eval set. The trained weights are written as an HF checkpoint (``hf/bf16-trained``).
2. **Continue for a fixed token budget** from those weights, once per variant: BF16 (the fair
   reference: same extra tokens, no quantizer) and QAT for each format (``scheme.apply`` inserts
   ModelOpt weight quantizers whose forward is the project's fake quant; straight-through
   backward). All continuations read the same batches (the data stream continues where stage 1
   stopped) under the same LR schedule.
3. **PTQ** = the stage-1 model with the format's fake quant applied and no further training
   (round-to-nearest with the scheme's own scale rule). Baselines: ModelOpt's INT4 AWQ-lite
   (calibrated on training text) and ModelOpt FP8 E4M3 per-channel weight-only fake quant, both on
   CPU; see :mod:`int4_qat.demo.baselines`.
4. **Export + reload.** Each quantized model's weights are gathered to HF names
   (``int4_qat.arch.export_hf_state_dict``, fp32), packed by the project exporter
   (``int4_qat.export.export_checkpoint`` -- what ``tools/export.py`` runs) into compressed-tensors
   INT4 / MXFP4 / NVFP4, reloaded with transformers + compressed-tensors, and evaluated there.
5. **Train-infer mismatch**: training-side fake-quant forward (Megatron + ModelOpt) vs the reloaded
   export on the same eval tokens: mean/max |Δ logprob| and KL (:mod:`int4_qat.demo.evaluate`).
6. **llama.cpp** (``cfg.llama_cpp``, on by default; :mod:`int4_qat.demo.llama_cpp`): the BF16,
   INT4 g32 and MXFP4 exports converted to GGUF from the same source and scheme and run by
   llama.cpp on the eval windows (an extra evaluator column), then a tokens/s table BF16 vs Q4_0
   vs MXFP4 (its report section).
7. **Report**: every Δ vs BF16 with a paired bootstrap interval over the eval windows
   (:mod:`int4_qat.demo.compare`, :mod:`int4_qat.demo.stats`); ``summary.md`` / ``summary.json``
   / PNG plots (:mod:`int4_qat.demo.report`).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from int4_qat.demo.config import VARIANTS, DemoConfig, build_recipe, write_model_config
from int4_qat.parallel import free_port
from int4_qat.demo.report import Curve, ExtraSection, Row

__all__ = ["DemoResult", "run_demo", "BF16_MISMATCH_WINDOWS"]

#: eval windows (from the first) on which the export is also run in bf16 for the last table column
BF16_MISMATCH_WINDOWS = 64


@dataclass
class DemoResult:
    rows: list[Row]
    curves: list[Curve]
    paths: dict[str, Path]
    meta: dict[str, Any]
    table: str
    headlines: list[str]
    sections: list[ExtraSection] = field(default_factory=list)   # extra evaluators' own sections


# ------------------------------------------------------------------------------- helpers
class _Clock:
    """Wall and CPU seconds per stage (CPU time of this process, all threads: on a shared machine
    it is the better estimate of the wall time on a quiet one)."""

    def __init__(self, log: Callable[[str], None]):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.stages: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._log = log

    def log(self, msg: str) -> None:
        self._log(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}")

    @contextlib.contextmanager
    def stage(self, name: str, quiet: bool = False):
        t, c = time.perf_counter(), time.process_time()
        if not quiet:
            self.log(f"── {name}")
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - t, 2)
            self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - c, 2)


def _inner(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _run_phase(trainer, steps: int, start: int, label: str, clock: _Clock, log_every: int,
               offset: int) -> Curve:
    """Step ``trainer`` ``steps`` times reading the data stream from global step ``start``."""
    trainer.step = start        # data position (BatchSampler); the LR schedule starts fresh
    curve = Curve(label, [], [])
    eval_every = max(1, steps // 5)
    for i in range(1, steps + 1):
        m = trainer.train_step()
        if not torch.isfinite(torch.tensor(m["loss"])):
            raise FloatingPointError(f"{label}: step {i}: loss is {m['loss']}")
        curve.steps.append(offset + i)
        curve.losses.append(m["loss"])
        if i % eval_every == 0 or i == steps:
            ev = trainer.evaluate()
            if ev is not None:
                curve.eval.append((offset + i, ev))
        if i % log_every == 0 or i == steps:
            ev = f" | eval {curve.eval[-1][1]:.4f}" if curve.eval and curve.eval[-1][0] == offset + i else ""
            clock.log(f"{label}: step {i}/{steps} | loss {m['loss']:.4f} | "
                      f"{m['tokens_per_s']:.0f} tok/s{ev}")
    return curve


def _safetensors_bytes(export_dir: Path) -> tuple[int, int]:
    """(bytes on disk, bytes as served) of an HF dir: on disk = every .safetensors file; as served
    = tensor payloads with fp32 tensors counted at 2 bytes (served in bf16)."""
    from safetensors import safe_open

    disk = served = 0
    for f in sorted(export_dir.glob("*.safetensors")):
        disk += f.stat().st_size
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                dt = sl.get_dtype()
                size = {"F32": 2, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1,
                        "F8_E4M3": 1}.get(dt, 4)
                served += n * size
    return disk, served




# ------------------------------------------------------------------------------- stages
class _Demo:
    """State shared by the stages of one run (see :func:`run_demo`)."""

    def __init__(self, cfg: DemoConfig, log: Callable[[str], None], extra_evaluators: Sequence = ()):
        self.cfg, self.clock = cfg, _Clock(log)
        self.extra_evaluators = list(extra_evaluators)   # evaluate.ExtraEvaluator objects
        self.rows: list[Row] = []
        self.curves: list[Curve] = []
        self.arch = self.evalset = self.calib = None
        self.hf_trained: Path | None = None

    def log(self, msg: str) -> None:
        self.clock.log(msg)

    # -- helpers -------------------------------------------------------------------------
    def trainer(self, name: str, quant: dict | None, *, lr: float, steps: int, init_from=None):
        from int4_qat.train import Trainer

        recipe = build_recipe(self.cfg, self.model_dir, quant, lr=lr, steps=steps, name=name)
        return Trainer(recipe, cpu=True, quant=quant is not None, init_from=init_from,
                       out=self.cfg.out / "train" / name, resume=False, log=lambda s: None)

    def save_hf(self, model, name: str) -> Path:
        """fp32 HF checkpoint of a Megatron model (raw weights; the quantizers are not applied)."""
        from int4_qat.arch import export_hf_state_dict, write_hf_checkpoint

        out = self.cfg.out / "hf" / name
        if out.exists():
            import shutil
            shutil.rmtree(out)
        config = dict(self.arch.hf_config)
        config["torch_dtype"] = "float32"
        return write_hf_checkpoint(export_hf_state_dict(_inner(model), self.arch), out, config=config)

    def evaluate(self, model, fmt: str, method: str, *, export: bool = True, note: str = "") -> Row:
        """Training-side eval of ``model``; then export (quantized variants), reload, eval, mismatch."""
        with self.clock.stage("(part of the above) evaluate + export + reload, all rows", quiet=True):
            row = self._evaluate(_inner(model), fmt, method, export=export, note=note)
        self.rows.append(row)
        self.log(f"{fmt:>9} {method:<9} eval loss {row.eval_loss:.4f} ({row.measured_on}); "
                 f"train-side {row.train_side_loss:.4f}"
                 + (f"; mean|Δlogp| {row.mean_abs_dlogprob:.2e}" if row.mean_abs_dlogprob is not None else ""))
        gc.collect()
        return row

    def _evaluate(self, model, fmt: str, method: str, *, export: bool, note: str) -> Row:
        from int4_qat.demo.evaluate import load_served_model, megatron_logits, mismatch, served_logits
        from int4_qat.demo.stats import window_losses

        train_stats = megatron_logits(model, self.evalset)
        row = Row(format=fmt, method=method, eval_loss=train_stats.loss, measured_on="training-side",
                  train_side_loss=train_stats.loss, note=note,
                  window_losses=window_losses(train_stats.target_logprobs).tolist())
        if export:
            hf = self.save_hf(model, f"{fmt}-{method}")
            served_dir = hf
            if fmt in VARIANTS:
                from int4_qat.export import export_checkpoint

                q = VARIANTS[fmt]
                served_dir = self.cfg.out / "export" / f"{fmt}-{method}"
                export_checkpoint(str(hf), str(served_dir), fmt=q["format"],
                                  group_size=q.get("group_size"), scope=self.cfg.scope,
                                  overwrite=True, progress=False)
            served, load_note = load_served_model(served_dir)
            served_stats = served_logits(served, self.evalset)
            # the bf16-server column is a mean over tokens: BF16_MISMATCH_WINDOWS windows are plenty
            sub = self.evalset.head(BF16_MISMATCH_WINDOWS)
            bf16_stats = served_logits(served.to(torch.bfloat16), sub)
            row.bf16_mean_abs_dlogprob = mismatch(train_stats.head(BF16_MISMATCH_WINDOWS), bf16_stats,
                                                  sub)["mean_abs_dlogprob"]
            del served
            row.eval_loss, row.measured_on, row.export_dir = served_stats.loss, "export", str(served_dir)
            row.window_losses = window_losses(served_stats.target_logprobs).tolist()
            row.checkpoint_bytes = _safetensors_bytes(served_dir)[1]
            for k, v in mismatch(train_stats, served_stats, self.evalset).items():
                setattr(row, k, v)
            row.note = "; ".join(x for x in (row.note, load_note) if x)
            for ev in self.extra_evaluators:
                if not ev.accepts(fmt, method):
                    continue
                with self.clock.stage(f"(part of the above) extra evaluator {ev.name}", quiet=True):
                    wl = torch.as_tensor(ev.window_losses(served_dir, self.evalset), dtype=torch.float64)
                    if wl.shape != (self.evalset.tokens.shape[0],):
                        raise ValueError(f"extra evaluator {ev.name!r}: {tuple(wl.shape)} window "
                                         f"losses for {self.evalset.tokens.shape[0]} eval windows")
                    row.extra[ev.name] = {"loss": float(wl.mean()), "window_losses": wl.tolist()}
        return row

    # -- stages --------------------------------------------------------------------------
    def stage_train(self) -> None:
        cfg = self.cfg
        self.model_dir = write_model_config(cfg, cfg.out / "model")
        config = json.loads((self.model_dir / "config.json").read_text())
        for ev in self.extra_evaluators:     # optional hook: refuse before anything is trained
            if hasattr(ev, "check"):
                ev.check(config)
        with self.clock.stage("1. train BF16 (fp32 master weights, Megatron-Core on CPU)"):
            tr = self.trainer("bf16", None, lr=cfg.lr, steps=cfg.steps)
            self.arch = tr.arch
            from int4_qat.demo.evaluate import EvalSet

            ev = tr.eval_ds.samples[: cfg.eval_samples]
            if ev.shape[0] < 2:
                raise ValueError(f"only {ev.shape[0]} held-out window(s) of {cfg.seq_length} tokens: "
                                 f"the bootstrap needs >= 2; lower --seq-length")
            self.log(f"data: {len(tr.train_ds)} train / {len(tr.eval_ds)} held-out windows of "
                     f"{cfg.seq_length} tokens (system corpus, byte tokenizer); eval uses {ev.shape[0]}")
            # forward-only: larger batches than training amortise the per-call cost of the MoE layers
            self.evalset = EvalSet(ev[:, :-1].contiguous(), ev[:, 1:].contiguous(),
                                   batch=max(16, cfg.micro_batch))
            n_cal = cfg.calib_batches * cfg.micro_batch
            cal = tr.train_ds.samples[-n_cal:, :-1]      # training text (not the eval split)
            self.calib = [cal[i:i + cfg.micro_batch] for i in range(0, len(cal), cfg.micro_batch)]
            self.curves.append(_run_phase(tr, cfg.steps, 0, "bf16", self.clock, cfg.log_every, 0))
            self.hf_trained = self.save_hf(tr.model, "bf16-trained")
            self.evaluate(tr.model, "bf16", "trained", export=True)
            del tr

    def fresh_trained_model(self):
        from int4_qat.arch import build_model, import_hf_checkpoint

        model = build_model(self.arch, use_te=False, params_dtype=torch.float32)
        import_hf_checkpoint(model, self.arch, self.hf_trained)
        return model.eval()

    def stage_ptq(self) -> None:
        from int4_qat.recipe import QuantSection

        with self.clock.stage("2. PTQ: round-to-nearest fake quant of the trained model"):
            for name in self.cfg.formats:
                scheme = QuantSection(**VARIANTS[name], scope=self.cfg.scope).scheme()
                self.evaluate(scheme.apply(self.fresh_trained_model()), name, "ptq")

    def stage_baselines(self) -> None:
        from int4_qat.demo import baselines as B

        with self.clock.stage("3. ModelOpt baselines: INT4 AWQ-lite, FP8 E4M3 weight-only (CPU)"):
            try:
                m = B.awq_int4(self.fresh_trained_model(), self.calib, scope=self.cfg.scope, group_size=128)
                self.evaluate(m, "int4-awq", "awq", export=False,
                              note="ModelOpt INT4_AWQ_CFG (awq_lite, g128) calibrated on training "
                                   "text; training-side only (per-expert pre_quant_scale not "
                                   "foldable into the shared norm, no W4A16 export)")
            except Exception as e:  # a baseline must not sink the demo; the table says why
                self.log(f"AWQ baseline failed: {type(e).__name__}: {e}")
            try:
                m = B.fp8_weight_only(self.fresh_trained_model(), self.calib, scope=self.cfg.scope)
                self.evaluate(m, "fp8-e4m3", "ptq", export=False,
                              note="ModelOpt FP8 fake quant (num_bits=(4,3), per-channel axis 0, "
                                   "max calib) on CPU; training-side only (no FP8 exporter)")
            except Exception as e:
                self.log(f"FP8 baseline failed: {type(e).__name__}: {e}")

    def stage_continue(self) -> None:
        cfg = self.cfg
        with self.clock.stage(f"4. continue {cfg.qat_steps} steps ({cfg.qat_tokens:,} tokens): "
                              f"BF16 and QAT per format"):
            for name in ("bf16", *cfg.formats):
                quant = VARIANTS.get(name)
                tr = self.trainer(f"cont-{name}", quant, lr=cfg.qat_lr, steps=cfg.qat_steps,
                                  init_from=self.hf_trained)
                label = "bf16 continued" if quant is None else f"QAT {name}"
                self.curves.append(_run_phase(tr, cfg.qat_steps, cfg.steps, label, self.clock,
                                              cfg.log_every, cfg.steps))
                self.evaluate(tr.model, name, "continued" if quant is None else "qat")
                del tr

    def finish(self) -> DemoResult:
        from int4_qat.demo.compare import assign_deltas, headlines
        from int4_qat.demo.report import format_table, write_report

        boot = {"resamples": self.cfg.bootstrap_resamples, "seed": self.cfg.seed}
        assign_deltas(self.rows, **boot)
        order = {"bf16": 0, **{f: i + 1 for i, f in enumerate(VARIANTS)}, "int4-awq": 9, "fp8-e4m3": 10}
        morder = {"trained": 0, "continued": 1, "ptq": 2, "awq": 3, "qat": 4}
        self.rows.sort(key=lambda r: (order.get(r.format, 99), morder.get(r.method, 9)))
        sections = []
        for ev in self.extra_evaluators:     # optional hook: the evaluator's own report section
            if hasattr(ev, "section"):
                with self.clock.stage(f"5. {ev.name}: report section (tokens/s)"):
                    sec = ev.section(self.rows)
                if sec is not None:
                    sections.append(sec)
        wall = time.perf_counter() - self.clock.t0
        cfg = self.cfg
        meta = {"title": f"PTQ vs QAT on a tiny Qwen3-MoE ({cfg.layers} layers, hidden {cfg.hidden}, "
                         f"{cfg.experts} experts)",
                "settings": {"stage-1 steps": cfg.steps, "continuation steps": cfg.qat_steps,
                             "continuation tokens": f"{cfg.qat_tokens:,}",
                             "eval tokens": f"{self.evalset.num_tokens:,} (held-out documents)",
                             "scope": cfg.scope, "seq length": cfg.seq_length,
                             "global batch": cfg.global_batch, "lr / continuation lr": f"{cfg.lr} / {cfg.qat_lr}",
                             "torch threads": cfg.threads},
                "bootstrap": {**boot, "level": 0.95, "windows": self.evalset.tokens.shape[0],
                              "unit": "eval window (paired: every model on the same windows)"},
                "config": cfg.to_dict(), "wall_time_s": round(wall, 1),
                "stage_seconds": self.clock.stages, "stage_cpu_seconds": self.clock.cpu,
                "cpu_time_s": round(time.process_time() - self.clock.c0, 1),
                "versions": _versions()}
        heads = headlines(self.rows, **boot)
        paths = write_report(cfg.out, self.rows, self.curves, meta, heads, sections)
        return DemoResult(self.rows, self.curves, paths, meta, format_table(self.rows), heads, sections)


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "megatron.core", "modelopt", "compressed_tensors", "transformers", "gguf",
                "llama_cpp"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # pragma: no cover - reporting only
            out[mod] = "not importable"
    return out


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print,
             extra_evaluators: Sequence = ()) -> DemoResult:
    """Run every stage (see the module docstring) and write the report into ``cfg.out``.
    ``extra_evaluators``: :class:`int4_qat.demo.evaluate.ExtraEvaluator` objects, one table
    column each (run on every exported checkpoint they accept); ``cfg.llama_cpp`` appends the
    llama.cpp one (:class:`int4_qat.demo.llama_cpp.LlamaCppEvaluator`)."""
    torch.set_num_threads(cfg.threads)
    extra_evaluators = list(extra_evaluators)
    if cfg.llama_cpp:
        from int4_qat.demo.llama_cpp import LlamaCppEvaluator

        extra_evaluators.append(LlamaCppEvaluator(
            cfg.out, threads=cfg.threads,
            bootstrap={"resamples": cfg.bootstrap_resamples, "seed": cfg.seed}))
    import torch.distributed as dist

    if not dist.is_initialized() and "RANK" not in os.environ:
        # A free port of our own: other processes on this machine may hold Megatron's default.
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
    cfg.out.mkdir(parents=True, exist_ok=True)
    demo = _Demo(cfg, log, extra_evaluators)
    demo.log(f"int4-qat demo -> {cfg.out} | formats {', '.join(cfg.formats)} | scope {cfg.scope}")
    demo.stage_train()
    demo.stage_ptq()
    if cfg.baselines:
        demo.stage_baselines()
    demo.stage_continue()
    result = demo.finish()
    demo.log(f"done in {result.meta['wall_time_s']:.0f} s; report: {result.paths['summary.md']}")
    return result
