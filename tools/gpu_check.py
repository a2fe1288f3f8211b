#!/usr/bin/env python
"""The prepared device check: what the CPU test-suite cannot show, in one command on one GPU.

    python tools/gpu_check.py --out runs/gpu-check          # on a CUDA machine (make gpu-check)
    python tools/gpu_check.py --dry-run --out /tmp/gc       # the same code paths on a CPU

It runs, in order, and writes ``summary.json`` + ``summary.md`` (+ ``profile.txt``) under ``--out``:

1. **CUDA fake quant == CPU fake quant, bitwise**: every format (INT4 g32/g128 with both scale
   rules, MXFP4, NVFP4) on bf16 and fp32 weights, 2-D linears and 3-D expert stacks, including
   outliers and all-zero groups: ``fake_quantize`` outputs and ``quantize`` codes / scales /
   global scales compared with ``torch.equal``.
2. **Local-spec QAT steps on CUDA** for each format: ``int4_qat.train.Trainer`` on the tiny
   Qwen3-MoE recipe, bf16 params (Float16Module, distributed optimizer), Megatron's *local* layer
   spec (``use_te=False``: the device image has no Transformer-Engine), real text. Loss must be
   finite and fall; step times are reported.
3. **No host syncs from our quantizers**: one more step with ``torch.cuda.set_sync_debug_mode``
   switched to ``"warn"`` *only inside* the registered ModelOpt backend, counting the syncs our
   quantizers cause (Megatron's own, e.g. the expert token counts, are outside the window and
   not counted), under ``int4_qat.formats.finite_check("defer")`` when that API exists. A
   ``torch.profiler`` table of the same step is written to ``profile.txt``.
4. **A bf16 training checkpoint exported and verified**: the INT4 run's checkpoint goes through
   ``tools/export.py`` (scheme from its recipe.yaml) and ``int4_qat.export.train_infer_consistency``
   (the training model with fake quant vs the export loaded by transformers + compressed-tensors)
   in a subprocess (the export path is a CPU path).

Exit status 0 when every check passes, 1 otherwise. Budget: the whole check takes a few minutes on
one H200 (most of it process start-up and the CPU-side export); ``--dry-run`` takes ~4 minutes on
2 CPU cores and proves only that the code paths run (no CUDA comparison, no sync count). Never run
by CI (``make test`` does not call it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

FORMATS = [("int4", 32, "amax/7"), ("int4", 128, "amax/7.5"), ("mxfp4", None, None), ("nvfp4", None, None)]


def env_report(device: str) -> dict:
    import importlib.metadata as md

    import torch

    out = {"device": device, "torch": torch.__version__}
    for pkg in ("megatron-core", "nvidia-modelopt", "compressed-tensors", "transformers",
                "transformer-engine"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _weights(shape, dtype, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1, shape[-1])[0, :64] = 0.0                       # all-zero groups
    w.view(-1)[7::997] *= 40.0                                # outliers
    return w.to(dtype)


def fake_quant_parity(device: str) -> list[dict]:
    """Rows ``{format, group, rule, dtype, shape, fake_quant_equal, quantize_equal}``."""
    import torch

    from int4_qat.formats import get_format

    rows = []
    for fmt, group, rule in FORMATS:
        mod = get_format(fmt)
        kw = {"scale_rule": rule} if rule else {}
        g = group or mod.DEFAULT_GROUP_SIZE
        for dtype in (torch.bfloat16, torch.float32):
            for shape in ((256, 1024), (8, 256, 384)):
                w = _weights(shape, dtype, seed=len(rows))
                ref_fq = mod.fake_quantize(w, g, **kw)
                ref_q = mod.quantize(w, g, **kw)
                dev = "cpu" if device == "cpu" else "cuda"
                fq = mod.fake_quantize(w.to(dev), g, **kw).cpu()
                q = mod.quantize(w.to(dev), g, **kw)
                q_eq = all(
                    (a is None and b is None) or torch.equal(a, b.cpu())
                    for a, b in ((ref_q.codes, q.codes), (ref_q.scale, q.scale),
                                 (ref_q.global_scale, q.global_scale)))
                rows.append({"format": fmt, "group": g, "rule": rule, "dtype": str(dtype).split(".")[-1],
                             "shape": list(shape), "fake_quant_equal": bool(torch.equal(ref_fq, fq)),
                             "quantize_equal": bool(q_eq)})
    return rows


def _corpus(out: Path) -> str:
    from int4_qat import data as D

    p = out / "docs.jsonl"
    with open(p, "w") as f:
        for d in D.system_corpus(max_docs=300):
            f.write(json.dumps({"text": d}) + "\n")
    return str(p)


class _SyncCounter:
    """Switches CUDA sync debugging on only inside our ModelOpt backend and counts the syncs."""

    def __init__(self):
        self.syncs, self.calls, self.messages = 0, 0, []

    def __enter__(self):
        from modelopt.torch.quantization.nn.modules.tensor_quantizer import _QUANT_FUNCTIONAL_BACKENDS

        from int4_qat.modelopt_backend import BACKEND_NAME

        self._table, self._name = _QUANT_FUNCTIONAL_BACKENDS, BACKEND_NAME
        self._orig = _QUANT_FUNCTIONAL_BACKENDS[BACKEND_NAME]

        def counted(inputs, quantizer):
            import torch

            self.calls += 1
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return self._orig(inputs, quantizer)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    hits = [str(x.message) for x in seen if "synchroniz" in str(x.message)]
                    self.syncs += len(hits)
                    self.messages += hits[:1]

        self._table[BACKEND_NAME] = counted
        return self

    def __exit__(self, *exc):
        self._table[self._name] = self._orig
        return False


def _megatron_without_te() -> None:
    """megatron/core/transformer/moe/moe_utils.py:22-39 binds ``te_general_gemm`` only when
    Transformer-Engine imports, and ``RouterGatingLinearFunction`` (:1192, :1225) reads it: a
    NameError for any fp32 router without TE. The device image has no TE, so bind it to None (the
    plain ``torch.mm`` branch), as ``int4_qat.compat.cpu`` does on CPU (that module must not be
    activated in a CUDA run). Production GPU runs have TE and never reach this."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def qat_steps(device: str, corpus: str, out: Path, steps: int) -> list[dict]:
    """Local-spec QAT on ``device`` for each format; the INT4 g32 run saves a checkpoint."""
    import contextlib

    import torch

    if device == "cuda":
        _megatron_without_te()

    import _dist_worker as W
    from int4_qat.recipe import Recipe
    from int4_qat.train import Trainer

    rows = []
    for fmt, group, rule in FORMATS:
        r = W.tiny_recipe("tiny-qwen3-moe", data=[corpus], fmt=fmt, group=group, steps=steps + 1,
                          precision="bf16" if device == "cuda" else "fp32", warmup_steps=1)
        if rule:
            d = r.to_dict()
            d["quant"]["scale_rule"] = rule
            r = Recipe.from_dict(d)
        tr = Trainer(r, cpu=device == "cpu", use_te=False, out=out / f"run-{fmt}-{group}", resume=False,
                     log=lambda s: None)
        ms = [tr.train_step() for _ in range(steps)]
        row = {"format": fmt, "group": group or "-", "rule": rule or "-",
               "losses": [round(m["loss"], 4) for m in ms],
               "step_ms": round(1e3 * sorted(m["step_time"] for m in ms[1:])[len(ms[1:]) // 2], 1)}
        # one more step: sync count inside our quantizers (+ a profiler table of that step)
        if device == "cuda":
            import int4_qat.formats as F

            defer = F.finite_check("defer") if hasattr(F, "finite_check") else contextlib.nullcontext()
            row["finite_check"] = "defer" if hasattr(F, "finite_check") else "immediate (no deferred API)"
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, \
                    _SyncCounter() as sc, defer:
                m = tr.train_step()
                torch.cuda.synchronize()
            if hasattr(F, "raise_if_nonfinite"):
                F.raise_if_nonfinite()
            row.update(quantizer_calls=sc.calls, quantizer_syncs=sc.syncs, sync_example=sc.messages[:1])
            (out / f"profile-{fmt}-{group}.txt").write_text(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        else:
            m = tr.train_step()
        row["losses"].append(round(m["loss"], 4))
        row["finite_and_falling"] = all(math.isfinite(x) for x in row["losses"]) and \
            row["losses"][-1] < row["losses"][0]
        if fmt == "int4" and group == 32:
            row["checkpoint"] = str(tr.save())
        rows.append(row)
    return rows


def verify_export(ckpt: str, export_dir: str) -> dict:
    """(subprocess, CPU) tools/export.py on the checkpoint, then train-infer consistency."""

    from int4_qat.checkpoint import load_model_for_export
    from int4_qat.export.consistency import train_infer_consistency

    rc = subprocess.call([sys.executable, str(REPO / "tools" / "export.py"), "--input", ckpt,
                          "--output", export_dir, "--no-progress"], cwd=REPO)
    if rc:
        return {"ok": False, "error": f"tools/export.py exited {rc}"}
    model, arch, recipe = load_model_for_export(ckpt)
    from int4_qat import data as D

    tok = D.load_tokenizer(None, arch.vocab_size)
    ds, _ = D.build_datasets([str(x) for x in recipe.train.data_paths()], tok, 32, 0.0, 0)
    tokens, _ = ds.batch([0, 1])
    rep = train_infer_consistency(model, export_dir, tokens)
    ok = rep.top1_agree == 1.0 and rep.mean_abs_dlogprob < 1e-4
    return {"ok": bool(ok), "report": str(rep)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu-check"))
    ap.add_argument("--steps", type=int, default=6, help="QAT steps per format (default 6)")
    ap.add_argument("--dry-run", action="store_true", help="run the code paths on the CPU")
    ap.add_argument("--verify-export", nargs=2, metavar=("CKPT", "EXPORT_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if a.verify_export:
        res = verify_export(*a.verify_export)
        print(json.dumps(res))
        return 0 if res["ok"] else 1
    import torch

    device = "cpu" if a.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here, tools/gpu_check.py; fix: run it on a GPU machine, or "
              "--dry-run for the CPU code paths", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = {"env": env_report(device), "dry_run": a.dry_run}
    print(f"[gpu_check] {summary['env']}", flush=True)
    summary["fake_quant_parity"] = fake_quant_parity(device)
    print(
        "[gpu_check] fake quant parity: "
        f"{sum(r['fake_quant_equal'] and r['quantize_equal'] for r in summary['fake_quant_parity'])}"
        f"/{len(summary['fake_quant_parity'])} equal ({time.time() - t0:.0f} s)",
        flush=True,
    )
    summary["qat"] = qat_steps(device, _corpus(out), out, a.steps)
    for r in summary["qat"]:
        print(
            f"[gpu_check] QAT {r['format']} g{r['group']}: losses {r['losses']} step {r['step_ms']} ms "
            f"syncs in quantizers: {r.get('quantizer_syncs', 'n/a')}",
            flush=True,
        )
    ckpt = next(r["checkpoint"] for r in summary["qat"] if "checkpoint" in r)
    p = subprocess.run(
        [sys.executable, __file__, "--verify-export", ckpt, str(out / "export-int4")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
    summary["export"] = json.loads(line) if line else {"ok": False, "error": p.stderr[-2000:]}
    print(f"[gpu_check] export + verify: {summary['export']}", flush=True)
    checks = {
        "fake_quant_parity": all(r["fake_quant_equal"] and r["quantize_equal"] for r in summary["fake_quant_parity"]),
        "qat_steps": all(r["finite_and_falling"] for r in summary["qat"]),
        "no_quantizer_syncs": None if a.dry_run else all(r["quantizer_syncs"] == 0 for r in summary["qat"]),
        "export_verified": summary["export"]["ok"],
    }
    summary["checks"], summary["seconds"] = checks, round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = [
        f"# gpu_check ({'CPU dry run' if a.dry_run else summary['env'].get('gpu')}, {summary['seconds']} s)",
        "",
        "| check | result |",
        "|---|---|",
    ]
    md += [f"| {k} | {'n/a (dry run)' if v is None else ('PASS' if v else 'FAIL')} |" for k, v in checks.items()]
    md += ["", "| format | group | rule | losses | step ms | quantizer syncs |", "|---|---|---|---|---|---|"]
    md += [
        f"| {r['format']} | {r['group']} | {r['rule']} | {r['losses']} | {r['step_ms']} | "
        f"{r.get('quantizer_syncs', 'n/a')} |"
        for r in summary["qat"]
    ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if all(v is not False for v in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
