"""`make demo` in its reduced configuration (``tools/demo.py --ci``) and the report code on its own.

The end-to-end test runs the real CLI in a subprocess (its own process group and Megatron state,
as ``make demo`` does) and checks the numbers it wrote: every row, QAT beating PTQ for INT4, the
reloaded export reproducing the training-side fake-quant loss, valid PNG plots.
"""
import json
import math
import os
import subprocess
import sys

import pytest

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
    assert len(re.findall(r"(?<!\\)\|", header)) == 11      # 10 columns: no bare | inside a cell
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
    assert (out / "summary.md").read_text().count("\n| ") == len(want) + 1
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
    assert not torch.equal(got, w)                       # it did quantize
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)


def test_awq_baseline_calibrates_expert_inputs(tiny_megatron):
    import torch

    from int4_qat.demo.baselines import awq_int4, enabled_weight_quantizers, scope_quantizer_globs

    make, calib = tiny_megatron
    model = awq_int4(make(), calib, scope="experts", group_size=32)
    names = enabled_weight_quantizers(model)
    assert len(names) == 2 * 8 * 2                     # fc1 + fc2, 8 experts, 2 layers
    lin = model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1
    pqs = getattr(lin.input_quantizer, "_pre_quant_scale", None)
    assert pqs is not None and pqs.shape == (lin.weight.shape[1],) and torch.isfinite(pqs).all()
    assert model.decoder.layers[1].mlp.router.weight.requires_grad is not None
    assert not hasattr(model.decoder.layers[1].mlp.router, "weight_quantizer") or \
        not model.decoder.layers[1].mlp.router.weight_quantizer.is_enabled
    with pytest.raises(ValueError, match="scope 'dense'"):
        scope_quantizer_globs("dense")


def test_cli_rejects_bad_options_with_exit_code_2():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo.py"), "--hidden", "64",
                           "--out", os.devnull], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "demo: error: --hidden 64: int4-g32 needs hidden % 128 == 0" in proc.stderr
