#!/usr/bin/env python
"""Training-checkpoint export at growing model size: peak RSS per process and throughput, side by
side with a plain copy of the same files, 1 vs 2 processes.

    python bench/bench_export_ckpt.py                       # 0.5, 1, 2, 4 GB
    python bench/bench_export_ckpt.py --sizes 0.5,1 --rounds 3 --format nvfp4

For each size a synthetic Qwen3-MoE-shaped BF16 training checkpoint is written
(``int4_qat.testing.synthetic_checkpoint``: the sharded-state keys a QAT run saves, one DCP
``.distcp`` file; hidden 2048, 16 experts of intermediate 768, vocab 32768 -- more layers for a
larger model, so the largest tensor stays the same 134 MB embedding). Then, in **interleaved
rounds** (copy, export x1, export x2, copy, ...; the best round of each is reported), each method
runs in fresh child processes:

``copy``        ``shutil.copyfile`` + fsync of every file of the iteration dir (the I/O ceiling);
``export x1``   ``int4_qat.export.export_checkpoint`` in one process;
``export x2``   the same under ``torchrun --nproc-per-node 2`` (each rank writes its own shards;
                ``--max-shard-size`` keeps several shards so both ranks have work).

Each child reports its RSS after imports and a planning pass (and, under torchrun, after the
process group exists),
its peak RSS (``VmHWM``) and the time of the work itself (process start-up and gloo rendezvous
are excluded: they are a constant of the machine, several seconds here). Throughput = GB of
checkpoint model bytes / s. "(peak - imports) / largest" relates each process's working memory to
the largest tensor of the model; it must stay flat as the model grows. "planner GB/proc" is
``int4_qat.planner.export_plan`` for the same model (what ``tools/plan_memory.py`` states for a
recipe), to check the formula against the measurement.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

HIDDEN, INTER, EXPERTS, HEADS, KV, HEAD_DIM, VOCAB = 2048, 768, 16, 16, 4, 128, 32768


def _config(layers: int) -> dict:
    from int4_qat.testing import tiny_config

    cfg = tiny_config(hidden_size=HIDDEN, moe_intermediate_size=INTER, intermediate_size=4 * HIDDEN,
               num_experts=EXPERTS, num_experts_per_tok=4, num_attention_heads=HEADS,
               num_key_value_heads=KV, head_dim=HEAD_DIM, vocab_size=VOCAB, num_hidden_layers=layers,
               max_window_layers=layers, max_position_embeddings=4096)
    return cfg


def _layers_for(size_gb: float) -> int:
    layer = 2 * (EXPERTS * 3 * HIDDEN * INTER + HIDDEN * (HEADS + 2 * KV) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN)
    return max(1, round((size_gb * 1e9 - 2 * 2 * VOCAB * HIDDEN) / layer))


def _recipe_yaml(fmt: str) -> str:
    from int4_qat.recipe import Recipe

    d = Recipe.load(os.path.join(REPO, "recipes", "tiny-moe.yaml")).to_dict()
    d["quant"] = {"format": fmt, "group_size": 128 if fmt == "int4" else None, "scope": "experts",
                  "scale_rule": "amax/7" if fmt == "int4" else None}
    d["export"]["formats"] = [fmt]
    return Recipe.from_dict(d).to_yaml()


def _status() -> dict:
    d = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


# ------------------------------------------------------------------ children
def child(args) -> None:
    if args.child == "make":
        from int4_qat.testing import synthetic_checkpoint

        synthetic_checkpoint(_config(args.layers), args.src, recipe_yaml=_recipe_yaml(args.format))
        return
    if args.child == "copy":
        rss0 = _status()["VmRSS"]
        t0 = time.perf_counter()
        it = os.path.join(args.src, "iter_0000001")
        os.makedirs(args.dst)
        for fn in os.listdir(it):
            shutil.copyfile(os.path.join(it, fn), os.path.join(args.dst, fn))
            with open(os.path.join(args.dst, fn), "rb+") as f:
                os.fsync(f.fileno())
        dt = time.perf_counter() - t0
    else:  # export, in this process or as one torchrun rank
        import int4_qat.export.megatron_source  # noqa: F401  (imports before the clock)
        from int4_qat.export import export_checkpoint
        from int4_qat.export.procs import ExportProcs

        procs = ExportProcs.from_env()
        # plan once (imports every lazily imported module, metadata read) so RSS after it is the
        # fixed cost; the export below re-reads the metadata as a real run does
        export_checkpoint(args.src, args.dst, progress=False, check_only=True, max_shard_bytes=args.shard_bytes)
        procs.barrier()
        rss0 = _status()["VmRSS"]
        t0 = time.perf_counter()
        export_checkpoint(args.src, args.dst, progress=False, procs=procs, max_shard_bytes=args.shard_bytes)
        dt = time.perf_counter() - t0
    out = {"seconds": dt, "rss_imports": rss0, "peak_rss": _status()["VmHWM"]}
    rank = os.environ.get("RANK", "0")
    with open(f"{args.report}.{rank}", "w") as f:
        json.dump(out, f)


def _run(method: str, src: str, dst: str, args, report: str) -> list[dict]:
    me = os.path.abspath(__file__)
    common = [
        "--child",
        "export" if method == "export2" else method,
        "--src",
        src,
        "--dst",
        dst,
        "--report",
        report,
        "--format",
        args.format,
        "--shard-bytes",
        str(args.shard_bytes),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if method == "export2":
        from int4_qat.parallel import free_port

        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            me,
            *common,
        ]
    else:
        cmd = [sys.executable, me, *common]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{method} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    ranks = sorted(f for f in os.listdir(os.path.dirname(report)) if f.startswith(os.path.basename(report) + "."))
    out = [json.load(open(os.path.join(os.path.dirname(report), f))) for f in ranks]
    for f in ranks:
        os.remove(os.path.join(os.path.dirname(report), f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--sizes", default="0.5,1,2,4", help="model sizes in GB (BF16)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--format", choices=["int4", "mxfp4", "nvfp4"], default="int4")
    ap.add_argument("--shard-bytes", type=int, default=200 * 10**6, help="export output shard size")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child"), ap.add_argument("--src"), ap.add_argument("--dst"), ap.add_argument("--report")
    ap.add_argument("--layers", type=int)
    args = ap.parse_args()
    if args.child:
        return child(args)
    largest = 2 * VOCAB * HIDDEN
    rows = []
    for size in [float(x) for x in args.sizes.split(",")]:
        work = tempfile.mkdtemp(prefix="bench-export-ckpt-", dir=args.workdir)
        try:
            src = os.path.join(work, "ckpt")
            layers = _layers_for(size)
            p = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    "make",
                    "--src",
                    src,
                    "--layers",
                    str(layers),
                    "--format",
                    args.format,
                ],
                capture_output=True,
                text=True,
            )
            if p.returncode:
                raise RuntimeError(p.stderr[-3000:])
            it = os.path.join(src, "iter_0000001")
            model_bytes = sum(os.path.getsize(os.path.join(it, f)) for f in os.listdir(it) if f.endswith(".distcp"))
            best: dict[str, list[dict]] = {}
            for r in range(args.rounds):
                for m in ("copy", "export", "export2"):
                    dst = os.path.join(work, f"out-{m}-{r}")
                    got = _run(m, src, dst, args, os.path.join(work, "report"))
                    shutil.rmtree(dst, ignore_errors=True)
                    if m not in best or max(g["seconds"] for g in got) < max(g["seconds"] for g in best[m]):
                        best[m] = got
            rows.append((size, layers, model_bytes, best))
            print(f"{model_bytes / 1e9:.2f} GB ({layers} layers) done", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nformat {args.format}; largest tensor {largest / 1e6:.0f} MB (embedding / lm_head, BF16); "
        f"{args.rounds} interleaved rounds, best of each"
    )
    print(
        f"{'model GB':>8} {'method':<10} {'time s':>7} {'GB/s':>6} {'vs copy':>8} {'peak RSS GB/proc':>17} "
        f"{'imports GB':>11} {'(peak-imports)/largest':>23} {'planner GB/proc':>16}"
    )
    from int4_qat.planner import arch_shape, export_plan

    for _size, layers, mb, best in rows:
        est = export_plan(
            arch_shape(_config(layers)),
            args.format,
            128 if args.format == "int4" else (32 if args.format == "mxfp4" else 16),
            "experts",
            optimizer_entries=0,
        )["ram_per_process_gb"]
        copy_gbs = mb / 1e9 / best["copy"][0]["seconds"]
        for m in ("copy", "export", "export2"):
            g = best[m]
            t = max(x["seconds"] for x in g)
            peak = max(x["peak_rss"] for x in g)
            imp = max(x["rss_imports"] for x in g)
            label = {"copy": "copy", "export": "export x1", "export2": "export x2"}[m]
            ratio = "" if m == "copy" else f"{max(x['peak_rss'] - x['rss_imports'] for x in g) / largest:>23.2f}"
            plan = "" if m == "copy" else f"{est:>16.2f}"
            print(
                f"{mb / 1e9:>8.2f} {label:<10} {t:>7.1f} {mb / 1e9 / t:>6.2f} {mb / 1e9 / t / copy_gbs:>8.2f} "
                f"{peak / 1e9:>17.2f} {imp / 1e9:>11.2f} {ratio:>23} {plan}"
            )
    print(f"\ncores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (a shared machine makes times noisy)")


if __name__ == "__main__":
    main()
