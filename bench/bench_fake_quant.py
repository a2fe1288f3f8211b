"""Fake-quant cost: fused kernels vs the eager oracle vs ModelOpt's INT4 block quant vs a clone.

    python bench/bench_fake_quant.py                       # 4096x1536, bf16 + fp32, 7 rounds
    python bench/bench_fake_quant.py --repeats 9 --threads 2 --shape 4096 1536
    python bench/bench_fake_quant.py --device cuda         # on a GPU machine

What is timed: one fake-quant forward of an MoE-expert-shaped weight (default ``[4096, 1536]``: a
down_proj of a model with hidden 4096 and moe_intermediate 1536, [N, K] = [out, in]) with ``requires_grad=True`` and
autograd on, as in training; one warm-up (which also builds / loads the fused kernels), then
``--repeats`` rounds in which every case runs once (round-robin, so load on a shared machine hits
all cases alike); median (and min) per case, also as milliseconds per million weights. Rows:

* ``clone``         - ``w.clone()``: one read and one write of the weight, the memory floor.
* ``modelopt``      - ModelOpt's built-in static INT4 block quantizer
                      (``INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` with ``block_sizes {-1: G}``), amax
                      calibrated once beforehand (not timed; it is frozen during training).
                      ModelOpt's MXFP4/NVFP4 fake quant needs CUDA, so on CPU every format is
                      compared with ModelOpt INT4 at the same group size.
* ``fused``         - ``int4_qat.formats.fused.fake_quantize`` (what training and export use).
* ``fused via mtq`` - the same through a ModelOpt ``TensorQuantizer`` configured by
                      ``QuantScheme.modelopt_config()`` (adds ModelOpt's dispatch overhead).
* ``oracle``        - the eager reference (``QuantScheme.fake_quantize``), same bits.

``vs modelopt`` = time / ModelOpt INT4 time at the same group size and dtype; ``vs clone`` = time /
clone time (both lower is faster; by median, and by min -- min is the robust one on a loaded
machine: noise only ever adds time).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from int4_qat.scheme import QuantScheme  # noqa: E402

CASES = [  # (label, scheme kwargs)
    ("int4 g32", dict(format="int4", group_size=32)),
    ("int4 g128", dict(format="int4", group_size=128)),
    ("mxfp4 g32", dict(format="mxfp4")),
    ("nvfp4 g16", dict(format="nvfp4")),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_interleaved(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Run every case once per round (round-robin), so a busy shared CPU slows all cases alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times[key].append((time.perf_counter() - t0) * 1e3)
            del out
    return times


def _quantized_linear(w: torch.Tensor, cfg: dict) -> nn.Module:
    import modelopt.torch.quantization as mtq

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    # ModelOpt's check wants a quantizer to match; name the module like an expert projection.
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.experts = nn.ModuleList([nn.Module()])
    model.mlp.experts[0].down_proj = lin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, forward_loop=None)
    return model.mlp.experts[0].down_proj


def _modelopt_int4_cfg(group: int) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    for entry in cfg["quant_cfg"]:
        if entry["quantizer_name"] == "*weight_quantizer":
            entry["cfg"]["block_sizes"] = {-1: group, "type": "static"}
    return cfg


def run(shape, dtypes, repeats: int, device: str) -> list[dict]:
    from int4_qat.formats import fused
    from int4_qat.modelopt_backend import register_backend

    register_backend()
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        w = (torch.randn(*shape, device=device) * 0.02).to(dtype).requires_grad_(True)
        fns, group_of = {"clone": lambda w=w: w.clone()}, {"clone": None}
        for group in sorted({QuantScheme(**kw).group_size for _, kw in CASES}):
            lin = _quantized_linear(w.detach(), _modelopt_int4_cfg(group))
            fns[f"modelopt int4 g{group}"] = lambda m=lin: m.weight_quantizer(m.weight)
            group_of[f"modelopt int4 g{group}"] = group
        for label, kw in CASES:
            scheme = QuantScheme(**kw)
            fns[f"fused {label}"] = (lambda s=scheme, w=w: fused.fake_quantize(
                s.format, w, s.group_size, **s.rule_kwargs))
            lin = _quantized_linear(w.detach(), scheme.modelopt_config())
            fns[f"fused via mtq {label}"] = lambda m=lin: m.weight_quantizer(m.weight)
            fns[f"oracle {label}"] = lambda s=scheme, w=w: s.fake_quantize(w)
            for pre in ("fused", "fused via mtq", "oracle"):
                group_of[f"{pre} {label}"] = scheme.group_size
        times = _time_interleaved(fns, repeats, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        for key in fns:
            base = f"modelopt int4 g{group_of[key]}" if group_of[key] else "clone"
            rows.append(dict(dtype=dtype, case=key, ms=med[key], min_ms=best[key],
                             per_m=med[key] / (w.numel() / 1e6),
                             vs_mo=med[key] / med[base], vs_mo_min=best[key] / best[base],
                             vs_clone=med[key] / med["clone"], vs_clone_min=best[key] / best["clone"]))
        rows.append(dict(dtype=dtype, impl=fused.implementation(device)))
    return rows


def format_table(rows, shape, repeats, device) -> str:
    head = (f"fake quant of a {shape[0]}x{shape[1]} weight on {device} "
            f"({torch.get_num_threads()} threads), {repeats} interleaved rounds; ratios by median "
            "(by min); vs modelopt = / ModelOpt INT4 at the same group size, vs clone = / w.clone()")
    lines = [head, f"{'dtype':<9} {'case':<24} {'median ms':>10} {'min ms':>8} {'ms/Mweight':>11} "
                   f"{'vs modelopt':>16} {'vs clone':>16}"]
    for r in rows:
        dt = str(r["dtype"]).replace("torch.", "")
        if "impl" in r:
            lines.append(f"{dt:<9} (fused implementation: {r['impl']})")
            continue
        lines.append(f"{dt:<9} {r['case']:<24} {r['ms']:>10.2f} {r['min_ms']:>8.2f} {r['per_m']:>11.2f} "
                     f"{r['vs_mo']:>7.2f} ({r['vs_mo_min']:>5.2f}) {r['vs_clone']:>7.2f} "
                     f"({r['vs_clone_min']:>5.2f})")
    return "\n".join(lines)


def _keep_freed_memory() -> bool:
    """glibc returns large freed blocks to the OS, so every call's fresh output would be
    page-faulted in again (a cost of the benchmark loop, not of any kernel: training reuses its
    allocator's memory). Keep them in the heap, as a caching allocator would."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        big = (1 << 31) - 1  # mallopt takes a C int
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, big))
    except (OSError, AttributeError):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 1536], metavar=("N", "K"))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                   choices=["bfloat16", "float32", "float16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable numbers on a shared CPU)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape[1] % 128:
        p.error(f"--shape K={args.shape[1]} must be a multiple of 128 (every group size divides it)")
    dtypes = [getattr(torch, d) for d in args.dtypes]
    if args.device == "cpu" and not _keep_freed_memory():
        print("note: could not set mallopt; outputs are page-faulted in on every call", file=sys.stderr)
    rows = run(tuple(args.shape), dtypes, args.repeats, args.device)
    print(format_table(rows, args.shape, args.repeats, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
