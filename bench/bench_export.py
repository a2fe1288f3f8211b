#!/usr/bin/env python
"""Export throughput and peak memory, side by side with a plain copy and compressed-tensors.

    python bench/bench_export.py                 # ~2 GB synthetic BF16 MoE checkpoint
    python bench/bench_export.py --size-gb 8 --shard-gb 1 --format int4 --group-size 128
    python bench/bench_export.py --format nvfp4 --rounds 5 --no-compressed-tensors

Writes a synthetic Qwen3-MoE-shaped BF16 checkpoint (hidden 2048, expert intermediate 768 as in
Qwen3-30B-A3B; several shards + index; attention, router, norms, embeddings included), then runs
each method in its **own child process** so that peak RSS (``resource.getrusage(RUSAGE_SELF)
.ru_maxrss`` of the child) is that method's alone:

``copy (bytes)``        ``shutil.copyfile`` of every shard (the disk / page-cache ceiling);
``copy (safetensors)``  read every tensor with ``safe_open`` and write it back with ``save_file``
                        (a plain read-and-write copy at the tensor level: the baseline ratio);
``int4_qat export``     ``int4_qat.export.export_checkpoint`` (workers=2 and workers=1);
``compressed-tensors``  the same packing done by compressed-tensors' own code: scales from its
                        ``calculate_qparams`` (amax/7.5 for INT4), ``PackedQuantizationCompressor``
                        / ``NVFP4PackedCompressor`` / ``MXFP4PackedCompressor`` ``.compress`` per
                        Linear, ``save_file`` per shard (a whole output shard in memory).

``read only`` / ``read + quantize``  reading every tensor, and reading plus the fused
                        quantize+pack of every expert weight with nothing written: they split an
                        export into reading, numerics, and writing + pipeline.

Methods run in interleaved rounds (``--rounds``), min time per method. Throughput is GB of BF16
*input* per second; the ratio is to ``copy (safetensors)``.
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

HIDDEN, INTER, HEADS, KV, HEAD_DIM, VOCAB = 2048, 768, 16, 4, 128, 32768


def make_checkpoint(root: str, size_gb: float, shard_gb: float, seed: int = 0) -> dict:
    """Synthetic BF16 MoE checkpoint of about ``size_gb``; returns sizes."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    expert_bytes = 3 * HIDDEN * INTER * 2
    experts_per_layer = 32
    layer_bytes = experts_per_layer * expert_bytes + (HIDDEN * HEADS * HEAD_DIM * 2 + 2 * HIDDEN * KV * HEAD_DIM) * 2
    embed_bytes = 2 * VOCAB * HIDDEN * 2
    layers = max(1, round((size_gb * 1e9 - embed_bytes) / layer_bytes))
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": HIDDEN,
              "moe_intermediate_size": INTER, "intermediate_size": 6144, "num_hidden_layers": layers,
              "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM,
              "num_experts": experts_per_layer, "num_experts_per_tok": 8, "vocab_size": VOCAB,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rnd(VOCAB, HIDDEN)
        for L in range(layers):
            p = f"model.layers.{L}"
            for n, shp in (("q_proj", (HEADS * HEAD_DIM, HIDDEN)), ("k_proj", (KV * HEAD_DIM, HIDDEN)),
                           ("v_proj", (KV * HEAD_DIM, HIDDEN)), ("o_proj", (HIDDEN, HEADS * HEAD_DIM))):
                yield f"{p}.self_attn.{n}.weight", rnd(*shp)
            yield f"{p}.self_attn.q_norm.weight", torch.ones(HEAD_DIM, dtype=torch.bfloat16)
            yield f"{p}.self_attn.k_norm.weight", torch.ones(HEAD_DIM, dtype=torch.bfloat16)
            yield f"{p}.input_layernorm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16)
            yield f"{p}.post_attention_layernorm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16)
            yield f"{p}.mlp.gate.weight", rnd(experts_per_layer, HIDDEN)
            for e in range(experts_per_layer):
                yield f"{p}.mlp.experts.{e}.gate_proj.weight", rnd(INTER, HIDDEN)
                yield f"{p}.mlp.experts.{e}.up_proj.weight", rnd(INTER, HIDDEN)
                yield f"{p}.mlp.experts.{e}.down_proj.weight", rnd(HIDDEN, INTER)
        yield "model.norm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16)
        yield "lm_head.weight", rnd(VOCAB, HIDDEN)

    shards, cur, cur_bytes = [], {}, 0
    for name, t in tensors():
        cur[name] = t
        cur_bytes += t.numel() * 2
        if cur_bytes >= shard_gb * 1e9:
            shards.append(cur)
            cur, cur_bytes = {}, 0
    if cur:
        shards.append(cur)
    wm = {}
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(root, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in sh})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    files = [os.path.join(root, fn) for fn in sorted(set(wm.values()))]
    return {"bytes": sum(os.path.getsize(p) for p in files), "largest_shard": max(os.path.getsize(p) for p in files),
            "shards": len(files), "layers": layers}


# ------------------------------------------------------------------ methods (run in a child)
def _shards(src):
    wm = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    return sorted(set(wm.values()))


def m_copy_bytes(src, dst, args):
    os.makedirs(dst)
    for fn in _shards(src):
        shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))


def m_copy_safetensors(src, dst, args):
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst)
    for fn in _shards(src):
        with safe_open(os.path.join(src, fn), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        save_file(t, os.path.join(dst, fn), metadata={"format": "pt"})
        del t


def m_copy_safetensors_fsync(src, dst, args):
    """The same copy, made durable as the export is (each file fsynced before it counts as written:
    the export fsyncs its shards before the index that makes them visible)."""
    m_copy_safetensors(src, dst, args)
    for fn in _shards(src):
        with open(os.path.join(dst, fn), "rb+") as f:
            os.fsync(f.fileno())


def m_export(src, dst, args):
    from int4_qat.export import export_checkpoint

    export_checkpoint(src, dst, fmt=args.format, group_size=args.group_size if args.format == "int4" else None,
                      workers=args.workers, progress=False)


def _touch(t) -> None:
    """Read every byte of ``t`` (safetensors maps lazily): an integer max, at memory speed."""
    import torch

    if t.numel():
        t.contiguous().view(-1).view(torch.uint8).max()


def m_read(src, dst, args):
    """Reading alone: every byte of every tensor (the read floor of an export)."""
    from safetensors import safe_open

    for fn in _shards(src):
        with safe_open(os.path.join(src, fn), "pt") as f:
            for k in f.keys():
                _touch(f.get_tensor(k))


def m_read_quantize(src, dst, args):
    """Reading + the numerics (fused quantize+pack of every expert weight), nothing written:
    minus ``read only`` it is the numerics' share of an export."""
    from safetensors import safe_open

    from int4_qat.formats import fused
    from int4_qat.scheme import QuantScheme

    scheme = QuantScheme(format=args.format, group_size=args.group_size if args.format == "int4" else None)
    for fn in _shards(src):
        with safe_open(os.path.join(src, fn), "pt") as f:
            for k in f.keys():
                w = f.get_tensor(k)
                if ".mlp.experts." in k and k.endswith(".weight"):
                    fused.quantize_pack(scheme.format, w, scheme.group_size, name=k, **scheme.rule_kwargs)
                else:
                    _touch(w)


def m_compressed_tensors(src, dst, args):
    """The same conversion with compressed-tensors' own scale computation and compressors."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    from safetensors import safe_open
    from safetensors.torch import save_file

    from int4_qat.export.ct_config import compressed_tensors_scheme, ct_format
    from int4_qat.scheme import QuantScheme

    scheme = QuantScheme(format=args.format, group_size=args.group_size if args.format == "int4" else None)
    qs = compressed_tensors_scheme(scheme)
    comp = BaseCompressor.get_value_from_registry(ct_format(scheme))
    g = scheme.group_size
    os.makedirs(dst)
    for fn in _shards(src):
        out = {}
        with safe_open(os.path.join(src, fn), "pt") as f:
            for k in f.keys():
                w = f.get_tensor(k)
                if not (".mlp.experts." in k and k.endswith(".weight")):
                    out[k] = w
                    continue
                n, kk = w.shape
                wg = w.reshape(n, kk // g, g)
                mn, mx = wg.amin(-1), wg.amax(-1)
                sd = {"weight": w}
                if args.format == "nvfp4":
                    gs = generate_gparam(w.amin(), w.amax())
                    scale, _ = calculate_qparams(mn, mx, qs.weights, global_scale=gs)
                    sd.update(weight_scale=scale, weight_global_scale=gs)
                else:
                    scale, _ = calculate_qparams(mn, mx, qs.weights)
                    sd["weight_scale"] = scale.to(torch.bfloat16) if args.format == "int4" else scale
                mod = k[: -len(".weight")]
                for local, t in comp.compress(sd, qs).items():
                    out[f"{mod}.{local}"] = t.contiguous()
        save_file(out, os.path.join(dst, fn), metadata={"format": "pt"})
        del out


def m_imports(src, dst, args):
    """Baseline: the imports of every other method, no work (subtracted from peak RSS)."""
    import compressed_tensors.compressors  # noqa: F401
    import safetensors.torch  # noqa: F401

    import int4_qat.export  # noqa: F401
    from int4_qat.scheme import QuantScheme  # noqa: F401


METHODS = {"imports only": m_imports, "copy (bytes)": m_copy_bytes, "copy (safetensors)": m_copy_safetensors,
           "copy (safetensors+fsync)": m_copy_safetensors_fsync,
           "read only": m_read, "read + quantize": m_read_quantize,
           "int4_qat export": m_export, "compressed-tensors": m_compressed_tensors}


def child(method, src, dst, args):
    """Run one method; print its wall time and this process's peak RSS as JSON."""
    import resource

    import torch

    torch.set_num_threads(2)
    m_imports(src, dst, args)  # import cost is not conversion throughput: pay it before the clock
    t0 = time.perf_counter()
    METHODS[method](src, dst, args)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": dt, "peak_rss": rss}))


def run(method, src, dst, args, workers=2):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--src", src, "--dst", dst,
           "--format", args.format, "--group-size", str(args.group_size), "--workers", str(workers)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{method} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--format", choices=["int4", "mxfp4", "nvfp4"], default="int4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--workdir", default=None, help="where to write the synthetic checkpoint (default: a temp dir)")
    ap.add_argument("--child"), ap.add_argument("--src"), ap.add_argument("--dst")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (min time per method)")
    ap.add_argument("--no-compressed-tensors", dest="compressed_tensors", action="store_false",
                    help="skip compressed-tensors' own packing (minutes)")
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:  # in a child: the parent must stay small, Linux keeps ru_maxrss across fork+exec
        print(json.dumps(make_checkpoint(args.src, args.size_gb, args.shard_gb)))
        return None
    if args.child:
        return child(args.child, args.src, args.dst, args)
    work = tempfile.mkdtemp(prefix="bench-export-", dir=args.workdir)
    try:
        src = os.path.join(work, "src")
        os.makedirs(src)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--make", "--src", src, "--size-gb",
                            str(args.size_gb), "--shard-gb", str(args.shard_gb)], capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        info = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"synthetic checkpoint: {info['bytes'] / 1e9:.2f} GB BF16, {info['layers']} layers x 32 experts, "
              f"{info['shards']} shards (largest {info['largest_shard'] / 1e9:.2f} GB), written in "
              f"{time.perf_counter() - t0:.0f} s; format {args.format}"
              + (f" g{args.group_size}" if args.format == "int4" else ""))
        plan = [("imports only", 2), ("copy (bytes)", 2), ("copy (safetensors)", 2),
                ("copy (safetensors+fsync)", 2), ("read only", 2),
                ("read + quantize", 2), ("int4_qat export", 2), ("int4_qat export", 1)]
        # interleaved rounds (a busy shared machine slows every method alike); compressed-tensors'
        # own packing is minutes slower, so it runs once, in the last round
        res: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            extra = [("compressed-tensors", 2)] if args.compressed_tensors and rnd == args.rounds - 1 else []
            for i, (m, w) in enumerate(plan + extra):
                dst = os.path.join(work, f"out{i}")
                os.sync()    # every method starts with no other method's writes pending
                r = run(m, src, dst, args, workers=w)
                r["out_bytes"] = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(dst) for f in fs)
                shutil.rmtree(dst, ignore_errors=True)
                res.setdefault((m, w), []).append(r)
        gb = info["bytes"] / 1e9

        def best(key):   # min over rounds: noise only ever adds time
            return min(r["seconds"] for r in res[key])

        base = best(("copy (safetensors)", 2))
        durable = best(("copy (safetensors+fsync)", 2))
        rss0 = min(r["peak_rss"] for r in res[("imports only", 2)])
        print(f"\n{args.rounds} interleaved rounds, min time per method; vs copy = time of copy (safetensors) / "
              f"time; vs durable = time of copy (safetensors+fsync) / time (the export fsyncs its shards)")
        print(f"{'method':<28} {'time s':>7} {'GB/s in':>8} {'vs copy':>8} {'vs durable':>10} {'peak RSS GB':>12} "
              f"{'(RSS-imports)/shard':>20} {'out GB':>7}")
        for key in res:
            if key[0] == "imports only":
                continue
            t = best(key)
            rss = max(r["peak_rss"] for r in res[key])
            label = key[0] + (f" (workers={key[1]})" if key[0] == "int4_qat export" else "")
            print(f"{label:<28} {t:>7.2f} {gb / t:>8.3f} {base / t:>8.2f} {durable / t:>10.2f} {rss / 1e9:>12.2f} "
                  f"{(rss - rss0) / info['largest_shard']:>20.2f} {res[key][0]['out_bytes'] / 1e9:>7.2f}")
        read, rq, exp1 = best(("read only", 2)), best(("read + quantize", 2)), best(("int4_qat export", 1))
        print(f"export (workers=1) {exp1:.1f} s = reading {read:.1f} s + numerics {rq - read:.1f} s "
              f"+ writing and pipeline {exp1 - rq:.1f} s (single-threaded numerics, measured apart)")
        print(f"imports alone (torch, safetensors, compressed-tensors, int4_qat): {rss0 / 1e9:.2f} GB peak RSS")
        print(f"\ncores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (shared machine: times are noisy)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
