#!/usr/bin/env python
"""Export a checkpoint to a packed 4-bit format that SGLang / vLLM / transformers / llama.cpp load.

    python tools/export.py --input runs/tiny-moe/hf --output runs/tiny-moe/export/int4 --format int4
    python tools/export.py --input runs/tiny-moe/ckpt/iter_0000040 --output out/int4   # scheme from recipe.yaml
    python tools/export.py --input DIR --output DIR --format int4 --group-size 32 --scope all-linear
    python tools/export.py --input DIR --output DIR --recipe recipes/tiny-moe.yaml
    python tools/export.py --input runs/R/ckpt --output out/int4 --nproc 8    # 8 processes (torchrun)
    torchrun --nnodes 2 --nproc-per-node 8 ... tools/export.py --input ... --output ...  # multi-node
    python tools/export.py --container gguf --input runs/tiny-moe/ckpt --output out/tiny-moe.gguf   # llama.cpp

Input: an HF BF16 checkpoint dir (config.json + safetensors, sharded with an index or single) or a
training checkpoint (a checkpoint dir with ``latest`` or an ``iter_*`` dir). A training checkpoint
is streamed tensor by tensor from its distributed-checkpoint files (no model is built; no GPU
needed; memory per process ~ the largest tensor); ``--nproc N`` first checks the input here, then
runs the export as N torchrun processes on this node that split the output shards (the result is
byte-identical for any N). Under torchrun (one or many nodes sharing the output's filesystem) the
processes of the job split the work the same way. Output: formats described in docs/DESIGN.md §6
and docs/FORMATS.md. Check the result with tools/verify_export.py. On bad input: one line
``export: error: ...`` and exit 2, nothing written (``--debug`` adds the stack); the input is never
modified.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from int4_qat.cli import add_debug_flag, cli_main, positive_int  # noqa: E402  (light: stdlib only)


@cli_main("export")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="HF BF16 dir or training checkpoint dir")
    p.add_argument(
        "--output", required=True, help="output dir (must not exist or be empty); with --container gguf the .gguf file"
    )
    p.add_argument(
        "--container",
        choices=["compressed-tensors", "gguf"],
        default="compressed-tensors",
        help="compressed-tensors checkpoint for SGLang / vLLM (default) or one GGUF file for "
        "llama.cpp (int4 -> Q4_0, mxfp4 -> MXFP4, nvfp4 -> NVFP4)",
    )
    p.add_argument("--format", choices=["int4", "mxfp4", "nvfp4"], help="required without a recipe")
    p.add_argument("--group-size", type=positive_int, help="INT4 group size (32/64/128 are Marlin-servable)")
    p.add_argument("--scope", choices=["experts", "all-linear"])
    p.add_argument("--recipe", help="recipe YAML whose quant: section fixes the scheme")
    p.add_argument(
        "--serving-tp", type=positive_int, help="SGLang TP size the export must be servable at (default: recipe or 1)"
    )
    p.add_argument(
        "--serving-ep",
        type=positive_int,
        help="SGLang expert-parallel size at serving (default: recipe or 1); "
        "Marlin sees moe_intermediate / (serving_tp / serving_ep) per rank",
    )
    p.add_argument("--workers", type=positive_int, help="conversion threads per process (default: min(2, cores))")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes on this node (torchrun); default 1")
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default=None,
        help="output shard size for a training-checkpoint input, e.g. 2GB (default), 500MB",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous export at --output atomically")
    p.add_argument("--allow-unservable", action="store_true", help="skip the Marlin MoE shape check")
    p.add_argument(
        "--skip-checksums",
        action="store_true",
        help="training checkpoint: do not verify its files against checksums.json first (that pass "
        "reads the whole iteration once, optimizer state included)",
    )
    p.add_argument("--no-progress", action="store_true")
    add_debug_flag(p)
    a = p.parse_args(argv)
    if a.container == "gguf":
        return _gguf(a)
    from int4_qat.export import export_checkpoint
    from int4_qat.export.pipeline import MAX_SHARD_BYTES

    # bad input -> one line and exit 2, filesystem errors name the path (int4_qat/cli.py)
    kw = dict(
        fmt=a.format,
        group_size=a.group_size,
        scope=a.scope,
        recipe=a.recipe,
        serving_tp=a.serving_tp,
        serving_ep=a.serving_ep,
        workers=a.workers,
        overwrite=a.overwrite,
        progress=not a.no_progress,
        allow_unservable=a.allow_unservable,
        max_shard_bytes=a.max_shard_size or MAX_SHARD_BYTES,
        verify_checksums=not a.skip_checksums,
    )
    if a.nproc > 1 and "RANK" not in os.environ:
        export_checkpoint(a.input, a.output, **kw, check_only=True)  # bad input: one line, here
        return _torchrun(a.nproc, argv if argv is not None else sys.argv[1:])
    r = export_checkpoint(a.input, a.output, **kw)
    if int(os.environ.get("RANK", "0")) == 0:
        gb = r.input_bytes / 1e9
        print(
            f"exported {len(r.packed)} packed + {r.copied} copied tensors: {gb:.3f} GB in -> "
            f"{r.output_bytes / 1e9:.3f} GB out ({r.shards} shards, {r.processes} process(es)) in "
            f"{r.seconds:.1f} s ({gb / max(r.seconds, 1e-9):.2f} GB/s) -> {r.output}"
        )
    return 0


def _gguf(a) -> int:
    ct_only = [f for f in ("serving_tp", "serving_ep", "workers", "max_shard_size") if getattr(a, f) is not None]
    if ct_only or a.allow_unservable or a.nproc != 1:
        flag = "--" + (ct_only[0] if ct_only else "allow_unservable" if a.allow_unservable else "nproc").replace(
            "_", "-"
        )
        raise ValueError(f"{flag} applies to the compressed-tensors container, not gguf; fix: drop it")
    from int4_qat.export.gguf_export import export_gguf

    r = export_gguf(
        a.input,
        a.output,
        fmt=a.format,
        group_size=a.group_size,
        scope=a.scope,
        recipe=a.recipe,
        overwrite=a.overwrite,
        progress=not a.no_progress,
    )
    print(
        f"exported {r.quantized} quantized + {r.tensors - r.quantized} other GGUF tensors ({r.arch}, "
        f"{r.vocab} vocab): {r.input_bytes / 1e9:.3f} GB in -> {r.output_bytes / 1e9:.3f} GB out in "
        f"{r.seconds:.1f} s -> {r.output}\n{r.report.summary()}"
    )
    return 0


def _size(text: str) -> int:
    """'2GB' / '500MB' / '64KB' / bytes -> bytes (powers of 1000, as transformers' max_shard_size)."""
    t = text.strip().upper()
    for suffix, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            t, m = t[: -len(suffix)], mult
            break
    else:
        m = 1
    try:
        n = int(float(t) * m)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0: {text!r}")
    return n


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command as ``nproc`` torchrun processes on this node (input already checked)."""
    import subprocess

    args, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == "--nproc":
            skip = True
            continue
        if not x.startswith("--nproc="):
            args.append(x)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    from int4_qat.parallel import free_port

    port = free_port()  # a static rendezvous on a free local port (faster than --standalone)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        os.path.abspath(__file__),
        *args,
    ]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
