"""`make demo` in its reduced configuration (``tools/demo.py --ci``) and the report code on its own.

The end-to-end test runs the real CLI in a subprocess (its own process group and Megatron state,
as ``make demo`` does) and checks the numbers it wrote: every row, QAT beating PTQ for INT4, the
reloaded export reproducing the training-side fake-quant loss, valid PNG plots.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from int4_qat.demo.report import (PNG_SIGNATURE, Curve, Row, format_table, is_png, rows_from_json,
                                  write_report)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("int4-g32", "int4-g128", "mxfp4", "nvfp4")
PLOTS = ("loss_curves.png", "eval_loss.png", "checkpoint_size.png")


# ----------------------------------------------------------------------------- report only
def _rows():
    return [
        Row("bf16", "trained", 2.50, checkpoint_bytes=2_000_000, mean_abs_dlogprob=1e-7,
            max_abs_dlogprob=1e-6, kl=1e-9),
        Row("bf16", "continued", 2.40, checkpoint_bytes=2_000_000),
        Row("int4-g32", "ptq", 2.60, delta_vs_bf16=0.10, checkpoint_bytes=800_000),
        Row("int4-g32", "qat", 2.45, delta_vs_bf16=0.05, checkpoint_bytes=800_000),
        Row("fp8-e4m3", "ptq", 2.51, measured_on="training-side", note="training-side only"),
    ]


def test_report_table_json_and_plots(tmp_path):
    rows = _rows()
    curves = [Curve("bf16", [1, 2, 3], [3.0, 2.8, 2.7], eval=[(3, 2.75)]),
              Curve("QAT int4-g32", [4, 5], [2.7, 2.6])]
    paths = write_report(tmp_path, rows, curves, {"settings": {"steps": 3}})
    text = format_table(rows)
    assert text.splitlines()[0].split()[:3] == ["format", "method", "eval"]
    assert "2.5100*" in text                    # training-side rows are starred
    assert "+0.1000" in text and "800,000" in text
    md = (tmp_path / "summary.md").read_text()
    assert md.count("\n| ") == len(rows) + 1    # header + one line per row
    assert "training-side only" in md
    import re
    header = next(l for l in md.splitlines() if l.startswith("| format"))
    assert len(re.findall(r"(?<!\\)\|", header)) == 12      # 11 columns: no bare | inside a cell
    assert "![loss curves](loss_curves.png)" in md
    back = rows_from_json(paths["summary.json"])
    assert [(r.format, r.method, r.eval_loss) for r in back] == [(r.format, r.method, r.eval_loss) for r in rows]
    js = json.loads(paths["summary.json"].read_text())
    assert js["rows"][0]["ppl"] == pytest.approx(math.exp(2.5))
    assert js["curves"][0]["eval"] == [[3, 2.75]]
    for name in PLOTS:
        p = tmp_path / name
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        assert is_png(p)


def test_report_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="curve 'x': 2 steps but 1 losses"):
        Curve("x", [1, 2], [1.0])
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    assert not is_png(tmp_path / "bad.png")
    from int4_qat.demo.report import plot_checkpoint_sizes, plot_loss_curves

    with pytest.raises(ValueError, match="no curves"):
        plot_loss_curves(tmp_path / "c.png", [])
    with pytest.raises(ValueError, match="checkpoint_bytes"):
        plot_checkpoint_sizes(tmp_path / "s.png", [Row("int4-g32", "ptq", 1.0)])


def test_config_validation():
    from int4_qat.demo import DemoConfig

    with pytest.raises(ValueError, match=r"--formats: unknown \['int3'\]"):
        DemoConfig(formats=("int3",))
    with pytest.raises(ValueError, match="--hidden 64: int4-g128 needs hidden % 128 == 0"):
        DemoConfig(hidden=64, heads=4, formats=("int4-g128",))
    with pytest.raises(ValueError, match="--global-batch 6 must be a multiple of --micro-batch 4"):
        DemoConfig(global_batch=6, micro_batch=4)
    assert DemoConfig(qat_steps=10, global_batch=4, micro_batch=4, seq_length=64).qat_tokens == 2560


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_two_windows_by_hand():
    """d = [0, 1]: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 2.5th
    percentile is 0 and the 97.5th is 1 (P(0) = P(1) = 1/4 > 2.5 %); the point estimate 0.5."""
    from int4_qat.demo.stats import bootstrap_indices, paired_delta

    iv = paired_delta([3.0, 5.0], [3.0, 4.0], resamples=2000, seed=0)
    assert (iv.value, iv.lo, iv.hi) == (0.5, 0.0, 1.0)
    assert not iv.significant
    idx = bootstrap_indices(2, 2000, seed=0)
    assert idx.shape == (2000, 2) and torch.equal(idx, bootstrap_indices(2, 2000, seed=0))
    means = idx.double().mean(dim=1)            # = resampled mean of d = [0, 1]
    assert abs(float((means == 0.5).double().mean()) - 0.5) < 0.04


def test_bootstrap_is_paired():
    """A constant per-window shift on windows of very different difficulty: the paired interval
    has zero width (the difficulty cancels); an unpaired bootstrap would be ~±0.3 wide."""
    from int4_qat.demo.stats import paired_delta

    g = torch.Generator().manual_seed(1)
    base = 1.0 + 4.0 * torch.rand(200, generator=g, dtype=torch.float64)
    iv = paired_delta(base + 0.01, base)
    assert iv.value == pytest.approx(0.01) and iv.lo == pytest.approx(0.01) and iv.hi == pytest.approx(0.01)
    assert iv.significant
    with pytest.raises(ValueError, match="same eval windows"):
        paired_delta(base, base[:-1])
    with pytest.raises(ValueError, match="at least 2 eval windows"):
        paired_delta([1.0], [1.0])


def test_bootstrap_identical_vs_clearly_worse_and_coverage():
    from int4_qat.demo.stats import paired_delta

    g = torch.Generator().manual_seed(2)
    ref = 2.0 + torch.rand(256, generator=g, dtype=torch.float64)
    same = paired_delta(ref, ref.clone())
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0) and not same.significant
    noise = 0.02 * torch.randn(256, generator=g, dtype=torch.float64)
    noisy = paired_delta(ref + noise - noise.mean(), ref)     # same mean, per-window noise
    assert noisy.lo < 0.0 < noisy.hi and not noisy.significant
    worse = paired_delta(ref + 0.01 + noise, ref)             # 0.01 nats worse, noise sd 0.02
    assert worse.lo > 0.0 and worse.significant and worse.lo < 0.01 + float(noise.mean()) < worse.hi
    # the 95 % interval covers the true mean in ~95 % of 400 repeated experiments (normal data,
    # n = 100; seeded, so a fixed number: 383/400 here, a 90 % interval would give 366)
    g, hits = torch.Generator().manual_seed(2), 0
    for k in range(400):
        d = 0.1 + torch.randn(100, generator=g, dtype=torch.float64)
        iv = paired_delta(d, torch.zeros(100, dtype=torch.float64), resamples=500, seed=k)
        hits += iv.lo < 0.1 < iv.hi
    assert 0.93 <= hits / 400 <= 0.985, hits


def test_gap_closed_ratio():
    from int4_qat.demo.stats import gap_closed

    g = torch.Generator().manual_seed(3)
    trained = 2.0 + torch.rand(300, generator=g, dtype=torch.float64)
    cont = trained - 0.05
    # PTQ costs exactly 0.04 per window, QAT 0.01: QAT closes 75 %, with no spread
    iv = gap_closed(trained + 0.04, trained, cont + 0.01, cont)
    assert iv.value == pytest.approx(0.75) and iv.lo == pytest.approx(0.75) and iv.hi == pytest.approx(0.75)
    # QAT's per-window cost tracks PTQ's (dq = dp / 4, noisy): every joint resample of the windows
    # gives exactly 75 %; resampling numerator and denominator apart would give a wide interval
    e = 0.03 * torch.randn(300, generator=g, dtype=torch.float64)
    iv = gap_closed(trained + 0.04 + e, trained, cont + 0.01 + e / 4, cont)
    assert iv.lo == pytest.approx(0.75) and iv.hi == pytest.approx(0.75)
    # with per-window noise the estimate is 1 - mean(dq) / mean(dp), the interval around it
    e1, e2 = (0.02 * torch.randn(300, generator=g, dtype=torch.float64) for _ in range(2))
    iv = gap_closed(trained + 0.04 + e1, trained, cont + 0.01 + e2, cont)
    assert iv.value == pytest.approx(1 - float((0.01 + e2).mean() / (0.04 + e1).mean()))
    assert iv.lo < iv.value < iv.hi and iv.lo > 0.5 and iv.hi < 1.0


def _wrows(ptq_shift: float, qat_shift: float, n: int = 200, noise: float = 0.01, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    t = 2.0 + torch.rand(n, generator=g, dtype=torch.float64)
    c = t - 0.05

    def row(fmt, method, w):
        return Row(fmt, method, float(w.mean()), window_losses=w.tolist())
    eps = [noise * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2)]
    return [row("bf16", "trained", t), row("bf16", "continued", c),
            row("int4-g128", "ptq", t + ptq_shift + eps[0]), row("int4-g128", "qat", c + qat_shift + eps[1]),
            row("fp8-e4m3", "ptq", t + eps[0] - eps[0].mean())]


def test_summary_wording_follows_significance():
    from int4_qat.demo.compare import assign_deltas, headlines

    rows = _wrows(0.02, 0.002)                 # both gaps far outside noise sd/sqrt(n) ~ 0.0007
    assign_deltas(rows)
    by = {(r.format, r.method): r for r in rows}
    assert by[("int4-g128", "ptq")].reference == "bf16 trained"
    assert by[("int4-g128", "qat")].reference == "bf16 continued"
    assert by[("int4-g128", "ptq")].significant and by[("int4-g128", "qat")].significant
    assert by[("fp8-e4m3", "ptq")].significant is False and by[("bf16", "trained")].significant is None
    h = headlines(rows)
    assert h[0].startswith("int4-g128: PTQ Δ +0.02") and "(significant)" in h[0]
    closed = 1 - by[("int4-g128", "qat")].delta_vs_bf16 / by[("int4-g128", "ptq")].delta_vs_bf16
    assert 0.5 < closed < 1.0 and f"QAT closes {100 * closed:.0f}% [" in h[0] and h[0].endswith("of the PTQ gap")
    assert h[1].startswith("fp8-e4m3 ptq: Δ") and "within noise: interval covers 0" in h[1]
    table = format_table(rows)
    assert "signif." in table and " no " in table and " yes " in table
    # PTQ gap within noise: no percentage at all
    rows = _wrows(0.0003, 0.0002, noise=0.02)
    assign_deltas(rows)
    h = headlines(rows)[0]
    assert "PTQ Δ" in h and "within noise" in h and "no PTQ gap to close" in h and "%" not in h
    # PTQ significantly *better* than BF16: no gap either, no percentage
    rows = _wrows(-0.02, 0.0)
    assign_deltas(rows)
    h = headlines(rows)[0]
    assert "(significant)" in h and "no PTQ gap to close" in h and "%" not in h
    # significant PTQ gap, QAT no better: the closed fraction covers 0 and is not claimed
    rows = _wrows(0.01, 0.01, noise=0.01)
    assign_deltas(rows)
    h = headlines(rows)[0]
    assert "not significant" in h and "QAT closes" not in h
    # an extra evaluator's column gets the same treatment (gaps(extra=...)): the same numbers
    # when it holds the same losses, others when it holds others
    from int4_qat.demo.compare import gap_line, gaps

    rows = _wrows(0.02, 0.002)
    for r in rows:
        r.extra["x"] = {"loss": r.eval_loss, "window_losses": list(r.window_losses)}
        r.extra["y"] = {"loss": r.eval_loss + 0.001 * (r.method == "qat"),
                        "window_losses": [v + 0.001 * (r.method == "qat") for v in r.window_losses]}
    assign_deltas(rows)
    assert [gap_line(g) for g in gaps(rows, extra="x")] == [gap_line(g) for g in gaps(rows)] != []
    assert gaps(rows, extra="y")[0].qat.value == pytest.approx(gaps(rows)[0].qat.value + 0.001)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo.py"), "--ci",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


def _main_table(md_path) -> str:
    """The main table of summary.md: from its header line to the first blank line."""
    md = md_path.read_text()
    at = md.index("\n| format")
    return md[at:md.index("\n\n", at)]


@pytest.mark.slow
def test_demo_every_row(ci_run):
    out, stdout, js = ci_run
    got = {(r["format"], r["method"]) for r in js["rows"]}
    want = {("bf16", "trained"), ("bf16", "continued"), ("int4-awq", "awq"), ("fp8-e4m3", "ptq")}
    want |= {(f, m) for f in FORMATS for m in ("ptq", "qat")}
    assert got == want
    for r in js["rows"]:
        assert math.isfinite(r["eval_loss"]) and 0.5 < r["eval_loss"] < 6.0, r
        if r["format"] in FORMATS:
            assert r["measured_on"] == "export" and os.path.isdir(r["export_dir"])
            assert r["checkpoint_bytes"] > 0 and r["kl"] >= 0.0
    # the terminal shows the table; summary.md holds it
    assert "int4-g128" in stdout and "mean|Δlogp|" in stdout
    assert _main_table(out / "summary.md").count("\n| ") == len(want) + 1     # header + rows
    # packed 4-bit experts: every quantized export is far smaller than the BF16 checkpoint
    size = {(r["format"], r["method"]): r["checkpoint_bytes"] for r in js["rows"]}
    for f in FORMATS:
        assert size[(f, "qat")] < 0.6 * size[("bf16", "trained")]


@pytest.mark.slow
def test_demo_int4_qat_beats_ptq(ci_run):
    rows = {(r["format"], r["method"]): r for r in ci_run[2]["rows"]}
    for f in ("int4-g32", "int4-g128"):
        assert rows[(f, "qat")]["eval_loss"] < rows[(f, "ptq")]["eval_loss"] - 1e-3
        assert rows[(f, "qat")]["delta_vs_bf16"] == pytest.approx(
            rows[(f, "qat")]["eval_loss"] - rows[("bf16", "continued")]["eval_loss"])


@pytest.mark.slow
def test_demo_reloaded_export_matches_training_side(ci_run):
    checked = 0
    for r in ci_run[2]["rows"]:
        if r["measured_on"] != "export":
            continue
        assert abs(r["eval_loss"] - r["train_side_loss"]) < 1e-4, r
        # the same served weights on both sides (NVFP4 too: gate/up share one global scale, as
        # training fake-quantizes the fused fc1): only fp32 summation order differs
        assert r["mean_abs_dlogprob"] < 1e-5 and r["max_abs_dlogprob"] < 1e-4, r
        assert r["kl"] < 1e-8, r
        # a server computing in bf16 adds activation rounding, orders of magnitude above that
        assert r["bf16_mean_abs_dlogprob"] > 100 * r["mean_abs_dlogprob"], r
        checked += 1
    assert checked == 2 + 2 * len(FORMATS)     # bf16 trained/continued + (ptq, qat) per format


@pytest.mark.slow
def test_demo_intervals_and_wording(ci_run):
    """Every compared row carries its paired-bootstrap interval, recomputable from the per-window
    losses in summary.json, and the summary states each row's significance as its interval does."""
    from int4_qat.demo.stats import paired_delta

    out, stdout, js = ci_run
    rows = {(r["format"], r["method"]): r for r in js["rows"]}
    boot = js["meta"]["bootstrap"]
    assert boot["windows"] == 64 and boot["resamples"] == 2000
    ref = {"ptq": rows[("bf16", "trained")], "awq": rows[("bf16", "trained")],
           "qat": rows[("bf16", "continued")]}
    lines = js["headlines"]
    md = (out / "summary.md").read_text()
    for (f, m), r in rows.items():
        assert len(r["window_losses"]) == 64
        assert sum(r["window_losses"]) / 64 == pytest.approx(r["eval_loss"], abs=1e-9)
        if f == "bf16":
            assert r["delta_lo"] is None
            continue
        iv = paired_delta(r["window_losses"], ref[m]["window_losses"], resamples=boot["resamples"],
                          seed=boot["seed"])
        assert (r["delta_vs_bf16"], r["delta_lo"], r["delta_hi"]) == pytest.approx((iv.value, iv.lo, iv.hi))
        assert r["delta_lo"] <= r["delta_vs_bf16"] <= r["delta_hi"]
        # "<format>: PTQ Δ v [lo, hi] nats (state), QAT Δ ... (state); ..." / "<fmt> <method>: Δ ..."
        line = next(l for l in lines if l.startswith(f"{f}:" if f in FORMATS else f"{f} {m}:"))
        at = line.index({"ptq": "PTQ Δ", "qat": "QAT Δ"}[m] if f in FORMATS else "Δ")
        said = line[at:line.index(")", at) + 1]
        assert iv.fmt() in said
        assert ("(significant" in said) == iv.significant, (line, iv)
        assert ("within noise" in said) == (not iv.significant), (line, iv)
        assert line in stdout and f"- {line}" in md
    for f in FORMATS:           # a percentage only where the PTQ gap is significant
        line = next(l for l in lines if l.startswith(f"{f}:"))
        sig = rows[(f, "ptq")]["delta_lo"] > 0 or rows[(f, "ptq")]["delta_hi"] < 0
        assert ("%" in line) == sig, line


@pytest.mark.slow
def test_demo_plots_are_pngs(ci_run):
    out = ci_run[0]
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    for name in PLOTS:
        p = out / name
        assert p.read_bytes()[:8] == PNG_SIGNATURE, name
        img = plt.imread(str(p))
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, (name, img.shape)


LLAMA_ROWS = {("bf16", "trained"), ("bf16", "continued")} | {
    (f, m) for f in ("int4-g32", "mxfp4") for m in ("ptq", "qat")}


def _gguf_types(path) -> dict:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_demo_llama_cpp_column(ci_run):
    """The llama.cpp column of the --ci run: the BF16 GGUF's loss equals transformers' BF16 loss
    and the Q4_0 / MXFP4 losses the INT4 g32 / MXFP4 export losses (tolerances: llama.cpp's own
    arithmetic, bf16 activations for BF16 weights and Q8_0 activations for 4-bit weights; its
    mean |Δ logprob| against fp32 is <= 8.1e-4 in tests/test_gguf.py, measured here: |Δ loss| <=
    3e-4), per window the two engines see the same quantization effect, every Δ has its
    interval, and every file holds the types it should."""
    from int4_qat.demo.compare import REFERENCE
    from int4_qat.demo.stats import paired_delta

    out, stdout, js = ci_run
    rows = {(r["format"], r["method"]): r for r in js["rows"]}
    assert {k for k, r in rows.items() if "llama.cpp" in r["extra"]} == LLAMA_ROWS
    boot = js["meta"]["bootstrap"]
    for f, m in sorted(LLAMA_ROWS):
        r, col = rows[(f, m)], rows[(f, m)]["extra"]["llama.cpp"]
        wl = torch.tensor(col["window_losses"], dtype=torch.float64)
        assert wl.shape == (64,) and float(wl.mean()) == pytest.approx(col["loss"], abs=1e-12)
        assert abs(col["loss"] - r["eval_loss"]) < (1e-3 if f == "bf16" else 2e-3), (f, m, col["loss"], r["eval_loss"])
        if f == "bf16":
            assert "delta" not in col
            continue
        ref = rows[("bf16", REFERENCE[m])]
        ref_wl = torch.tensor(ref["extra"]["llama.cpp"]["window_losses"], dtype=torch.float64)
        iv = paired_delta(wl, ref_wl, resamples=boot["resamples"], seed=boot["seed"])
        assert (col["delta"], col["delta_lo"], col["delta_hi"]) == pytest.approx((iv.value, iv.lo, iv.hi))
        assert abs(col["delta"] - r["delta_vs_bf16"]) < 1e-3
        # per window, the quantization effect llama.cpp sees is the one transformers sees (measured
        # 0.965-0.986): a GGUF of other weights (or of the unquantized model) would not correlate
        hf = (torch.tensor(r["window_losses"], dtype=torch.float64)
              - torch.tensor(ref["window_losses"], dtype=torch.float64))
        assert float(torch.corrcoef(torch.stack([wl - ref_wl, hf]))[0, 1]) > 0.8, (f, m)
    # the section's gap lines: the column's own intervals, the headlines' wording
    sec = js["meta"]["sections"]["llama.cpp"]
    md = (out / "summary.md").read_text()
    assert len(sec["headlines"]) == 2
    for f in ("int4-g32", "mxfp4"):
        line = next(x for x in sec["headlines"] if x.startswith(f"llama.cpp {f}: PTQ Δ"))
        for m in ("ptq", "qat"):
            c = rows[(f, m)]["extra"]["llama.cpp"]
            assert f"{c['delta']:+.4f} [{c['delta_lo']:+.4f}, {c['delta_hi']:+.4f}]" in line
        assert line in stdout and f"- {line}" in md
    # the files: converted from the rows' exports, with the types they should hold
    files = {f["row"]: f for f in sec["files"]}
    assert set(files) == {f"{f} {m}" for f, m in LLAMA_ROWS}
    for name, f in files.items():
        types = _gguf_types(f["path"])
        want = {"bf16": "BF16", "int4-g32": "Q4_0", "mxfp4": "MXFP4"}[name.split()[0]]
        assert f["ggml_type"] == want and f["path"] == str(out / "gguf" / f"{name.replace(' ', '-')}.gguf")
        assert types["blk.0.ffn_up_exps.weight"] == want and types["blk.1.attn_q.weight"] == want  # all-linear
        assert types["token_embd.weight"] == "BF16" and types["blk.0.ffn_gate_inp.weight"] == "F32"
        if want == "Q4_0":  # the export serves bf16(q*s), llama.cpp q*d: same codes and scales
            assert 0 < f["mismatched"] and 0 < f["max_rel"] <= 2.0**-8
        else:
            assert f["exact"] and f["mismatched"] == 0
    # the tokens/s table: BF16 vs Q4_0 vs MXFP4, positive, printed, in summary.md, plotted
    bench = sec["tokens_per_s"]
    assert [(d["row"], d["type"]) for d in bench] == [
        ("bf16 trained", "BF16"),
        ("int4-g32 qat", "Q4_0"),
        ("mxfp4 qat", "MXFP4"),
    ]
    for d in bench:
        for k in ("pp", "pp_cpu", "tg", "tg_cpu", "pp_cpu_vs_ref", "tg_cpu_vs_ref"):
            assert math.isfinite(d[k]) and d[k] > 0, (d["type"], k)
        assert d["pp_cpu_range"][0] <= d["pp_cpu"] <= d["pp_cpu_range"][1]
        assert d["active_weight_bytes"] < d["bytes"]
    assert bench[0]["pp_cpu_vs_ref"] == bench[0]["tg_cpu_vs_ref"] == 1.0
    assert bench[1]["active_weight_bytes"] < 0.45 * bench[0]["active_weight_bytes"]  # 4.5 vs 16 bits
    head = stdout[stdout.index("llama.cpp tokens/s on this machine") :]
    for d in bench:
        assert re.search(rf"\n{d['row']}\s+{d['type']}\s", head), d["row"]
    assert "llama.cpp loss" in stdout and "llama.cpp Δ [95% CI]" in stdout
    assert "## llama.cpp" in md and "### llama.cpp tokens/s on this machine" in md
    assert "| bf16 trained | BF16 |" in md and "no prediction for a 30 B model" in md
    assert is_png(out / "llama_cpp_tokens_per_s.png")
    assert js["meta"]["config"]["llama_cpp"] is True
    assert any("llama.cpp" in k for k in js["meta"]["stage_seconds"])


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory):
    """A tiny Qwen3-MoE HF checkpoint (fp32, 2-D weights x6 so that quantization bites) with its
    INT4 g32 and MXFP4 compressed-tensors exports (all-linear), real-text eval windows, and the
    per-window losses transformers computes for each of the three."""
    from int4_qat.data import ByteTokenizer, pack_documents, system_corpus
    from int4_qat.demo.evaluate import EvalSet, load_served_model, served_logits
    from int4_qat.demo.stats import window_losses
    from int4_qat.export import export_checkpoint
    from int4_qat.testing import make_tiny_hf_checkpoint, rewrite_checkpoint

    root = tmp_path_factory.mktemp("llama")
    hf = make_tiny_hf_checkpoint("qwen3_moe", root / "hf" / "bf16-trained", dtype=torch.float32)
    rewrite_checkpoint(hf, lambda n, t: 6 * t if t.ndim == 2 else t)
    dirs = {"bf16": hf}
    for name, kw in (("int4-g32", {"fmt": "int4", "group_size": 32}), ("mxfp4", {"fmt": "mxfp4"})):
        dirs[name] = root / "export" / f"{name}-qat"
        export_checkpoint(str(hf), str(dirs[name]), scope="all-linear", progress=False, **kw)
    w = pack_documents(system_corpus(max_docs=60), ByteTokenizer(320), 33)[:12]
    evalset = EvalSet(w[:, :-1].contiguous(), w[:, 1:].contiguous(), batch=4)
    hf_losses = {
        k: window_losses(served_logits(load_served_model(d)[0], evalset).target_logprobs) for k, d in dirs.items()
    }
    return root, dirs, evalset, hf_losses


def test_llama_cpp_evaluator_runs_what_the_export_holds(llama_exports):
    """F32 control: llama.cpp's per-window losses of the unquantized GGUF equal transformers' fp32
    ones to fp32 noise (labels, positions, one forward per window: all right). The Q4_0 / MXFP4
    files carry their export's quantized weights: their llama.cpp losses sit close to the export's
    transformers losses (Q8_0 activations apart) and far from the unquantized model's."""
    from int4_qat.demo.llama_cpp import LlamaCppEvaluator

    root, dirs, evalset, hf = llama_exports
    ev = LlamaCppEvaluator(root / "f32", float_type="f32")
    assert [ev.accepts(f, "ptq") for f in ("bf16", "int4-g32", "mxfp4", "int4-g128", "nvfp4", "fp8-e4m3")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    ll = {k: ev.window_losses(d, evalset) for k, d in dirs.items()}
    assert ll["bf16"].shape == (12,) and float((ll["bf16"] - hf["bf16"]).abs().max()) < 1e-5  # measured 5e-7
    files = {os.path.basename(f.path): f for f in ev.files.values()}
    assert set(files) == {"bf16-trained.gguf", "int4-g32-qat.gguf", "mxfp4-qat.gguf"}
    for k, want in (("int4-g32", "Q4_0"), ("mxfp4", "MXFP4")):
        f = files[f"{k}-qat.gguf"]
        assert f.ggml_type == want and _gguf_types(f.path)["blk.0.attn_q.weight"] == want
        near, far = (float((ll[k] - hf[x]).abs().mean()) for x in (k, "bf16"))
        assert near < 0.25 * far, (k, near, far)  # measured 0.016 vs 0.11-0.14
        # the check can fail: the unquantized file's losses are no stand-in for the export's
        assert not float((ll["bf16"] - hf[k]).abs().mean()) < 0.25 * float((ll["bf16"] - hf["bf16"]).abs().mean())
    assert files["mxfp4-qat.gguf"].exact and files["mxfp4-qat.gguf"].mismatched == 0
    q4 = files["int4-g32-qat.gguf"]  # served: bf16 (Marlin) vs llama.cpp's exact q*d
    assert not q4.exact and 0 < q4.max_rel <= 2.0**-8
    assert _gguf_types(files["bf16-trained.gguf"].path)["output.weight"] == "F32"
    with pytest.raises(ValueError, match="model_type 'gpt_oss' is not exported to GGUF"):
        ev.check({"model_type": "gpt_oss"})


def test_llama_cpp_section_tokens_per_s(llama_exports):
    """The report section: per-file table, tokens/s of BF16 vs Q4_0 vs MXFP4 (positive, ratios to
    the first file), the honest reading of them, a PNG plot, JSON data."""
    from int4_qat.demo.llama_cpp import LlamaCppEvaluator

    root, dirs, evalset, hf = llama_exports
    ev = LlamaCppEvaluator(root / "out", bench_rounds=2, bench_windows=4, decode_tokens=16)
    rows = []
    for (fmt, method), k in (
        (("bf16", "trained"), "bf16"),
        (("int4-g32", "qat"), "int4-g32"),
        (("mxfp4", "qat"), "mxfp4"),
        (("int4-g128", "qat"), None),
    ):
        r = Row(
            fmt,
            method,
            float(hf[k].mean()) if k else 3.0,
            export_dir=str(dirs[k]) if k else "/x",
            checkpoint_bytes=1000,
        )
        if k:
            wl = ev.window_losses(dirs[k], evalset)
            r.extra[ev.name] = {"loss": float(wl.mean()), "window_losses": wl.tolist()}
        rows.append(r)
    assert ev.section([]) is not None and ev.section([]).data["tokens_per_s"] == []  # nothing to time
    sec = ev.section(rows)
    bench = sec.data["tokens_per_s"]
    assert [d["type"] for d in bench] == ["BF16", "Q4_0", "MXFP4"]
    assert all(d[k] > 0 for d in bench for k in ("pp", "pp_cpu", "tg", "tg_cpu"))
    assert (
        bench[0]["pp_cpu_vs_ref"] == 1.0
        and bench[0]["pp_tokens"] == evalset.tokens.shape[1]
        and bench[0]["pp_windows"] == 4
    )
    assert [f["row"] for f in sec.data["files"]] == ["bf16 trained", "int4-g32 qat", "mxfp4 qat"]
    assert sec.data["files"][1]["llama_cpp_loss"] == pytest.approx(rows[1].extra[ev.name]["loss"])
    for text in (sec.text, sec.markdown):
        assert "prompt tok/CPU-s" in text and "decode × BF16" in text and "Q4_0" in text
    assert "fewer bytes" in sec.markdown and "no prediction for a 30 B model" in sec.markdown
    # the reading of the ratios follows the numbers: decode gaining ~nothing of the byte ratio
    # (the demo's model), all of it (memory-bound), or part of it
    from int4_qat.demo.llama_cpp import _honesty

    fake = [
        dict(bench[0], active_weight_bytes=700_000, tg_cpu=16_000.0, tg_cpu_vs_ref=1.0, pp_cpu_vs_ref=1.0),
        dict(bench[1], active_weight_bytes=260_000, tg_cpu_vs_ref=1.15, pp_cpu_vs_ref=1.0),
    ]
    assert "4-bit weights barely change it" in _honesty(fake) and "2.7× fewer bytes" in _honesty(fake)
    fake[1]["tg_cpu_vs_ref"] = 2.5
    assert "decode follows the weight bytes" in _honesty(fake)
    fake[1]["tg_cpu_vs_ref"] = 1.8
    assert "gains part of the byte ratio" in _honesty(fake)
    assert is_png(sec.plots["llama_cpp_tokens_per_s.png"])
    paths = write_report(root / "out", rows, [Curve("bf16", [1, 2], [3.0, 2.9])], {}, sections=[sec])
    assert paths["llama_cpp_tokens_per_s.png"] == sec.plots["llama_cpp_tokens_per_s.png"]
    js = json.loads(paths["summary.json"].read_text())
    assert js["meta"]["sections"]["llama.cpp"]["tokens_per_s"][1]["type"] == "Q4_0"
    assert "### llama.cpp tokens/s on this machine" in paths["summary.md"].read_text()


def test_llama_cpp_flag_and_check_hook(tmp_path, monkeypatch):
    """--no-llama-cpp reaches the config; without llama-cpp-python the config says how to go on;
    an evaluator's check hook refuses before anything is trained."""
    import importlib.util

    from int4_qat.demo import DemoConfig
    from int4_qat.demo.pipeline import _Demo

    spec = importlib.util.spec_from_file_location("demo_cli", os.path.join(REPO, "tools", "demo.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.config_from_args(cli.parse_args(["--no-llama-cpp"])).llama_cpp is False
    assert cli.config_from_args(cli.parse_args(["--ci"])).llama_cpp is True
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    with pytest.raises(ValueError, match="llama-cpp-python is not installed .* pass --no-llama-cpp"):
        DemoConfig()
    assert DemoConfig(llama_cpp=False).to_dict()["llama_cpp"] is False
    monkeypatch.undo()

    class Refuses:
        name = "never"

        def check(self, config):
            raise ValueError(f"cannot serve {config['model_type']}")

    with pytest.raises(ValueError, match="cannot serve qwen3_moe"):
        _Demo(DemoConfig(out=tmp_path, llama_cpp=False), lambda s: None, [Refuses()]).stage_train()
    assert not (tmp_path / "train").exists()


# ----------------------------------------------------------------------------- baselines
@pytest.fixture(scope="module")
def tiny_megatron():
    import torch

    from int4_qat.arch import build_model, load_arch
    from int4_qat.compat import cpu

    cpu.init_single_process_gloo(seed=7)
    arch = load_arch(os.path.join(REPO, "recipes", "models", "tiny-qwen3-moe"))

    def make():
        torch.manual_seed(7)
        return build_model(arch, use_te=False, params_dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(2)]
    return make, calib


def test_fp8_baseline_is_per_channel_e4m3_on_experts_only(tiny_megatron):
    import torch

    from int4_qat.demo.baselines import enabled_weight_quantizers, fp8_weight_only

    make, calib = tiny_megatron
    model = fp8_weight_only(make(), calib, scope="experts")
    names = enabled_weight_quantizers(model)
    assert names and all(".mlp.experts.local_experts." in n for n in names)
    assert not any("router" in n or "self_attention" in n or "output_layer" in n for n in names)
    lin = model.decoder.layers[0].mlp.experts.local_experts[3].linear_fc1
    w = lin.weight.detach()
    with torch.no_grad():
        got = lin.weight_quantizer(w)
    # reference: torch's own E4M3 cast with one scale per output row, amax / 448
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    ref = (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    assert not torch.equal(got, w)  # it did quantize
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)


def test_awq_baseline_calibrates_expert_inputs(tiny_megatron):
    import torch

    from int4_qat.demo.baselines import awq_int4, enabled_weight_quantizers, scope_quantizer_globs

    make, calib = tiny_megatron
    model = awq_int4(make(), calib, scope="experts", group_size=32)
    names = enabled_weight_quantizers(model)
    assert len(names) == 2 * 8 * 2  # fc1 + fc2, 8 experts, 2 layers
    lin = model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1
    pqs = getattr(lin.input_quantizer, "_pre_quant_scale", None)
    assert pqs is not None and pqs.shape == (lin.weight.shape[1],) and torch.isfinite(pqs).all()
    assert model.decoder.layers[1].mlp.router.weight.requires_grad is not None
    assert (
        not hasattr(model.decoder.layers[1].mlp.router, "weight_quantizer")
        or not model.decoder.layers[1].mlp.router.weight_quantizer.is_enabled
    )
    with pytest.raises(ValueError, match="scope 'dense'"):
        scope_quantizer_globs("dense")


class _ServedBf16:
    """A real extra evaluator for the seam test: the export reloaded by transformers computing in
    bf16 (what a bf16 server's activations do to the loss)."""

    name = "hf-bf16"

    def __init__(self):
        self.calls = []

    def accepts(self, fmt, method):
        return (fmt, method) in {("bf16", "trained"), ("int4-g32", "ptq")}

    def window_losses(self, export_dir, evalset):
        from int4_qat.demo.evaluate import load_served_model, served_logits
        from int4_qat.demo.stats import window_losses

        self.calls.append(os.path.basename(export_dir))
        model, _ = load_served_model(export_dir)
        return window_losses(served_logits(model.to(torch.bfloat16), evalset).target_logprobs)


def test_extra_evaluator_column(tiny_megatron, tmp_path):
    """The seam for a further consumer of the exports: run on the rows it accepts, its per-window
    losses paired against its own BF16 reference, one column pair in the table."""
    from int4_qat.arch import load_arch
    from int4_qat.data import ByteTokenizer, pack_documents, system_corpus
    from int4_qat.demo import DemoConfig
    from int4_qat.demo.compare import assign_deltas
    from int4_qat.demo.evaluate import EvalSet
    from int4_qat.demo.pipeline import _Demo
    from int4_qat.recipe import QuantSection

    make, _ = tiny_megatron
    ev = _ServedBf16()
    demo = _Demo(DemoConfig(out=tmp_path, formats=("int4-g32",)), lambda m: None, [ev])
    demo.arch = load_arch(os.path.join(REPO, "recipes", "models", "tiny-qwen3-moe"))
    w = pack_documents(system_corpus(max_docs=40), ByteTokenizer(320), 32)[:12]
    demo.evalset = EvalSet(w[:, :-1].contiguous(), w[:, 1:].contiguous(), batch=4)
    demo.evaluate(make(), "bf16", "trained")
    demo.evaluate(make(), "bf16", "continued")
    scheme = QuantSection(format="int4", group_size=32, scope="experts").scheme()
    demo.evaluate(scheme.apply(make()), "int4-g32", "ptq")
    assert ev.calls == ["bf16-trained", "int4-g32-ptq"]  # HF dir for bf16, the export else
    rows = {(r.format, r.method): r for r in demo.rows}
    assert "hf-bf16" not in rows[("bf16", "continued")].extra
    for r in (rows[("bf16", "trained")], rows[("int4-g32", "ptq")]):
        col = r.extra["hf-bf16"]
        assert len(col["window_losses"]) == 12
        assert col["loss"] != r.eval_loss and abs(col["loss"] - r.eval_loss) < 0.05  # bf16 compute
    assign_deltas(demo.rows)
    col, ref = rows[("int4-g32", "ptq")].extra["hf-bf16"], rows[("bf16", "trained")].extra["hf-bf16"]
    assert col["delta"] == pytest.approx(col["loss"] - ref["loss"])
    assert col["delta_lo"] <= col["delta"] <= col["delta_hi"]
    table = format_table(demo.rows)
    assert "hf-bf16 loss" in table.splitlines()[0] and "hf-bf16 Δ [95% CI]" in table.splitlines()[0]
    assert f"{col['loss']:.4f}" in table


def test_cli_rejects_bad_options_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--hidden", "64", "--out", os.devnull],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "demo: error: --hidden 64: int4-g32 needs hidden % 128 == 0" in proc.stderr
