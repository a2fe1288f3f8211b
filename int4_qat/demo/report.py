"""The demo's outputs: one table (terminal + ``summary.md`` + ``summary.json``) and three PNG plots.

A :class:`Row` is one model that was evaluated: a format (``bf16``, ``int4-g32``, ``int4-g128``,
``mxfp4``, ``nvfp4``, ``fp8-e4m3``, ``int4-awq``) crossed with a method:

``trained``   the BF16 (fp32 on CPU) model at the end of the first training phase;
``continued`` the BF16 model trained further for the same token budget as QAT (the fair reference);
``ptq``       round-to-nearest post-training quantization of the *trained* model (fake quant, no
              further training);
``qat``       the trained model continued with the fake quantizer in the forward for the budget;
``awq``        the ModelOpt INT4 AWQ baseline (``fp8-e4m3`` / ``ptq``: the FP8 serving baseline).

Columns: eval loss (held-out, measured on the *reloaded* export where one exists, otherwise on the
training-side model -- the ``measured_on`` field says which), Δ vs BF16 (against the BF16 model the
row is fairly compared with: ``ptq`` against ``trained``, ``qat`` against ``continued``; see
:mod:`int4_qat.demo.compare`) with its 95 % paired-bootstrap interval over the eval windows and
whether that interval excludes 0 (``signif.``; :mod:`int4_qat.demo.stats`), perplexity
``exp(loss)``, checkpoint bytes (unquantized tensors counted at bf16), and the train-infer
mismatch between the training-side fake-quant forward (Megatron + ModelOpt, fp32) and the reloaded
export: mean / max |Δ logprob| of the target tokens and the mean KL(train || served) over the
vocabulary, with the export computing in fp32 (isolates the checkpoint) and, last column, the mean
|Δ logprob| when the export computes in bf16 as a server would (adds bf16 activation rounding).
Extra evaluators (``Row.extra``, :class:`int4_qat.demo.evaluate.ExtraEvaluator`) add a loss and a
Δ column each, and may add a section of their own (:class:`ExtraSection`: markdown after the plots,
text under the terminal table, data in ``summary.json`` ``meta.sections``, their PNGs).

Plots use matplotlib's Agg backend (no display needed): ``loss_curves.png`` (training loss per step
of the BF16 run and of every QAT continuation, PTQ eval losses as dashed levels),
``eval_loss.png`` (per-format bars, PTQ vs QAT, BF16 reference lines; Δ with interval error bars)
and ``checkpoint_size.png``. ``summary.json`` keeps every row's per-window losses, so every
interval can be recomputed from it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "Row",
    "Curve",
    "PNG_SIGNATURE",
    "format_table",
    "write_summary",
    "plot_loss_curves",
    "plot_eval_bars",
    "plot_checkpoint_sizes",
    "write_report",
    "is_png",
    "extra_columns",
    "text_table",
    "ExtraSection",
]

#: First 8 bytes of every PNG file (PNG spec, section 5.2).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Row:
    """One evaluated model (see the module docstring for the meaning of each field)."""

    format: str
    method: str
    eval_loss: float
    measured_on: str = "export"          # "export" (reloaded checkpoint) | "training-side"
    train_side_loss: float | None = None  # Megatron (+ ModelOpt fake quant) eval loss
    delta_vs_bf16: float | None = None
    delta_lo: float | None = None         # 95% paired-bootstrap interval of delta_vs_bf16
    delta_hi: float | None = None
    reference: str | None = None          # which BF16 row delta_vs_bf16 is taken against
    checkpoint_bytes: int | None = None
    mean_abs_dlogprob: float | None = None
    max_abs_dlogprob: float | None = None
    kl: float | None = None
    bf16_mean_abs_dlogprob: float | None = None   # export run in bf16 vs training side (fp32)
    export_dir: str | None = None
    note: str = ""
    window_losses: list[float] | None = None      # per eval window, the side eval_loss is measured on
    # extra evaluator columns (int4_qat.demo.evaluate.ExtraEvaluator): name -> {"loss",
    # "window_losses", and after compare.assign_deltas "delta", "delta_lo", "delta_hi"}
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def significant(self) -> bool | None:
        """Whether the Δ interval excludes 0 (None without an interval)."""
        if self.delta_lo is None or self.delta_hi is None:
            return None
        return self.delta_lo > 0.0 or self.delta_hi < 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.eval_loss) if self.eval_loss < 700 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ppl"] = self.ppl
        return d


@dataclass
class Curve:
    """A training-loss curve: ``steps`` are global step numbers (continuations start after the
    first phase), ``losses`` the per-step training loss; ``eval`` optional (step, loss) pairs."""

    label: str
    steps: list[int]
    losses: list[float]
    eval: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.losses):
            raise ValueError(f"curve {self.label!r}: {len(self.steps)} steps but "
                             f"{len(self.losses)} losses")


@dataclass
class ExtraSection:
    """A report section contributed by an extra evaluator (its optional ``section(rows)`` hook,
    :class:`int4_qat.demo.evaluate.ExtraEvaluator`): ``markdown`` goes into ``summary.md``,
    ``text`` is printed under the table, ``data`` lands in ``summary.json`` under
    ``meta.sections[name]``, ``plots`` are PNG files it wrote into the output directory."""

    name: str
    markdown: str
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ table
_COLUMNS = ("format", "method", "eval loss", "Δ vs BF16 [95% CI]", "signif.", "ppl", "ckpt bytes",
            "mean|Δlogp|", "max|Δlogp|", "KL", "mean|Δlogp| bf16")


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def _delta_cell(d: float | None, lo: float | None, hi: float | None) -> str:
    if d is None:
        return "—"
    if lo is None or hi is None:
        return _fmt(d, "+.4f")
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def extra_columns(rows: Sequence[Row]) -> list[str]:
    """Names of the extra evaluator columns present on any row, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r.extra))


def _cells(r: Row, extra: Sequence[str]) -> list[str]:
    loss = _fmt(r.eval_loss, ".4f") + ("" if r.measured_on == "export" else "*")
    out = [r.format, r.method, loss, _delta_cell(r.delta_vs_bf16, r.delta_lo, r.delta_hi),
           {True: "yes", False: "no", None: "—"}[r.significant], _fmt(r.ppl, ".3f"),
           _fmt(r.checkpoint_bytes, ",d"), _fmt(r.mean_abs_dlogprob, ".2e"),
           _fmt(r.max_abs_dlogprob, ".2e"), _fmt(r.kl, ".2e"), _fmt(r.bf16_mean_abs_dlogprob, ".2e")]
    for name in extra:
        c = r.extra.get(name, {})
        out += [_fmt(c.get("loss"), ".4f"),
                _delta_cell(c.get("delta"), c.get("delta_lo"), c.get("delta_hi"))]
    return out


def text_table(heads: Sequence[str], body: Sequence[Sequence[str]], markdown: bool = False,
               left: int = 2) -> str:
    """Cells as aligned plain text (terminal) or a GitHub markdown table; the first ``left``
    columns are left-aligned (labels), the others right-aligned (numbers)."""
    if markdown:
        esc = [h.replace("|", "\\|") for h in heads]     # a bare | would split the cell
        lines = ["| " + " | ".join(esc) + " |",
                 "|" + "|".join("---" if i < left else "---:" for i in range(len(heads))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(heads)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in body]
    return "\n".join(out)


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The summary table as aligned plain text (terminal) or as a GitHub markdown table; one
    ``<name> loss`` / ``<name> Δ`` column pair per extra evaluator."""
    extra = extra_columns(rows)
    heads = list(_COLUMNS) + [h for n in extra for h in (f"{n} loss", f"{n} Δ [95% CI]")]
    return text_table(heads, [_cells(r, extra) for r in rows], markdown)


def write_summary(out_dir: str | os.PathLike, rows: Sequence[Row], meta: dict[str, Any],
                  curves: Sequence[Curve] = (), headlines: Sequence[str] = (),
                  sections: Sequence[ExtraSection] = ()) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.json`` into ``out_dir``; returns both paths.
    ``headlines``: the summary lines (:func:`int4_qat.demo.compare.headlines`); ``sections``:
    the extra evaluators' own sections, after the plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# int4-qat demo — {meta.get('title', 'PTQ vs QAT on a tiny Qwen3-MoE')}", ""]
    for k, v in meta.get("settings", {}).items():
        md.append(f"- **{k}**: {v}")
    md += ["", format_table(rows, markdown=True), "",
           "Eval loss: held-out tokens (documents never trained on), next-token cross entropy in "
           "nats, measured on the checkpoint reloaded from disk with transformers "
           "(+ compressed-tensors); `*` = measured on the training-side model (no export of that "
           "kind). Δ vs BF16: PTQ rows against the trained BF16 model they were quantized from, "
           "QAT rows against the BF16 model continued for the same token budget; in brackets its "
           f"95% paired-bootstrap interval over the eval windows{_bootstrap_text(meta)}; "
           "signif. = the interval excludes 0. "
           "mean/max |Δlogp| and KL: training-side fake-quant forward (Megatron-Core + ModelOpt) vs "
           "the reloaded export computing in fp32, on the eval tokens; last column: the export "
           "computing in bf16 (a server's activation precision), on the first 64 eval windows. A max "
           "|Δlogp| far above the mean comes from single tokens whose top-k expert routing is a "
           "near-tie (two router probabilities within ~1e-8) that the two fp32 forwards resolve "
           "differently. ckpt bytes: safetensors payload with every "
           "unquantized tensor counted at 2 bytes (bf16, as served); the demo writes them in fp32 "
           "so that the reload reproduces the fp32 training-side forward exactly."
           + ("" if not extra_columns(rows) else
              " `<name> loss` / `<name> Δ` columns: an extra evaluator of the same exports, its Δ "
              "paired against the same evaluator on the BF16 reference row (see its section below)."),
           ""]
    if headlines:
        md += ["Headlines (computed from the table):", *[f"- {h}" for h in headlines], ""]
    notes = [f"- {r.format} / {r.method}: {r.note}" for r in rows if r.note]
    if notes:
        md += ["Notes:", *notes, ""]
    md += ["![loss curves](loss_curves.png)", "", "![eval loss](eval_loss.png)", "",
           "![checkpoint size](checkpoint_size.png)", ""]
    for sec in sections:
        md += [sec.markdown.rstrip(), ""]
    for k in ("wall_time_s", "cpu_time_s", "stage_seconds", "stage_cpu_seconds"):
        if k in meta:
            md.append(f"- {k}: {json.dumps(meta[k])}")
    md_path = out / "summary.md"
    md_path.write_text("\n".join(md) + "\n")
    if sections:
        meta = {**meta, "sections": {sec.name: sec.data for sec in sections}}
    js = {"meta": meta, "headlines": list(headlines), "rows": [r.to_dict() for r in rows],
          "curves": [asdict(c) for c in curves]}
    js_path = out / "summary.json"
    js_path.write_text(json.dumps(js, indent=2, default=_json_default) + "\n")
    return md_path, js_path


def _bootstrap_text(meta: dict[str, Any]) -> str:
    b = meta.get("bootstrap")
    if not b:
        return ""
    return f" ({b['resamples']} resamples of the {b['windows']} windows, seed {b['seed']})"


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_loss_curves(path: str | os.PathLike, curves: Sequence[Curve],
                     ptq_levels: dict[str, float] | None = None, smooth: int = 5) -> Path:
    """Two panels. Left: the whole run -- training loss per step (moving average over ``smooth``
    steps, raw faint; dots = held-out eval), the BF16 run then each continuation, PTQ eval losses as
    dashed levels over the continuation. Right: each QAT curve minus the BF16 continuation curve,
    step by step (all continuations read the same batches, so the batch noise cancels and what is
    left is the cost of the quantizer, shrinking as QAT adapts)."""
    if not curves:
        raise ValueError("plot_loss_curves: no curves to plot")
    plt = _pyplot()
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    cont = [c for c in curves[1:] if c.steps]
    for i, c in enumerate(curves):
        color = f"C{i}"
        ax.plot(c.steps, c.losses, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(c.steps, _moving_average(c.losses, smooth), color=color, linewidth=1.4,
                label=f"{c.label} (train, MA{smooth})")
        if c.eval:
            es, el = zip(*c.eval, strict=True)
            ax.plot(es, el, "o", color=color, markersize=4, markeredgecolor="k", markeredgewidth=0.4)
    if ptq_levels and cont:
        x0, x1 = min(c.steps[0] for c in cont), max(c.steps[-1] for c in cont)
        for j, (label, v) in enumerate(ptq_levels.items()):
            ax.hlines(v, x0, x1, colors=f"C{(j + len(curves)) % 10}", linestyles="--",
                      linewidth=1.0, label=f"{label} PTQ (eval)")
    ax.set_title("BF16 run, then continuation per variant; PTQ eval levels dashed; dots = eval",
                 fontsize=9)
    ref = next((c for c in cont if c.label.lower().startswith("bf16")), None)
    if ref is not None:
        for i, c in enumerate(curves):
            if c is ref or c not in cont or c.steps != ref.steps:
                continue
            diff = [a - b for a, b in zip(c.losses, ref.losses, strict=True)]
            axd.plot(c.steps, _moving_average(diff, 4 * smooth), color=f"C{i}", linewidth=1.4,
                     label=f"{c.label} − {ref.label}")
        axd.axhline(0.0, color="k", linewidth=0.8)
        axd.legend(fontsize=7)
    axd.set_title(f"continuation: QAT minus BF16 training loss on the same batches (MA{4 * smooth})",
                  fontsize=9)
    for a_ in (ax, axd):
        a_.set_xlabel("step")
        a_.grid(alpha=0.3)
    ax.set_ylabel("loss (nats / token)")
    axd.set_ylabel("Δ loss (nats / token)")
    ax.legend(fontsize=6.5, ncol=2)
    return _save(fig, path, plt)


def _moving_average(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_eval_bars(path: str | os.PathLike, rows: Sequence[Row]) -> Path:
    """Two panels of per-format bars, one bar per method (PTQ, QAT, baselines): the held-out eval
    loss (BF16 levels as lines) and the Δ vs BF16 (the cost of quantization: PTQ against the
    model it quantized, QAT against BF16 trained for the same extra tokens) with its 95%
    paired-bootstrap interval as an error bar; a Δ whose interval covers 0 is drawn hatched and
    pale ("within noise")."""
    plt = _pyplot()
    quant = [r for r in rows if r.format != "bf16"]
    if not quant:
        raise ValueError("plot_eval_bars: no quantized rows")
    formats = list(dict.fromkeys(r.format for r in quant))
    methods = list(dict.fromkeys(r.method for r in quant))
    width = 0.8 / len(methods)
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(14, 5), dpi=110)
    for j, m in enumerate(methods):
        cells = [(i - 0.4 + width * (j + 0.5), r) for i, f in enumerate(formats)
                 for r in quant if r.format == f and r.method == m]
        bars = ax.bar([x for x, _ in cells], [r.eval_loss for _, r in cells], width=width * 0.95,
                      label=m, color=f"C{j}")
        ax.bar_label(bars, fmt="%.4f", fontsize=6, rotation=90, padding=2)
        cells = [(x, r) for x, r in cells if r.delta_vs_bf16 is not None]
        if not cells:
            continue
        err = [[r.delta_vs_bf16 - (r.delta_lo if r.delta_lo is not None else r.delta_vs_bf16)
                for _, r in cells],
               [(r.delta_hi if r.delta_hi is not None else r.delta_vs_bf16) - r.delta_vs_bf16
                for _, r in cells]]
        bars = axd.bar([x for x, _ in cells], [r.delta_vs_bf16 for _, r in cells],
                       width=width * 0.95, color=f"C{j}", yerr=err, capsize=3,
                       error_kw={"elinewidth": 0.9})
        for b, (_, r) in zip(bars, cells, strict=True):
            if r.significant is False:
                b.set_alpha(0.45)
                b.set_hatch("//")
        for x, r in cells:      # the value above the whisker, where the error bar cannot hide it
            top = max(r.delta_vs_bf16, r.delta_hi if r.delta_hi is not None else r.delta_vs_bf16, 0.0)
            axd.annotate(f"{r.delta_vs_bf16:+.4f}", (x, top), xytext=(0, 3), textcoords="offset points",
                         ha="center", va="bottom", rotation=90, fontsize=6)
    for panel in (ax, axd):
        panel.set_xticks(range(len(formats)), formats)
        panel.grid(axis="y", alpha=0.3)
    for k, r in enumerate(r for r in rows if r.format == "bf16"):
        ax.axhline(r.eval_loss, color="k", linestyle=":" if k else "--", linewidth=1,
                   label=f"bf16 {r.method} ({r.eval_loss:.4f})")
    losses = [r.eval_loss for r in rows if math.isfinite(r.eval_loss)]
    lo, hi = min(losses), max(losses)
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-3) - 0.05), hi + 0.35 * (hi - lo + 1e-3) + 0.02)
    ends = [v for r in quant if r.delta_vs_bf16 is not None
            for v in (r.delta_vs_bf16, r.delta_lo, r.delta_hi) if v is not None]
    if ends:
        span = max(max(ends), 0.0) - min(min(ends), 0.0) + 1e-4
        axd.set_ylim(min(min(ends), 0.0) - 0.1 * span, max(max(ends), 0.0) + 0.3 * span)
    axd.axhline(0.0, color="k", linewidth=0.8)
    ax.set_ylabel("held-out eval loss (reloaded export; * rows training-side)")
    axd.set_ylabel("Δ eval loss vs BF16 (nats / token), 95% interval")
    ax.set_title("Eval loss per format", fontsize=10)
    axd.set_title("Cost of quantization: PTQ vs trained BF16, QAT vs BF16 continued", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    from matplotlib.patches import Patch   # explicit handles: a hatched first bar must not set the key

    handles = [Patch(color=f"C{j}", label=m) for j, m in enumerate(methods)]
    handles.append(Patch(facecolor="lightgray", hatch="//", label="interval covers 0"))
    axd.legend(handles=handles, fontsize=7, loc="upper right")
    return _save(fig, path, plt)


def plot_checkpoint_sizes(path: str | os.PathLike, rows: Sequence[Row]) -> Path:
    """Checkpoint bytes on disk, one bar per format (the first row of each format that has one)."""
    plt = _pyplot()
    sizes: dict[str, int] = {}
    for r in rows:
        if r.checkpoint_bytes is not None and r.format not in sizes:
            sizes[r.format] = r.checkpoint_bytes
    if not sizes:
        raise ValueError("plot_checkpoint_sizes: no row has checkpoint_bytes")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    names = list(sizes)
    vals = [sizes[n] / 1e6 for n in names]
    bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.2f MB", fontsize=7)
    ax.set_ylabel("checkpoint size, full-precision tensors at bf16 (MB)")
    ax.set_title("Checkpoint size per format (attention, router, embeddings, lm_head stay "
                 "full precision)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png")
    plt.close(fig)
    return p


def is_png(path: str | os.PathLike) -> bool:
    """True when ``path`` starts with the PNG signature and matplotlib can decode it."""
    p = Path(path)
    with open(p, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return False
    plt = _pyplot()
    img = plt.imread(str(p))
    return img.ndim == 3 and img.shape[0] > 10 and img.shape[1] > 10


def write_report(out_dir: str | os.PathLike, rows: Sequence[Row], curves: Sequence[Curve],
                 meta: dict[str, Any], headlines: Sequence[str] = (),
                 sections: Sequence[ExtraSection] = ()) -> dict[str, Path]:
    """Everything at once: summary.md/json and the three plots (plus the sections' plots, which
    their evaluators wrote); returns the written paths."""
    out = Path(out_dir)
    md, js = write_summary(out, rows, meta, curves, headlines, sections)
    ptq = {r.format: r.eval_loss for r in rows if r.method == "ptq"}
    paths = {"summary.md": md, "summary.json": js,
             "loss_curves.png": plot_loss_curves(out / "loss_curves.png", curves, ptq),
             "eval_loss.png": plot_eval_bars(out / "eval_loss.png", rows),
             "checkpoint_size.png": plot_checkpoint_sizes(out / "checkpoint_size.png", rows)}
    for sec in sections:
        paths.update(sec.plots)
    return paths


def rows_from_json(path: str | os.PathLike) -> list[Row]:
    """Rows back from a ``summary.json`` (for tests and for re-plotting)."""
    data = json.loads(Path(path).read_text())
    out = []
    for d in data["rows"]:
        d = dict(d)
        d.pop("ppl", None)
        out.append(Row(**d))
    return out


__all__.append("rows_from_json")
