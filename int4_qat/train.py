"""Quantization-aware training on Megatron-Core: ``python -m int4_qat.train --recipe R``.

Run it::

    # one CPU process (the tiny recipe; fp32, gloo)
    python -m int4_qat.train --recipe recipes/tiny-moe.yaml --cpu --steps 40
    # one node, N GPUs (tp × pp × dp == N; experts folded with ep × etp)
    torchrun --nproc-per-node 8 -m int4_qat.train --recipe recipes/qwen3-30b-a3b-int4.yaml
    # the BF16 baseline of the same recipe, and QAT initialised from it
    python -m int4_qat.train --recipe R --no-quant --out runs/r-bf16
    python -m int4_qat.train --recipe R --init-from runs/r-bf16/ckpt

What one run does, in order (each step is a library call, see :func:`train`):

1. ``int4_qat.parallel.init_parallel``: process group (gloo on CPU with ``int4_qat.compat.cpu``
   activated, NCCL on GPU) and Megatron ``parallel_state`` for tp/pp/ep/etp.
2. ``validate_layout`` with the architecture and the scheme (before anything is built).
3. ``int4_qat.arch.build_model`` (local spec on CPU, Transformer-Engine spec on GPU), then
   weights: ``--init-from`` (our checkpoint or an HF dir) or the recipe's ``model.checkpoint``.
4. ``scheme.apply(model)``: ModelOpt inserts weight quantizers whose forward is the project's
   fake quant (INT4 / MXFP4 / NVFP4, straight-through backward). ``--no-quant`` skips it.
5. Megatron ``DistributedDataParallel`` (fp32 grad buffers), ``get_megatron_optimizer`` (Adam,
   grad clipping; on GPU bf16 params with fp32 main params in the distributed optimizer, on CPU
   fp32 and the plain optimizer) and
   ``OptimizerParamScheduler`` (linear warmup from lr/(warmup+1), cosine to ``min_lr``).
6. Resume from ``checkpoint_dir/latest`` if it exists (model, optimizer, scheduler, RNG, data
   position), else start at step 0. Whether the checkpoint may be resumed with this recipe is
   decided first, before anything is built (:mod:`int4_qat.resume`: a changed quant scheme,
   architecture or data order is refused; the schedule may change and is then really used), and
   its files are verified against their checksums (:mod:`int4_qat.checksums`).
7. Each step: ``get_forward_backward_func()`` runs ``global_batch / (micro_batch · dp)``
   micro-batches through the (pipeline) schedule, the optimizer steps, the scheduler advances.
   Rank 0 logs loss, grad norm, lr and tokens/s every ``log_interval`` (tqdm bar when the
   terminal is interactive) and appends them to ``<out>/metrics.jsonl``; the held-out loss is
   measured every ``eval_interval``; a checkpoint is saved every ``save_interval`` and at the end.

On error the command prints one line (``int4_qat.train: error: ...``, rank 0 only) and exits 2
for bad input, 1 for a non-finite loss; ``--debug`` adds the stack (``int4_qat.cli``).

The loss is the mean next-token cross entropy over the global batch (every token counts once,
whatever the micro-batching or data parallelism), so runs at different layouts are comparable
step by step.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from int4_qat import checkpoint as ckpt
from int4_qat import data as D
from int4_qat.formats import finite_check, raise_if_nonfinite
from int4_qat.parallel import dist_env, init_parallel, megatron_layout_kwargs, validate_layout
from int4_qat.resume import check_resume, check_resume_data, data_fingerprint

__all__ = ["TrainResult", "Trainer", "train", "main", "cli", "parse_args"]


@dataclass
class TrainResult:
    """What a run measured (identical on every rank; rank 0 also wrote metrics.jsonl)."""
    losses: list[float] = field(default_factory=list)        # one per step run in this process
    steps: list[int] = field(default_factory=list)           # the 1-based step numbers of losses
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)    # seconds, forward+backward+update
    eval_losses: dict[int, float] = field(default_factory=dict)   # step -> held-out loss
    tokens_per_s: float = 0.0                                 # mean over the steps run here
    checkpoint: Path | None = None                            # last checkpoint written
    start_step: int = 0                                       # >0 when resumed
    final_step: int = 0
    quantized: bool = True
    trainer: "Trainer | None" = field(default=None, repr=False)   # in-process callers inspect it


def _is_cpu(cpu: bool | None) -> bool:
    return (not torch.cuda.is_available()) if cpu is None else cpu


class Trainer:
    """Holds one run's model / optimizer / data; :func:`train` drives it. Usable in-process
    (tests and the demo build one, step it, read ``model``)."""

    def __init__(self, recipe, *, cpu: bool | None = None, quant: bool = True,
                 init_from: str | Path | None = None, out: str | Path | None = None,
                 resume: bool = True, log: Callable[[str], None] | None = None,
                 use_te: bool | None = None):
        self.recipe, self.cpu, self.quant = recipe, _is_cpu(cpu), quant
        # the layer spec: Transformer-Engine on GPU by default; use_te=False runs Megatron's local
        # spec on CUDA too (tools/gpu_check.py on a machine without TE)
        self.use_te = (not self.cpu) if use_te is None else use_te
        self.log_fn = log or print
        t = recipe.train
        self.out = Path(out) if out is not None else Path(t.checkpoint_dir).parent
        self.ckpt_dir = self.out / "ckpt" if out is not None else Path(t.checkpoint_dir)
        self.dtype = torch.float32 if (self.cpu or t.precision.value == "fp32") else torch.bfloat16

        # 1. layout rules first (pure: fails before any process group exists), 2. process groups
        from int4_qat.arch import build_model, import_hf_checkpoint, load_arch

        self.arch = load_arch(recipe.model.config_json().parent)
        self.scheme = recipe.quant.scheme() if quant else None
        world = dist.get_world_size() if dist.is_initialized() else dist_env().world_size
        validate_layout(recipe.parallel, world, self.arch, self.scheme, train=t, cpu=self.cpu)
        # resume or start: decided (and a resume checked against this recipe) before anything is built
        self.resume_dir = ckpt.find_latest(self.ckpt_dir) if resume else None
        if self.resume_dir is not None:
            if init_from is not None:
                raise ValueError(
                    f"--init-from {init_from}: {self.ckpt_dir} already holds a run (latest "
                    f"{self.resume_dir.name}) that this run would resume, ignoring --init-from; fix: "
                    f"--out NEW_DIR for a new run initialised from {init_from}, or --no-resume to start "
                    f"over in {self.ckpt_dir}")
            check_resume(self.resume_dir, recipe, quant)
        self.env = init_parallel(recipe.parallel, cpu=self.cpu, seed=t.seed)
        from megatron.core import parallel_state as ps

        if self.cpu:
            from int4_qat.compat import cpu as compat_cpu

            compat_cpu.activate_training(force=torch.cuda.is_available())
        self.rank = dist.get_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # Megatron keeps the MoE aux-loss backward scale in a class attribute and copy_()s into it
        # (moe_utils.py MoEAuxLossAutoScaler.set_loss_scale): a second run in the same process
        # (the demo, tests) would inherit the first run's tensor and its shape. Start each run clean.
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.main_loss_backward_scale = None

        # data (before the model: cheap, and a resumed run must see the data it was trained on)
        tok = D.load_tokenizer(recipe.model.tokenizer, self.arch.vocab_size)
        self.train_ds, self.eval_ds = D.build_datasets(
            [str(p) for p in t.data_paths()], tok, t.seq_length, t.eval_fraction, t.seed)
        self.data_id = data_fingerprint(self.train_ds, self.eval_ds)
        if self.resume_dir is not None:
            check_resume_data(self.resume_dir, self.data_id)
        self.sampler = D.BatchSampler(len(self.train_ds), t.global_batch, t.micro_batch,
                                      self.dp_rank, self.dp_size, seed=t.seed)
        self.eval_sampler = None
        if self.eval_ds is not None and t.eval_iters > 0:
            gb = min(t.global_batch, len(self.eval_ds) // (t.micro_batch * self.dp_size)
                     * t.micro_batch * self.dp_size)
            if gb > 0:
                self.eval_sampler = D.BatchSampler(len(self.eval_ds), gb, t.micro_batch,
                                                   self.dp_rank, self.dp_size, shuffle=False)

        # 3. model + weights (a resumed run takes them from its checkpoint, step 6)
        model = build_model(self.arch, use_te=self.use_te, params_dtype=self.dtype,
                            sequence_parallel=recipe.parallel.sequence_parallel,
                            config_overrides=megatron_layout_kwargs(recipe.parallel))
        if not self.cpu:
            model = model.cuda()      # the local spec initialises on the CPU (same weights at any TP)
        src = init_from if init_from is not None else recipe.model.checkpoint
        if self.resume_dir is not None:
            src = None
        self.init_source, ckpt_dir = None, None
        if src is not None:
            p = Path(src)
            if not p.exists():
                raise ckpt.CheckpointError(
                    f"{'--init-from' if init_from is not None else 'model.checkpoint'}: {p} does not exist; "
                    f"fix: give an HF model dir or one of our checkpoint dirs (ckpt/ or ckpt/iter_*)")
            if (p / "config.json").is_file() and not (p / ckpt.TRAIN_STATE).exists() \
                    and not (p / ckpt.LATEST).exists():
                import_hf_checkpoint(model, self.arch, p)
                self.init_source = f"hf:{p}"
            else:
                ckpt_dir = ckpt.resolve_checkpoint(p)
        # A BF16 checkpoint is loaded before fake quant is inserted, a QAT one after: ModelOpt
        # re-keys the routed experts' sharded state (one entry per expert), so each checkpoint
        # kind only matches the model in the state it was saved from.
        ckpt_quantized = ckpt_dir is not None and ckpt.read_train_state(ckpt_dir).get("quantized", False)
        if ckpt_dir is not None and not ckpt_quantized:
            self.init_source = f"ckpt:{ckpt.load_model_weights(model, ckpt_dir, log=self.log)}"
        # 4. fake quant
        if quant:
            model = self.scheme.apply(model)
        if ckpt_dir is not None and ckpt_quantized:
            if not quant:
                raise ValueError(f"--init-from {ckpt_dir}: a QAT checkpoint cannot initialise a --no-quant "
                                 f"run here; export it to HF (tools/export.py) or drop --no-quant")
            self.init_source = f"ckpt:{ckpt.load_model_weights(model, ckpt_dir, log=self.log)}"
        # 5. DDP, optimizer, scheduler
        self.model = self._wrap_ddp(model)
        self.optimizer, self.scheduler = self._build_optimizer()
        self._hook_config()

        self._mask = None
        if self.cpu:
            from int4_qat.compat.cpu import causal_attention_mask

            self._mask = causal_attention_mask(t.seq_length)

        # 6. resume
        self.step = 0
        if self.resume_dir is not None:
            # the optimizer state restores each param group's max_lr / min_lr from the checkpoint;
            # keep this recipe's (see int4_qat/resume.py: the schedule may change on resume)
            fresh = [{k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in self.optimizer.param_groups]
            st = ckpt.load_checkpoint(self.resume_dir, self.model, self.optimizer, self.scheduler, log=self.log)
            for g, f in zip(self.optimizer.param_groups, fresh, strict=True):
                g.update(f)
            self.scheduler.step(increment=0)
            self.step = st["step"]
            self.init_source = ckpt.read_train_state(st["iter_dir"]).get("init_source")
            if st["consumed_samples"] != self.sampler.consumed_samples(self.step):
                raise ValueError(
                    f"{st['iter_dir']}: {st['consumed_samples']} samples consumed in {self.step} steps, "
                    f"but train.global_batch={t.global_batch} would have consumed "
                    f"{self.sampler.consumed_samples(self.step)}; resume with the global batch the "
                    f"checkpoint was trained with, or start fresh with --init-from")
            self.log(f"resumed from {st['iter_dir']} at step {self.step}")

    # ------------------------------------------------------------------ construction helpers
    def _wrap_ddp(self, model):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        cfg = model.config
        if self.dtype == torch.bfloat16:
            model = Float16Module(cfg, model)
        # GPU: Megatron's distributed optimizer (fp32 main params and Adam moments sharded over
        # DP, what large-MoE recipes need). CPU: the plain optimizer — the distributed one
        # reduce-scatters, which gloo does not implement.
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=not self.cpu, check_for_nan_in_grad=True)
        return DistributedDataParallel(cfg, ddp_cfg, model)

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = self.recipe.train
        ocfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=t.grad_clip,
            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=not self.cpu)
        opt = get_megatron_optimizer(ocfg, [self.model])
        warm = t.warmup_steps
        sched = OptimizerParamScheduler(
            opt, init_lr=t.lr / (warm + 1) if warm else t.lr, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=warm, lr_decay_steps=max(t.steps, warm + 1), lr_decay_style="cosine",
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps,
            wd_incr_style="constant",
            # on resume, use THIS recipe's schedule (Megatron's default keeps the checkpoint's
            # values silently, while the new recipe.yaml would claim these; int4_qat/resume.py)
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
        return opt, sched

    def _hook_config(self):
        # What Megatron-LM's training.py wires into the config before the first schedule call.
        from megatron.core.distributed import finalize_model_grads

        cfg = self.model.config
        cfg.grad_scale_func = self.optimizer.scale_loss
        cfg.no_sync_func = self.model.no_sync
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.timers = None

    def log(self, msg: str) -> None:
        if self.rank == 0:
            self.log_fn(msg)

    # ------------------------------------------------------------------ one step
    def _batches(self, ds, microbatches) -> Iterator[dict]:
        return D.iter_batches(ds, microbatches)

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, labels = batch["tokens"], batch["labels"]
        if not self.cpu:
            tokens, labels = tokens.cuda(non_blocking=True), labels.cuda(non_blocking=True)
        b, s = tokens.shape
        pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        out = model(tokens, pos, self._mask, labels=labels)   # per-token CE [b, s] on the last stage
        return out, partial(self._loss_func, labels.numel())

    @staticmethod
    def _loss_func(num_tokens: int, per_token):
        loss = per_token.float().sum() / num_tokens
        # clone: the schedule divides the returned loss in place by the micro-batch count
        return loss, {"lm loss": loss.detach().clone()}

    def _run_schedule(self, ds, microbatches, forward_only: bool) -> float:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from int4_qat.modelopt_backend import fake_quant_cache

        t = self.recipe.train
        # the weights do not change inside one schedule call: each weight is fake-quantized once
        # for all its micro-batches (int4_qat.modelopt_backend.fake_quant_cache)
        with fake_quant_cache():
            out = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=self._batches(ds, microbatches),
                model=[self.model], num_microbatches=len(microbatches), seq_length=t.seq_length,
                micro_batch_size=t.micro_batch, forward_only=forward_only)
        # mean over micro-batches here, then over data-parallel ranks; broadcast from the last
        # pipeline stage (the only one that computes the loss) so every rank returns the number
        dev = "cpu" if self.cpu else torch.cuda.current_device()
        val = torch.zeros(1, dtype=torch.float64, device=dev)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and out:
            val[0] = sum(float(d["lm loss"]) for d in out) / len(out)
        dist.all_reduce(val, group=ps.get_data_parallel_group())
        val /= self.dp_size
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(val, src=last, group=ps.get_pipeline_model_parallel_group())
        return float(val[0])

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; returns its metrics."""
        t0 = time.perf_counter()
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = self.sampler.microbatches(self.step)
        with finite_check("defer"):  # fake quant flags NaN/Inf weights on the device, no sync each
            try:
                loss = self._run_schedule(self.train_ds, mbs, forward_only=False)
            finally:  # once per step (the loss is fetched anyway); names the weights, also when
                raise_if_nonfinite()  # Megatron's NaN-gradient check fired first
        ok, grad_norm, _ = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if ok:
            self.scheduler.step(increment=1)
        self.step += 1
        dt = time.perf_counter() - t0
        t = self.recipe.train
        return {"step": self.step, "loss": loss, "grad_norm": float(grad_norm or 0.0), "lr": lr,
                "step_time": dt, "tokens_per_s": t.global_batch * t.seq_length / dt, "skipped": not ok}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean held-out loss over ``eval_iters`` batches (the same batches every time)."""
        if self.eval_sampler is None:
            return None
        self.model.eval()
        iters = self.recipe.train.eval_iters
        losses = [self._run_schedule(self.eval_ds, self.eval_sampler.microbatches(i), True)
                  for i in range(iters)]
        self.model.train()
        return sum(losses) / len(losses)

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
            consumed_samples=self.sampler.consumed_samples(self.step), recipe=self.recipe,
            extra={"quant": self.scheme.to_dict() if self.scheme is not None else None,
                   "layout": {k: getattr(self.recipe.parallel, k) for k in ("tp", "pp", "ep", "etp", "dp")},
                   "data": self.data_id, "init_source": self.init_source})


def train(recipe, *, steps: int | None = None, cpu: bool | None = None, out: str | Path | None = None,
          quant: bool = True, init_from: str | Path | None = None, resume: bool = True,
          stop_after: int | None = None, save: bool = True, progress: bool | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``recipe`` (a :class:`int4_qat.recipe.Recipe`) and return what was measured.

    ``steps`` overrides ``train.steps`` (the schedule length); ``stop_after`` ends this process
    after that global step (the checkpoint is saved, as an interruption would) so a later call
    resumes; ``save=False`` writes no checkpoint at all. ``progress=None``: a tqdm bar when
    stderr is a terminal.
    """
    if steps is not None:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"steps": steps})})
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {stop_after}")
    trainer = Trainer(recipe, cpu=cpu, quant=quant, init_from=init_from, out=out, resume=resume, log=log)
    t = recipe.train
    end = t.steps if stop_after is None else min(stop_after, t.steps)
    if stop_after is not None and stop_after <= trainer.step:
        raise ValueError(f"--stop-after {stop_after}: the run resumed at step {trainer.step} "
                         f"({trainer.resume_dir}), so there is nothing to do; fix: a later step, or "
                         f"--no-resume / --out NEW_DIR for a new run")
    if trainer.step >= end:
        trainer.log(f"nothing to do: {trainer.resume_dir} is at step {trainer.step} and train.steps is "
                    f"{t.steps}; raise --steps (or train.steps) to train longer")
    res = TrainResult(start_step=trainer.step, quantized=quant)
    trainer.log(f"{recipe.name}: {'QAT ' + trainer.scheme.describe() if quant else 'BF16 baseline (no quant)'}"
                f" | world {trainer.env.world_size} | {len(trainer.train_ds)} train / "
                f"{len(trainer.eval_ds) if trainer.eval_ds else 0} eval samples of {t.seq_length} tokens"
                f" | steps {trainer.step}->{end}" + (f" | init {trainer.init_source}" if trainer.init_source else ""))
    metrics_f = None
    if trainer.rank == 0:
        trainer.out.mkdir(parents=True, exist_ok=True)
        # a fresh run starts a new file; a resumed one appends to its own history
        metrics_f = open(trainer.out / "metrics.jsonl", "a" if trainer.step > 0 else "w")
    bar = None
    if trainer.rank == 0 and (progress if progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=end, initial=trainer.step, desc=recipe.name, unit="step")
    try:
        while trainer.step < end:
            m = trainer.train_step()
            for key, series in (("step", res.steps), ("loss", res.losses), ("grad_norm", res.grad_norms),
                                ("lr", res.lrs), ("step_time", res.step_times)):
                series.append(m[key])
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"step {m['step']}: loss is {m['loss']}")
            s = m["step"]
            if s % t.eval_interval == 0 or s == end:
                ev = trainer.evaluate()
                if ev is not None:
                    res.eval_losses[s] = ev
                    m["eval_loss"] = ev
            if metrics_f is not None:
                metrics_f.write(json.dumps({**m, "quantized": quant}) + "\n")
                metrics_f.flush()
            if s % t.log_interval == 0 or s == end:
                line = (f"step {s}/{t.steps} | loss {m['loss']:.4f} | grad_norm {m['grad_norm']:.3f} | "
                        f"lr {m['lr']:.2e} | {m['tokens_per_s']:.0f} tok/s"
                        + (f" | eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
                if bar is not None:
                    bar.set_postfix_str(line.split(" | ", 1)[1])
                    bar.update(s - bar.n)
                else:
                    trainer.log(line)
            if save and (s % t.save_interval == 0 or s == end):
                res.checkpoint = trainer.save()
    finally:
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()
    res.final_step = trainer.step
    if res.step_times:
        tok = t.global_batch * t.seq_length * len(res.step_times)
        res.tokens_per_s = tok / sum(res.step_times)
    res.trainer = trainer
    return res


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from int4_qat.cli import add_debug_flag, positive_int

    p = argparse.ArgumentParser(prog="python -m int4_qat.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="recipes/<name>.yaml")
    p.add_argument("--steps", type=positive_int, help="override train.steps")
    p.add_argument("--cpu", action="store_true", help="CPU run: gloo, fp32, int4_qat.compat.cpu shims")
    p.add_argument("--out", help="run directory (checkpoints in OUT/ckpt, metrics in OUT/metrics.jsonl)")
    p.add_argument("--no-quant", action="store_true", help="BF16 baseline: no fake quantization")
    p.add_argument("--init-from", help="our checkpoint dir (iter_* or with 'latest') or an HF model dir")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint_dir/latest")
    p.add_argument("--stop-after", type=positive_int, help="stop (with a checkpoint) after this global step")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    from int4_qat.recipe import Recipe

    a = parse_args(argv)
    recipe = Recipe.load(a.recipe)
    res = train(recipe, steps=a.steps, cpu=True if a.cpu else None, out=a.out, quant=not a.no_quant,
                init_from=a.init_from, resume=not a.no_resume, stop_after=a.stop_after)
    if dist.get_rank() == 0:
        ev = f", last eval {list(res.eval_losses.values())[-1]:.4f}" if res.eval_losses else ""
        print(f"done: steps {res.start_step}->{res.final_step}, last loss "
              f"{res.losses[-1] if res.losses else float('nan'):.4f}{ev}, {res.tokens_per_s:.0f} tok/s, "
              f"checkpoint {res.checkpoint}")
    return res


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main` under ``int4_qat.cli.run_cli`` (one line, exit 2 / 1, rank 0
    prints, torchrun's error file filled in)."""
    from int4_qat.cli import run_cli

    def run() -> int:
        main(argv)
        return 0

    return run_cli(run, "int4_qat.train", argv, distributed=True)


if __name__ == "__main__":
    sys.exit(cli())
