#!/usr/bin/env python
"""llama.cpp tokens/s of BF16 vs Q4_0 vs MXFP4 GGUF files as the model widens.

    python bench/bench_llama_cpp.py                        # hidden 128 (the demo's), 512, 1024
    python bench/bench_llama_cpp.py --hidden 128 2048 --rounds 9 --threads 2

Why: the demo's tokens/s table (``make demo``, ``int4_qat.demo.llama_cpp``) runs its tiny model
(~1 M parameters), whose every file fits in the CPU caches; there the three types run at nearly the
same speed, and that says nothing about what 4-bit weights do for serving. This bench runs the
demo's architecture (``recipes/models/tiny-qwen3-moe`` resized by the demo's own config writer:
2 layers, 8 experts top-2, expert intermediate = hidden) at growing widths, with random weights
(speed does not depend on the values), exported by the project's GGUF writer (INT4 g32 → Q4_0,
MXFP4, every linear layer; the unquantized file BF16), and measures each width's three files side
by side (``int4_qat.demo.llama_cpp.measure_tokens_per_s``: interleaved rounds, medians of tokens
per CPU-second, the per-round ratio to BF16) on real text windows.

Size: ~54·hidden² weights (2 layers × (8 experts × 3 + attention 3) matrices of hidden²); disk and
memory hold one width's three files at a time (hidden 1024: 114 MB BF16, 33 MB Q4_0, 31 MB MXFP4),
deleted after that width is measured unless ``--keep``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 512, 1024],
                   help="model widths (multiples of 128; expert intermediate = hidden)")
    p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds per width")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    p.add_argument("--keep", help="keep the GGUF files in this directory")
    a = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from int4_qat.data import ByteTokenizer, pack_documents, system_corpus
    from int4_qat.demo.config import DemoConfig, write_model_config
    from int4_qat.demo.llama_cpp import active_weight_bytes, measure_tokens_per_s
    from int4_qat.demo.report import text_table
    from int4_qat.export.gguf_export import export_gguf
    from int4_qat.testing import make_tiny_hf_checkpoint

    torch.set_num_threads(a.threads)
    windows = pack_documents(system_corpus(max_docs=200), ByteTokenizer(320), 128)[:4]
    heads = ["hidden", "GGUF", "file MB", "weight MB / token", "prompt tok/CPU-s", "prompt × BF16",
             "decode tok/CPU-s", "decode × BF16", "decode tok/s (wall)"]
    body = []
    for h in a.hidden:
        root = tempfile.mkdtemp(prefix=f"bench-llama-{h}-", dir=a.keep)
        try:
            cfg = DemoConfig(out=root, hidden=h, formats=("int4-g32", "mxfp4"))
            hf = make_tiny_hf_checkpoint(str(write_model_config(cfg, Path(root) / "cfg")),
                                         os.path.join(root, "hf"), dtype=torch.bfloat16, shards=1)
            files = []
            for kind, kw in (("BF16", {"quantize": False}),
                             ("Q4_0", {"fmt": "int4", "group_size": 32, "scope": "all-linear"}),
                             ("MXFP4", {"fmt": "mxfp4", "scope": "all-linear"})):
                out = export_gguf(str(hf), os.path.join(root, f"{kind}.gguf"), progress=False, **kw)
                files.append((f"hidden {h}", kind, out.output))
            for d in measure_tokens_per_s(files, windows, rounds=a.rounds, threads=a.threads):
                body.append([str(h), d["type"], f"{os.path.getsize(d['path']) / 1e6:.1f}",
                             f"{active_weight_bytes(d['path']) / 1e6:.2f}", f"{d['pp_cpu']:,.0f}",
                             f"{d['pp_cpu_vs_ref']:.2f}", f"{d['tg_cpu']:,.0f}",
                             f"{d['tg_cpu_vs_ref']:.2f}", f"{d['tg']:,.0f}"])
            print(f"hidden {h}: measured", file=sys.stderr, flush=True)
        finally:
            if not a.keep:
                shutil.rmtree(root, ignore_errors=True)
    print(text_table(heads, body, left=2))
    print(f"{a.threads} llama.cpp thread(s), medians of {a.rounds} interleaved rounds; × = median "
          "per-round ratio of tokens per CPU-second to the BF16 file of the same width.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
