"""Fused fake quant and quantize+pack: the oracle's numbers at memory speed.

The eager code in ``int4.py`` / ``mxfp4.py`` / ``nvfp4.py`` is the oracle: clear, and the
definition of every bit. It makes some ten passes over memory per weight (float copy, abs, amax,
divide, round, clamp, multiply, two casts). This module computes the same bits in one pass per
group, with a kernel chosen by device:

``cpu``     C kernels (``_cpu_kernels.c``), compiled once per machine with the system C compiler
            and cached on disk (``$INT4_QAT_KERNEL_CACHE``, default ``~/.cache/int4_qat/kernels``;
            one shared object per source / compiler / flags hash), one variant per ISA level
            (avx512, avx2, generic) of which the best the CPU supports is used. Multi-threaded
            over groups with ``torch.get_num_threads()`` threads; the GIL is released.
``triton``  Triton kernels (``_triton_kernels.py``) for CUDA tensors (fake quant; export runs
            on CPUs).
``oracle``  the eager code itself: for every other device, when no compiler or Triton is
            available, or when ``INT4_QAT_FUSED=0``. The choice is logged once per device type
            (logger ``int4_qat.formats``; a fallback is a warning).

Exactness contract: for every input (dtype bf16 / fp16 / fp32, any shape, group size, rule)
``fake_quantize`` and ``quantize_pack`` return bit-identical tensors to
``get_format(fmt).fake_quantize`` and ``get_format(fmt).pack(get_format(fmt).quantize(...))``
(tests/test_formats_fused.py fuzzes that with atol=0 over every variant this machine can run).
Why it holds is written in ``_cpu_kernels.c`` (same IEEE float32 ops in the same order, true
division, no FMA contraction, no fast-math, RNE conversions) and ``_triton_kernels.py``
(``div_rn``, no fp fusion, no flush-to-zero). The build flags are pinned by a test.

Why hand-written kernels and not ``torch.compile``: measured on the development machine (INT4
g128, bf16 4096x1536, one thread), inductor's C++ kernel took 2.9 ms against 1.5 ms for the C
kernel and 0.4 ms for a clone, compiled in ~60 s per process (cold cache), and its exactness
needs care at every layer -- inductor drops ``x.to(bf16).float()`` round trips unless
``emulate_precision_casts`` is on, rewrites division by a constant as a reciprocal multiply on
GPUs, and its Triton ``/`` is ``div.full`` unless ``eager_numerics.division_rounding``. The C
kernels build in ~10 s once per machine, take every shape without recompiling, and state their
arithmetic explicitly.

    from int4_qat.formats import fused
    y = fused.fake_quantize("int4", w, 128, name="...down_proj.weight")   # STE, like the oracle
    tensors = fused.quantize_pack("nvfp4", w, 16, name="...")             # {"weight_packed", ...}
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from int4_qat.formats import int4, mxfp4, nvfp4
from int4_qat.formats._common import (
    QuantFormat,
    check_group_size,
    check_weight,
    straight_through,
)
from int4_qat.formats.finite import report_nonfinite

__all__ = ["fake_quantize", "quantize_pack", "matrix_amax", "implementation", "cpu_variants", "CFLAGS"]

log = logging.getLogger("int4_qat.formats")

_SRC = Path(__file__).with_name("_cpu_kernels.c")
#: Flags that keep the C kernels bit-exact (see _cpu_kernels.c). Never add -ffast-math,
#: -funsafe-math-optimizations, -freciprocal-math, -ffinite-math-only or -ffp-contract=fast:
#: tests/test_formats_fused.py pins this list.
CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno",
          "-fno-trapping-math", "-fno-unsafe-math-optimizations", "-fno-reciprocal-math",
          "-fno-finite-math-only", "-fsigned-zeros")
#: ISA variants, best first: (name, extra flags). Each is built into the same shared object.
_VARIANTS = {
    "x86_64": (("avx512", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mf16c",
                           "-DKISA_AVX512")),
               ("avx2", ("-mavx2", "-mf16c", "-DKISA_AVX2")),
               ("generic", ())),
}
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_PARALLEL_MIN = 1 << 18  # elements below which one thread is faster than starting more

_INT4_PARAMS: dict[str, tuple] = {}
_lock = threading.Lock()
_lib: "_CpuLib | None | bool" = None  # None: not tried; False: unavailable
_logged: set[str] = set()


def _log_once(key: str, level: int, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg)


# ------------------------------------------------------------------ building the C library
def _cache_dir() -> Path:
    env = os.environ.get("INT4_QAT_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "int4_qat" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _variants() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return _VARIANTS.get(platform.machine(), (("generic", ()),))


def _build(cc: str, out: Path) -> None:
    """Compile every ISA variant in parallel and link them into ``out`` (atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        procs, objs = [], []
        for name, flags in _variants():
            obj = os.path.join(tmp, f"{name}.o")
            cmd = [cc, "-c", *CFLAGS, *flags, f"-DKSUF={name}", str(_SRC), "-o", obj]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True)))
            objs.append(obj)
        for cmd, p in procs:
            text, _ = p.communicate()
            if p.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-2000:]}")
        so = os.path.join(tmp, "kernels.so")
        r = subprocess.run([cc, "-shared", "-pthread", *objs, "-o", so, "-lm"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"linking the fused kernels failed:\n{(r.stdout + r.stderr)[-2000:]}")
        os.replace(so, out)


def _library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([_SRC.read_text(), cc, version, " ".join(CFLAGS), repr(_variants()),
                                    platform.machine(), sys.byteorder]).encode()).hexdigest()[:20]
    return _cache_dir() / f"int4_qat_kernels-{key}.so"


class _CpuLib:
    """The loaded shared object, its variants and their ctypes signatures."""

    def __init__(self, path: Path):
        self.path = path
        self.dll = ctypes.CDLL(str(path))
        P, I, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        sigs = {
            "int4_fake_quant": (I, [P, P, I, I64, I, F, I, F, F, F, F, F, I, I]),
            "int4_quant_pack": (I, [P, P, P, I, I64, I, I, F, I, F, F, F, F, F, I]),
            "mxfp4_fake_quant": (I, [P, P, I, I64, I]),
            "mxfp4_quant_pack": (I, [P, P, P, I, I64, I]),
            "matrix_amax": (None, [P, P, I, I64, I64, I]),
            "nvfp4_fake_quant": (I, [P, P, P, I, I64, I64, I, I]),
            "nvfp4_quant_pack": (I, [P, P, P, P, I, I64, I64, I, I]),
            "variant_supported": (I, []),
        }
        self.variants: dict[str, dict[str, ctypes._CFuncPtr]] = {}
        for name, _ in _variants():
            fns = {}
            for fn, (res, args) in sigs.items():
                f = getattr(self.dll, f"{fn}_{name}")
                f.restype, f.argtypes = res, args
                fns[fn] = f
            if fns["variant_supported"]():
                self.variants[name] = fns
        self.best = next(iter(self.variants))


def _load() -> "_CpuLib | None":
    """Build (first use on this machine) or load the C kernels; None when impossible."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = False
                if sys.byteorder != "little":
                    _log_once("cpu", logging.WARNING, "int4_qat fused kernels: big-endian host, "
                              "using the eager oracle on CPU")
                    return None
                cc = _compiler()
                if cc is None:
                    _log_once("cpu", logging.WARNING, "int4_qat fused kernels: no C compiler "
                              "(set CC), using the eager oracle on CPU (slower, same bits)")
                    return None
                try:
                    path = _library_path(cc)
                    if not path.exists():
                        try:
                            _build(cc, path)
                        except OSError:  # cache dir not writable: build in a private temp dir
                            path = Path(tempfile.mkdtemp(prefix="int4_qat_kernels-")) / path.name
                            _build(cc, path)
                    _lib = _CpuLib(path)
                except Exception as exc:  # noqa: BLE001 - any failure means: use the oracle
                    _log_once("cpu", logging.WARNING, f"int4_qat fused kernels: could not build "
                              f"or load ({exc}); using the eager oracle on CPU (slower, same bits)")
                    _lib = False
                    return None
                _log_once("cpu", logging.INFO, f"int4_qat fused kernels: CPU variant "
                          f"{_lib.best} from {_lib.path}")
    return _lib or None


def cpu_variants() -> list[str]:
    """The C kernel variants this CPU can run, best first ([] when the library is unavailable)."""
    lib = _load()
    return list(lib.variants) if lib else []


def _enabled() -> bool:
    return os.environ.get("INT4_QAT_FUSED", "1").strip().lower() not in ("0", "false", "oracle", "off")


def implementation(device: torch.device | str = "cpu") -> str:
    """The implementation a tensor on ``device`` gets: "cpu-<variant>", "triton" or "oracle"."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cpu" and isinstance(_lib, _CpuLib) and _enabled():  # the per-call fast path
        return f"cpu-{_lib.best}"
    if not _enabled():
        _log_once(dev.type, logging.INFO, "int4_qat fused kernels disabled (INT4_QAT_FUSED=0): "
                  "using the eager oracle")
        return "oracle"
    if dev.type == "cpu":
        lib = _load()
        return f"cpu-{lib.best}" if lib else "oracle"
    if dev.type == "cuda":
        from int4_qat.formats import _triton_kernels as tk

        if tk.available():
            _log_once("cuda", logging.INFO, "int4_qat fused kernels: Triton on CUDA")
            return "triton"
        _log_once("cuda", logging.WARNING, f"int4_qat fused kernels: Triton unavailable "
                  f"({tk.why_unavailable()}); using the eager oracle on CUDA")
        return "oracle"
    _log_once(dev.type, logging.INFO, f"int4_qat fused kernels: none for {dev.type}; using the "
              "eager oracle")
    return "oracle"


# ------------------------------------------------------------------ argument handling (shared)
def _fmt(fmt) -> QuantFormat:
    if isinstance(fmt, QuantFormat):
        return fmt
    try:
        return QuantFormat(getattr(fmt, "value", fmt))
    except ValueError:
        raise ValueError(f"unknown quant format {fmt!r} (allowed: "
                         f"{[f.value for f in QuantFormat]})") from None


def _int4_params(scale_rule: str, name: str) -> tuple[float, int, float, float, float, float, float]:
    """(divisor, rule id, floor, zero scale, S_MAX, qmin, qmax) of int4.py's rule."""
    if scale_rule in _INT4_PARAMS:  # filled below at import
        return _INT4_PARAMS[scale_rule]
    divisor, qmin, qmax = int4._rule(scale_rule, name)
    rule_id = 0 if scale_rule == "amax/7" else 1
    return (divisor, rule_id, int4.SCALE_FLOOR, float(int4._CT_ZERO_SCALE), int4._S_MAX_F[scale_rule],
            float(qmin), float(qmax))


_INT4_PARAMS.update({r: _int4_params(r, "") for r in int4.SCALE_RULES})


def _check(fmt: QuantFormat, w: Tensor, group_size: int, name: str) -> None:
    allowed = None if fmt is QuantFormat.INT4 else ({QuantFormat.MXFP4: mxfp4.DEFAULT_GROUP_SIZE,
                                                     QuantFormat.NVFP4: nvfp4.DEFAULT_GROUP_SIZE}[fmt],)
    check_group_size(group_size, name, allowed=allowed)
    check_weight(w, group_size, name)


def _threads(numel: int) -> int:
    return torch.get_num_threads() if numel >= _PARALLEL_MIN else 1


def _report(bad: int, name: str) -> None:
    if bad:
        report_nonfinite(torch.ones((), dtype=torch.bool), name)


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _nv_global(fns, x: Tensor, global_amax: Tensor | None, name: str) -> tuple[Tensor, int]:
    """(float32 ``[..., 1]`` buffer, own_g): without ``global_amax`` the kernel computes each
    matrix's amax and global scale itself (own_g=1; the rule of nvfp4.global_scale, tested equal);
    with it, nvfp4.global_scale validates it and computes g here."""
    g = torch.empty((*x.shape[:-2], 1), dtype=torch.float32)
    if global_amax is None:
        return g, 1
    matsize = x.shape[-2] * x.shape[-1]
    fns["matrix_amax"](x.data_ptr(), g.data_ptr(), _DTYPES[x.dtype], x.numel() // max(matsize, 1),
                       matsize, _threads(x.numel()))
    report_nonfinite(~torch.isfinite(g).all(), name)  # before global_amax checks, as the oracle
    return nvfp4.global_scale(g, global_amax, name).contiguous(), 0


def matrix_amax(w: Tensor) -> Tensor:
    """``nvfp4.matrix_amax(w)`` (max |w| per 2-D matrix, float32 ``[..., 1]``) in one pass on
    CPU (an integer max over the bits: exact, NaN / Inf as torch's amax gives them)."""
    impl = implementation(w.device)
    if not impl.startswith("cpu-") or w.dtype not in _DTYPES or w.ndim < 2:
        return nvfp4.matrix_amax(w)
    x = w.detach().contiguous()
    amax = torch.empty((*x.shape[:-2], 1), dtype=torch.float32)
    matsize = x.shape[-2] * x.shape[-1]
    if matsize == 0:
        return nvfp4.matrix_amax(w)
    _load().variants[impl[4:]]["matrix_amax"](x.data_ptr(), amax.data_ptr(), _DTYPES[x.dtype],
                                               x.numel() // matsize, matsize, _threads(x.numel()))
    return amax


# ------------------------------------------------------------------ fake quant
def _cpu_fake_quant(fns, fmt: QuantFormat, x: Tensor, group_size: int, name: str, rule: dict) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dt, n, thr = _DTYPES[x.dtype], x.numel(), _threads(x.numel())
    if n == 0:
        return out
    if fmt is QuantFormat.INT4:
        served = int4._check_served(rule.get("served", "bf16"), name)
        bad = fns["int4_fake_quant"](x.data_ptr(), out.data_ptr(), dt, n, group_size,
                                     *_int4_params(rule.get("scale_rule", "amax/7"), name),
                                     int(served == "exact"), thr)
    elif fmt is QuantFormat.MXFP4:
        bad = fns["mxfp4_fake_quant"](x.data_ptr(), out.data_ptr(), dt, n, thr)
    else:
        g, own = _nv_global(fns, x, rule.get("global_amax"), name)
        bad = fns["nvfp4_fake_quant"](x.data_ptr(), out.data_ptr(), g.data_ptr(), dt, n,
                                      x.shape[-2] * x.shape[-1], own, thr)
    _report(bad, name)
    return out


def _rule_kwargs(fmt: QuantFormat, rule: dict) -> dict:
    allowed = {QuantFormat.INT4: ("scale_rule", "served"), QuantFormat.MXFP4: (),
               QuantFormat.NVFP4: ("global_amax",)}[fmt]
    extra = set(rule) - set(allowed)
    if extra:
        raise TypeError(f"{fmt.value}: unexpected keyword(s) {sorted(extra)} (allowed: {list(allowed)})")
    return rule


def fake_quantize(fmt: QuantFormat | str, w: Tensor, group_size: int | None = None, *,
                  name: str = "weight", **rule) -> Tensor:
    """``get_format(fmt).fake_quantize(w, group_size, name=name, **rule)``, fused; same bits,
    same STE (identity gradient, nothing saved)."""
    fmt = _fmt(fmt)
    rule = _rule_kwargs(fmt, rule)
    oracle = {QuantFormat.INT4: int4, QuantFormat.MXFP4: mxfp4, QuantFormat.NVFP4: nvfp4}[fmt]
    group_size = oracle.DEFAULT_GROUP_SIZE if group_size is None else group_size
    impl = implementation(w.device) if isinstance(w, Tensor) else "oracle"
    if impl == "triton":
        from int4_qat.formats import _triton_kernels as tk

        if tk.supports(fmt, group_size):
            _check(fmt, w, group_size, name)
            return straight_through(w, lambda x: tk.fake_quantize(fmt, x, group_size, name, rule))
        impl = "oracle"  # group sizes that are not a power of two
    if impl == "oracle":
        return oracle.fake_quantize(w, group_size, name=name, **rule)
    _check(fmt, w, group_size, name)
    fns = _load().variants[impl[len("cpu-"):]]
    return straight_through(w, lambda x: _cpu_fake_quant(fns, fmt, x, group_size, name, rule))


# ------------------------------------------------------------------ quantize + pack (export)
def _cpu_quantize_pack(fns, fmt: QuantFormat, x: Tensor, group_size: int, name: str,
                       rule: dict) -> dict[str, Tensor]:
    x = x.contiguous()
    dt, n, thr = _DTYPES[x.dtype], x.numel(), _threads(x.numel())
    k = x.shape[-1]
    packed = torch.empty((*x.shape[:-1], k // 2), dtype=torch.uint8)
    scale_shape = (*x.shape[:-1], k // group_size)
    if fmt is QuantFormat.INT4:
        scale = torch.empty(scale_shape, dtype=torch.bfloat16)
        bad = fns["int4_quant_pack"](x.data_ptr(), packed.data_ptr(), scale.data_ptr(), dt, n // max(k, 1),
                                     k, group_size, *_int4_params(rule.get("scale_rule", "amax/7"), name), thr)
        _report(bad, name)
        return {"weight_packed": packed.view(torch.int32), "weight_scale": scale,
                "weight_shape": torch.tensor(list(x.shape), dtype=torch.int64)}
    scale = torch.empty(scale_shape, dtype=torch.uint8)
    if fmt is QuantFormat.MXFP4:
        bad = fns["mxfp4_quant_pack"](x.data_ptr(), packed.data_ptr(), scale.data_ptr(), dt, n, thr)
        _report(bad, name)
        return {"weight_packed": packed, "weight_scale": scale}
    g, own = _nv_global(fns, x, rule.get("global_amax"), name)
    bad = fns["nvfp4_quant_pack"](x.data_ptr(), packed.data_ptr(), scale.data_ptr(), g.data_ptr(), dt, n,
                                  x.shape[-2] * k, own, thr)
    _report(bad, name)
    return {"weight_packed": packed, "weight_scale": scale.view(torch.float8_e4m3fn),
            "weight_global_scale": g}


def quantize_pack(fmt: QuantFormat | str, w: Tensor, group_size: int | None = None, *,
                  name: str = "weight", **rule) -> dict[str, Tensor]:
    """``get_format(fmt).pack(get_format(fmt).quantize(w, group_size, name=name, **rule))``,
    fused (CPU); same tensors, bit for bit. Other devices use the oracle."""
    fmt = _fmt(fmt)
    rule = _rule_kwargs(fmt, rule)
    rule.pop("served", None)  # the served weight does not change codes or scales
    oracle = {QuantFormat.INT4: int4, QuantFormat.MXFP4: mxfp4, QuantFormat.NVFP4: nvfp4}[fmt]
    group_size = oracle.DEFAULT_GROUP_SIZE if group_size is None else group_size
    impl = implementation(w.device) if isinstance(w, Tensor) else "oracle"
    if impl.startswith("cpu-"):
        _check(fmt, w, group_size, name)
        per_word = 8 if fmt is QuantFormat.INT4 else 2
        if w.shape[-1] % per_word == 0 and group_size % 2 == 0:
            with torch.no_grad():
                return _cpu_quantize_pack(_load().variants[impl[4:]], fmt, w.detach(), group_size, name, rule)
    return oracle.pack(oracle.quantize(w, group_size, name=name, **rule))
