"""Run the Triton kernels in Triton's CPU interpreter against the oracle (a child process of
tests/test_formats_fused.py: TRITON_INTERPRET must be set before triton is imported).

This checks the kernels' logic (indexing, masks, bit manipulation, the rounding formulas, flags)
without a GPU; the hardware's arithmetic (div.rn, cvt) is checked by the gpu-marked tests."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import test_formats_fused as T  # noqa: E402
from int4_qat.formats import _triton_kernels as tk, finite_check, get_format, raise_if_nonfinite  # noqa: E402
from int4_qat.formats._common import QuantFormat  # noqa: E402


def main() -> int:
    assert tk.triton is not None, tk.why_unavailable()
    checked = 0
    for dtype in T.DTYPES:
        for fmt, g, rule in T.CASES:
            if not tk.supports(QuantFormat(fmt), g):
                continue
            for seed, regime in enumerate(("normal", "wide", "ties", "tiny", "huge")):
                w = T.make(seed, (2, 3, 2 * g), dtype, regime, fmt, g)
                r = T._rule(rule, w)
                try:
                    want = get_format(fmt).fake_quantize(w, g, **r)
                except ValueError:
                    continue
                got = tk.fake_quantize(QuantFormat(fmt), w, g, "w", r)
                T.assert_same(got, want)
                checked += 1
        for fmt, g in (("int4", 32), ("mxfp4", 32), ("nvfp4", 16)):   # non-finite: flag, NaN
            w = T.make(0, (4, 64), dtype, "normal", fmt, g)
            w[1, 2] = float("nan")
            with finite_check("defer"):
                out = tk.fake_quantize(QuantFormat(fmt), w, g, f"{fmt}.bad", {})
            assert out[1, :g].isnan().all() and out[0].isfinite().all()
            try:
                raise_if_nonfinite()
                raise AssertionError("non-finite weight not flagged")
            except ValueError as exc:
                assert f"{fmt}.bad" in str(exc)
    print(f"triton interpreter: {checked} cases bit-identical to the oracle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
