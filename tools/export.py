#!/usr/bin/env python
"""Export a checkpoint to a packed 4-bit format that SGLang / vLLM / transformers load.

    python tools/export.py --input runs/tiny-moe/hf --output runs/tiny-moe/export/int4 --format int4
    python tools/export.py --input runs/tiny-moe/ckpt/iter_0000040 --output out/int4   # scheme from recipe.yaml
    python tools/export.py --input DIR --output DIR --format int4 --group-size 32 --scope all-linear
    python tools/export.py --input DIR --output DIR --recipe recipes/tiny-moe.yaml
    python tools/export.py --container gguf --input runs/tiny-moe/ckpt --output out/tiny-moe.gguf   # llama.cpp

Input: an HF BF16 checkpoint dir (config.json + safetensors, sharded with an index or single) or a
training checkpoint dir (contains recipe.yaml). Output: formats described in docs/DESIGN.md §6.
Check the result with tools/verify_export.py. On bad input: one line ``export: error: ...`` and
exit 2, nothing written (``--debug`` adds the stack); the input is never modified.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from int4_qat.cli import add_debug_flag, cli_main, positive_int  # noqa: E402  (light: stdlib only)


@cli_main("export")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="HF BF16 dir or training checkpoint dir")
    p.add_argument("--output", required=True, help="output dir (must not exist or be empty); "
                   "with --container gguf the .gguf file")
    p.add_argument("--container", choices=["compressed-tensors", "gguf"], default="compressed-tensors",
                   help="compressed-tensors checkpoint for SGLang / vLLM (default) or one GGUF file for "
                   "llama.cpp (int4 -> Q4_0, mxfp4 -> MXFP4, nvfp4 -> NVFP4)")
    p.add_argument("--format", choices=["int4", "mxfp4", "nvfp4"], help="required without a recipe")
    p.add_argument("--group-size", type=positive_int, help="INT4 group size (32/64/128 are Marlin-servable)")
    p.add_argument("--scope", choices=["experts", "all-linear"])
    p.add_argument("--recipe", help="recipe YAML whose quant: section fixes the scheme")
    p.add_argument("--serving-tp", type=positive_int, help="SGLang TP size the export must be servable at (default: recipe or 1)")
    p.add_argument("--serving-ep", type=positive_int, help="SGLang expert-parallel size at serving (default: recipe or 1); "
                   "Marlin sees moe_intermediate / (serving_tp / serving_ep) per rank")
    p.add_argument("--workers", type=positive_int, help="conversion threads (default: min(2, cores))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir atomically")
    p.add_argument("--allow-unservable", action="store_true", help="skip the Marlin MoE shape check")
    p.add_argument("--no-progress", action="store_true")
    add_debug_flag(p)
    a = p.parse_args(argv)
    if a.container == "gguf":
        return _gguf(a)
    from int4_qat.export import export_checkpoint

    # bad input -> one line and exit 2, filesystem errors name the path (int4_qat/cli.py)
    r = export_checkpoint(a.input, a.output, fmt=a.format, group_size=a.group_size, scope=a.scope,
                          recipe=a.recipe, serving_tp=a.serving_tp, serving_ep=a.serving_ep, workers=a.workers,
                          overwrite=a.overwrite, progress=not a.no_progress,
                          allow_unservable=a.allow_unservable)
    gb = r.input_bytes / 1e9
    print(f"exported {len(r.packed)} packed + {r.copied} copied tensors: {gb:.3f} GB in -> "
          f"{r.output_bytes / 1e9:.3f} GB out in {r.seconds:.1f} s ({gb / max(r.seconds, 1e-9):.2f} GB/s) -> {r.output}")
    return 0


def _gguf(a) -> int:
    ct_only = [f for f in ("serving_tp", "serving_ep", "workers") if getattr(a, f) is not None]
    if ct_only or a.allow_unservable:
        flag = "--" + (ct_only[0] if ct_only else "allow_unservable").replace("_", "-")
        print(f"export: error: {flag} applies to the compressed-tensors container, not gguf; drop it",
              file=sys.stderr)
        return 2
    from int4_qat.export.gguf_export import export_gguf

    try:
        r = export_gguf(a.input, a.output, fmt=a.format, group_size=a.group_size, scope=a.scope, recipe=a.recipe,
                        overwrite=a.overwrite, progress=not a.no_progress)
    except ValueError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {r.quantized} quantized + {r.tensors - r.quantized} other GGUF tensors ({r.arch}, "
          f"{r.vocab} vocab): {r.input_bytes / 1e9:.3f} GB in -> {r.output_bytes / 1e9:.3f} GB out in "
          f"{r.seconds:.1f} s -> {r.output}\n{r.report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
