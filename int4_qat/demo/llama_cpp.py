"""llama.cpp serving the demo's exports: the ``llama.cpp`` loss / Δ columns and a tokens/s table.

The compressed-tensors exports are what SGLang / vLLM serve on GPUs (Marlin W4A16). The demo's
machine has a CPU, and the engine that serves 4-bit weights there is llama.cpp (through
llama-cpp-python). :class:`LlamaCppEvaluator` is an extra evaluator
(:class:`int4_qat.demo.evaluate.ExtraEvaluator`) that, for the BF16, INT4 g32 and MXFP4 rows:

1. **converts the row's export to one GGUF file** with the project's GGUF writer
   (:func:`int4_qat.export.gguf_export.write_gguf`; no second converter) from the *same* source
   and scheme: a compressed-tensors export records both in ``int4_qat_export.json`` (the HF
   checkpoint it was written from, the scheme), and ``int4_qat.formats`` computes the codes and
   scales once for both containers (INT4 g32 → ``Q4_0``, MXFP4 → ``MXFP4``). A BF16 row's HF
   checkpoint becomes the unquantized GGUF (2-D weights ``BF16``; norms and router F32, as
   llama.cpp wants them) — the paired reference of the column;
2. **runs every eval window in llama.cpp** (:class:`int4_qat.export.gguf_eval.GGUFModel`: token ids
   in, one fresh causal forward per window, llama.cpp's logits out; one ``Llama`` per file) and
   returns the per-window next-token losses, which the pipeline pairs against the BF16 GGUF's like
   any other column (Δ with a paired-bootstrap interval);
3. **measures tokens/s** (:meth:`LlamaCppEvaluator.section`, after the last row): prompt processing
   (``pp``: a window of ``seq`` tokens per ``llama_decode``) and decoding (``tg``: greedy, one
   token per call) of the trained BF16 file and the QAT Q4_0 / MXFP4 files, side by side in
   interleaved rounds, and writes its section of ``summary.md`` with
   ``llama_cpp_tokens_per_s.png``.

What differs from the transformers column, by construction: llama.cpp dequantizes Q4_0 as ``q·d``
in fp32 where Marlin and compressed-tensors' decompression serve ``bf16(q·s)`` (the writer's
report counts the weights that differ: ≤ 2^-8 relative; MXFP4 is identical); its 4-bit dot
products quantize the activations to Q8_0, and BF16 weights round them to bf16; the matrices that
no scheme quantizes (embedding, output) are BF16 in every file, so a Δ against the BF16 GGUF
isolates the quantized weights. The KV cache is F32 (``GGUFModel``'s default: attention adds no
rounding of its own; llama.cpp's default F16 would touch every row alike).

Cost (the default demo: 706 windows of 128 tokens, one thread): ~3–4 s per file, six files, plus
a few seconds of tokens/s. Memory: the GGUF model plus the logits of ``chunk`` windows (float32
``chunk × seq × vocab``, bounded by :data:`LOGITS_BYTES`). Disk: one GGUF per evaluated row in
``OUT/gguf/`` (0.8–2 MB each for the demo's model).
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from int4_qat.demo.report import ExtraSection, Row, text_table
from int4_qat.demo.stats import RESAMPLES

__all__ = ["ACCEPTED", "BENCH_ROWS", "LOGITS_BYTES", "GGUFFile", "LlamaCppEvaluator",
           "measure_tokens_per_s", "plot_tokens_per_s", "active_weight_bytes"]

#: demo format -> GGUF type of its quantized weights (the bf16 rows: the unquantized control)
ACCEPTED: dict[str, str] = {"bf16": "BF16", "int4-g32": "Q4_0", "mxfp4": "MXFP4"}
#: the row whose file stands for each type in the tokens/s table (tokens/s does not depend on
#: the values, only on the types; these are the trained / QAT models)
BENCH_ROWS: tuple[tuple[str, str], ...] = (("bf16", "trained"), ("int4-g32", "qat"), ("mxfp4", "qat"))
#: upper bound of the float32 logits held at once while evaluating (chunks of windows)
LOGITS_BYTES = 256 * 2 ** 20


@dataclass
class GGUFFile:
    """One GGUF file the evaluator wrote and ran (``export_dir``: the export it was made from)."""

    export_dir: str
    path: str
    ggml_type: str                 # type of the quantized weights (the float type for bf16 rows)
    bytes: int
    active_weight_bytes: int       # weight bytes one token reads (experts: top-k of E; one embedding row)
    exact: bool                    # decoded weights == the export's served weights (writer's report)
    mismatched: int
    max_rel: float
    report: str
    export_seconds: float
    eval_seconds: float = 0.0      # wall time in llama_decode over the eval windows
    eval_cpu_seconds: float = 0.0
    eval_tokens: int = 0


def active_weight_bytes(path: str) -> int:
    """Bytes of weights one token reads in ``path``: every matrix, the experts' share top-k / E,
    one row of the token embedding."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = r.get_field("general.architecture").contents()
    used, count = (r.get_field(f"{arch}.{k}") for k in ("expert_used_count", "expert_count"))
    frac = used.contents() / count.contents() if used is not None and count is not None else 1.0
    total = 0.0
    for t in r.tensors:
        if t.name.startswith("token_embd."):
            total += int(t.n_bytes) / int(t.shape[-1])        # ggml ne = {hidden, vocab}
        elif "_exps." in t.name:
            total += int(t.n_bytes) * frac
        else:
            total += int(t.n_bytes)
    return round(total)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


class LlamaCppEvaluator:
    """The ``llama.cpp`` column (module docstring). ``out``: the demo's output directory (GGUFs go
    to ``out/gguf``, the plot to ``out``); ``threads``: llama.cpp threads (the demo's
    ``--threads``); ``float_type``: the unquantized matrices' GGUF type (``bf16``; ``f32`` makes the
    BF16 rows' files an exact fp32 control, as the tests use); ``bootstrap``: ``resamples`` /
    ``seed`` of the report's intervals (the section's "QAT closes X %" lines use them)."""

    name = "llama.cpp"

    def __init__(self, out: str | os.PathLike, *, threads: int = 1, float_type: str = "bf16",
                 bench_rounds: int = 9, bench_windows: int = 16, decode_tokens: int = 128,
                 prompt_tokens: int = 16, bootstrap: dict[str, int] | None = None):
        from int4_qat.export.gguf_export import FLOAT_TYPES

        if float_type not in FLOAT_TYPES:
            raise ValueError(f"float_type {float_type!r}: choose one of {list(FLOAT_TYPES)}")
        for k, v in (("threads", threads), ("bench_rounds", bench_rounds),
                     ("bench_windows", bench_windows), ("decode_tokens", decode_tokens),
                     ("prompt_tokens", prompt_tokens)):
            if v < 1:
                raise ValueError(f"LlamaCppEvaluator: {k} must be >= 1, got {v}")
        self.out = Path(out)
        self.gguf_dir = self.out / "gguf"
        self.threads, self.float_type = threads, float_type
        self.bench_rounds, self.bench_windows = bench_rounds, bench_windows
        self.decode_tokens, self.prompt_tokens = decode_tokens, prompt_tokens
        # the report's bootstrap (compare.assign_deltas' resamples / seed), for the gap lines
        self.bootstrap = {"resamples": RESAMPLES, "seed": 0, **(bootstrap or {})}
        self.files: dict[str, GGUFFile] = {}      # str(export_dir) -> file
        self._bench_tokens: torch.Tensor | None = None

    # -- the seam ----------------------------------------------------------------------------
    def accepts(self, fmt: str, method: str) -> bool:
        return fmt in ACCEPTED

    def check(self, config: dict) -> None:
        """Refuse before any training when llama.cpp cannot run this model config (the GGUF
        writer's own architecture check: ``ValueError`` with the reason)."""
        from int4_qat.export.gguf_arch import parse_config

        parse_config(config)

    def window_losses(self, export_dir, evalset) -> torch.Tensor:
        """Convert ``export_dir`` to GGUF, run the eval windows in llama.cpp -> losses ``[n]``."""
        from int4_qat.demo.evaluate import logit_stats
        from int4_qat.demo.stats import window_losses
        from int4_qat.export.gguf_eval import GGUFModel

        f = self.export(export_dir)
        n, seq = evalset.tokens.shape
        out = []
        with GGUFModel(f.path, n_ctx=seq, n_threads=self.threads) as m:
            chunk = max(1, LOGITS_BYTES // (seq * m.n_vocab * 4))
            for i in range(0, n, chunk):
                r = m.evaluate(evalset.tokens[i:i + chunk])
                out.append(window_losses(logit_stats(r.logits, evalset.labels[i:i + chunk]).target_logprobs))
                f.eval_seconds += r.seconds
                f.eval_cpu_seconds += r.cpu_seconds
                f.eval_tokens += r.tokens
        if self._bench_tokens is None:
            self._bench_tokens = evalset.tokens[:self.bench_windows].clone()
        return torch.cat(out)

    def export(self, export_dir) -> GGUFFile:
        """The GGUF of one export: its recorded source checkpoint and scheme (compressed-tensors
        export), or the unquantized HF checkpoint itself (``float_type`` matrices)."""
        from int4_qat.export.gguf_blocks import ggml_type
        from int4_qat.export.gguf_export import write_gguf
        from int4_qat.export.pipeline import EXPORT_META
        from int4_qat.export.source import open_hf_source
        from int4_qat.scheme import QuantScheme

        export_dir = Path(export_dir)
        meta_path = export_dir / EXPORT_META
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            scheme, source = QuantScheme.from_dict(meta["scheme"]), str(meta["source"])
            if not os.path.isfile(os.path.join(source, "config.json")):
                raise ValueError(f"{meta_path}: source {source} (the checkpoint this export was "
                                 f"written from) is gone; the GGUF must hold the same codes, so it "
                                 f"is converted from that checkpoint: rerun the demo")
            kind = ggml_type(scheme.format).name
        else:
            scheme, source, kind = None, str(export_dir), self.float_type.upper()
        self.gguf_dir.mkdir(parents=True, exist_ok=True)
        res = write_gguf(open_hf_source(source), str(self.gguf_dir / f"{export_dir.name}.gguf"),
                         scheme, tokenizer_dir=source, float_type=self.float_type,
                         reference_dtype=torch.float32, overwrite=True, progress=False,
                         source_desc=str(export_dir))
        rep = res.report
        f = GGUFFile(export_dir=str(export_dir), path=res.output, ggml_type=kind,
                     bytes=res.output_bytes, active_weight_bytes=active_weight_bytes(res.output),
                     exact=rep.exact, mismatched=rep.mismatched,
                     max_rel=max((c.max_rel for c in rep.quantized), default=0.0),
                     report=rep.summary(), export_seconds=res.seconds)
        self.files[str(export_dir)] = f
        return f

    # -- tokens/s ----------------------------------------------------------------------------
    def bench(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """:func:`measure_tokens_per_s` of the :data:`BENCH_ROWS` files present (first eval
        windows as prompts), with each file's type, size and weight bytes per token."""
        by = {(r.format, r.method): r for r in rows}
        picks = [(f"{fmt} {m}", self.files[by[(fmt, m)].export_dir]) for fmt, m in BENCH_ROWS
                 if (fmt, m) in by and by[(fmt, m)].export_dir in self.files]
        if not picks or self._bench_tokens is None:
            return []
        runs = measure_tokens_per_s([(label, f.ggml_type, f.path) for label, f in picks],
                                    self._bench_tokens, rounds=self.bench_rounds,
                                    threads=self.threads, prompt_tokens=self.prompt_tokens,
                                    decode_tokens=self.decode_tokens)
        for d, (_, f) in zip(runs, picks, strict=True):
            d.update(file=os.path.basename(f.path), bytes=f.bytes,
                     active_weight_bytes=f.active_weight_bytes)
        return runs

    # -- the report --------------------------------------------------------------------------
    def section(self, rows: Sequence[Row]) -> ExtraSection | None:
        """The ``llama.cpp`` section: one line per GGUF file, the tokens/s table, the plot."""
        if not self.files:
            return None
        bench = self.bench(rows)
        by_dir = {r.export_dir: r for r in rows if r.export_dir}
        files = []
        for key, f in self.files.items():
            r = by_dir.get(key)
            col = r.extra.get(self.name) if r is not None else None
            files.append({**asdict(f), "row": f"{r.format} {r.method}" if r else None,
                          "llama_cpp_loss": col["loss"] if col else None,
                          "transformers_loss": r.eval_loss if r else None,
                          "eval_tokens_per_s": f.eval_tokens / f.eval_seconds if f.eval_seconds else None})
        from int4_qat.demo.compare import gap_line, gaps

        lines = [f"llama.cpp {gap_line(g)}" for g in gaps(rows, extra=self.name, **self.bootstrap)]
        data = {"files": files, "headlines": lines, "tokens_per_s": bench,
                "float_type": self.float_type, "threads": self.threads, "kv_cache": "F32"}
        plots = {}
        if bench:
            plots["llama_cpp_tokens_per_s.png"] = plot_tokens_per_s(
                self.out / "llama_cpp_tokens_per_s.png", bench)
        text = "\n".join([*(f"  - {x}" for x in lines), *([""] if lines and bench else []),
                          _text(bench)]).strip("\n")
        return ExtraSection(self.name, _markdown(files, lines, bench, self.float_type), text,
                            data, plots)


# ------------------------------------------------------------------------------- tokens/s
def measure_tokens_per_s(files: Sequence[tuple[str, str, str]], windows: torch.Tensor, *,
                         rounds: int = 9, threads: int = 1, prompt_tokens: int = 16,
                         decode_tokens: int = 128) -> list[dict[str, Any]]:
    """Prompt-processing and decode tokens/s of GGUF ``files`` (``(label, type, path)``; the
    first is the reference of the ratios), side by side: one ``Llama`` per file, one untimed
    warm-up round, then ``rounds`` rounds over all files in alternating order. A round runs, per
    file, ``pp``: every row of ``windows`` (int ``[B, S]``) as one ``llama_decode`` of ``S``
    tokens, and ``tg``: ``decode_tokens`` greedy tokens, one call each, after the first
    ``prompt_tokens`` of ``windows[0]``. Per file: medians (and min/max) of wall tokens/s and of
    tokens per CPU-second (process CPU time of the same calls: steadier on a shared machine, equal
    to wall on a quiet one with one thread), and the median per-round ratio of the latter to the
    first file (``*_vs_ref``)."""
    from int4_qat.export.gguf_eval import GGUFModel

    prompt = windows[0, :prompt_tokens].tolist()
    n_ctx = max(int(windows.shape[1]), len(prompt) + decode_tokens)
    runs: list[dict[str, list[float]]] = [{k: [] for k in ("pp", "pp_cpu", "tg", "tg_cpu")}
                                          for _ in files]
    models = []
    try:
        for _, _, path in files:
            models.append(GGUFModel(path, n_ctx=n_ctx, n_threads=threads))
        for rnd in range(rounds + 1):
            order = range(len(files)) if rnd % 2 else reversed(range(len(files)))
            for i in order:
                pp, tg = models[i].evaluate(windows), models[i].decode(prompt, decode_tokens)
                if rnd == 0:
                    continue                        # warm-up: first-call allocations
                for k, v in (("pp", pp.tokens_per_s), ("pp_cpu", pp.tokens_per_cpu_s),
                             ("tg", tg.tokens_per_s), ("tg_cpu", tg.tokens_per_cpu_s)):
                    runs[i][k].append(v)
    finally:
        for m in models:
            m.close()
    out = []
    for (label, kind, path), run in zip(files, runs, strict=True):
        d: dict[str, Any] = {"row": label, "type": kind, "path": str(path), "rounds": rounds,
                             "threads": threads, "pp_tokens": int(windows.shape[1]),
                             "pp_windows": int(windows.shape[0]), "prompt_tokens": len(prompt),
                             "decode_tokens": decode_tokens}
        for k, xs in run.items():
            d[k] = _median(xs)
            d[f"{k}_range"] = [min(xs), max(xs)]
        for k in ("pp_cpu", "tg_cpu"):          # the ratio per round (side by side), then the median
            d[f"{k}_vs_ref"] = _median([a / b for a, b in zip(run[k], runs[0][k], strict=True)])
        out.append(d)
    return out


# ------------------------------------------------------------------------------- rendering
_MB = 1e6


def _bench_body(bench: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    ref = bench[0]["type"]
    heads = ["GGUF (row)", "weights", "file MB", "weight MB / token", "prompt tok/s",
             "prompt tok/CPU-s", f"prompt × {ref}", "decode tok/s", "decode tok/CPU-s",
             f"decode × {ref}"]
    body = [[d["row"], d["type"], f"{d['bytes'] / _MB:.2f}", f"{d['active_weight_bytes'] / _MB:.3f}",
             f"{d['pp']:,.0f}", f"{d['pp_cpu']:,.0f}", f"{d['pp_cpu_vs_ref']:.2f}",
             f"{d['tg']:,.0f}", f"{d['tg_cpu']:,.0f}", f"{d['tg_cpu_vs_ref']:.2f}"] for d in bench]
    return heads, body


def _bench_setup(d: dict[str, Any]) -> str:
    return (f"{d['threads']} thread(s); median of {d['rounds']} interleaved rounds after a warm-up; "
            f"prompt processing = one {d['pp_tokens']}-token eval window per `llama_decode` "
            f"({d['pp_windows']} windows a round), decode = {d['decode_tokens']} greedy tokens, one "
            f"per call, after a {d['prompt_tokens']}-token prompt")


def _text(bench: Sequence[dict[str, Any]]) -> str:
    if not bench:
        return ""
    heads, body = _bench_body(bench)
    return (f"llama.cpp tokens/s on this machine ({_bench_setup(bench[0]).replace('`', '')}):\n"
            + text_table(heads, body))


def _honesty(bench: Sequence[dict[str, Any]]) -> str:
    """What a tiny model's tokens/s means, said with the measured numbers."""
    ref = bench[0]
    kb = lambda d: f"{d['active_weight_bytes'] / 1e3:.0f} kB"  # noqa: E731
    line = f"What these numbers mean: a token reads {kb(ref)} of weights as {ref['type']}"
    for d in bench[1:]:
        line += (f", {kb(d)} as {d['type']} ({ref['active_weight_bytes'] / d['active_weight_bytes']:.1f}× "
                 f"fewer bytes: decode at {d['tg_cpu_vs_ref']:.2f}×, prompt processing at "
                 f"{d['pp_cpu_vs_ref']:.2f}× {ref['type']})")
    l3 = _l3_bytes()
    fits = (f"; the whole {ref['type']} file ({ref['bytes'] / _MB:.1f} MB) fits in this CPU's "
            f"{l3 / 2 ** 20:.0f} MiB L3 cache" if l3 and ref["bytes"] < l3 else "")
    line += f". A decoded token takes {1e6 / ref['tg_cpu']:.0f} µs of CPU{fits}. "
    # share of the byte ratio that decode gained: ~0 = per-call work dominates, ~1 = bandwidth
    gained = [(d["tg_cpu_vs_ref"] - 1) / (ref["active_weight_bytes"] / d["active_weight_bytes"] - 1)
              for d in bench[1:] if ref["active_weight_bytes"] > 1.05 * d["active_weight_bytes"]]
    if gained and max(gained) < 0.25:
        line += ("At this size the cost of a token is mostly work that does not grow with the "
                 "weight bytes (per call and per op: graph build, scheduling, dozens of tiny "
                 "kernels, the Python binding), so 4-bit weights barely change it. What 4-bit "
                 "weights buy a server — decode of a large model streams every active weight from "
                 "memory once per token, so its speed follows the bytes — does not show on a model "
                 "this small. ")
    elif gained and min(gained) >= 0.75:
        line += "At this size decode follows the weight bytes (memory traffic sets its speed). "
    elif gained:
        line += ("Decode gains part of the byte ratio: per-call work and memory traffic both count "
                 "at this size. ")
    return (line + "These ratios are no prediction for a 30 B model; `bench/bench_llama_cpp.py` "
            "measures the three types on wider models of this architecture (README, \"The demo\").")


def _l3_bytes() -> int | None:
    try:
        v = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return v if v and v > 0 else None


def _markdown(files: Sequence[dict[str, Any]], lines: Sequence[str], bench: Sequence[dict[str, Any]],
              float_type: str) -> str:
    md = ["## llama.cpp", "",
          "The `llama.cpp` columns of the table: the BF16, INT4 g32 and MXFP4 rows' exports, each "
          "converted to one GGUF file by `int4_qat.export.gguf_export` from the checkpoint and "
          "scheme its compressed-tensors export was written from (the same codes and scales: INT4 "
          f"g32 → `Q4_0`, MXFP4 → `MXFP4`; unquantized matrices {float_type.upper()}, norms and "
          "router F32), run by llama.cpp (llama-cpp-python) on the same eval windows: token ids fed "
          "directly, one fresh causal forward per window, F32 KV cache. Δ is paired against the "
          "BF16 GGUF of the row's BF16 reference. llama.cpp computes Q4_0 / MXFP4 dot products "
          "with Q8_0 activations and BF16 ones with bf16 activations, so its losses differ from "
          "the transformers column (fp32 compute) by that arithmetic (last-but-one column). "
          "\"weights vs the export\": the GGUF's weights decoded by the `gguf` package against the "
          "weights the compressed-tensors export serves.", ""]
    heads = ["row", "GGUF", "file bytes", "weights vs the export", "llama.cpp − transformers loss",
             "eval tok/s (wall)"]
    body = []
    for f in files:
        diff = (f["llama_cpp_loss"] - f["transformers_loss"]) if f["llama_cpp_loss"] is not None else None
        if f["ggml_type"] in ("BF16", "F16", "F32"):
            vs = f"unquantized ({f['ggml_type']})"
        elif f["exact"]:
            vs = "identical"
        else:
            vs = f"{f['mismatched']:,} differ, max rel {f['max_rel']:.1e}"
        body.append([f["row"] or "?", f["ggml_type"], f"{f['bytes']:,}", vs,
                     "—" if diff is None else f"{diff:+.4f}",
                     "—" if f["eval_tokens_per_s"] is None else f"{f['eval_tokens_per_s']:,.0f}"])
    md += [text_table(heads, body, markdown=True), ""]
    if lines:
        md += ["Measured in llama.cpp (the headlines' wording rules, its own intervals):",
               *[f"- {x}" for x in lines], ""]
    if any(not f["exact"] and f["ggml_type"] == "Q4_0" for f in files):
        md += ["Q4_0 weights that differ: the export serves `bf16(q·s)` (Marlin's rule, the "
               "scheme's `served: bf16`), llama.cpp decodes `q·d` exactly in fp32 — the same code q "
               "and scale; at most 2^-8 relative.", ""]
    if bench:
        heads, body = _bench_body(bench)
        md += ["### llama.cpp tokens/s on this machine", "",
               _bench_setup(bench[0]) + ". `tok/s`: wall time; `tok/CPU-s`: the process CPU time of "
               "the same calls (the steadier on a shared machine); × = median of the per-round "
               "CPU-time ratios to the first row.", "",
               text_table(heads, body, markdown=True), "", _honesty(bench), "",
               "![llama.cpp tokens/s](llama_cpp_tokens_per_s.png)", ""]
    return "\n".join(md)


def plot_tokens_per_s(path: str | os.PathLike, bench: Sequence[dict[str, Any]]) -> Path:
    """Two panels (prompt processing, decode): tokens per CPU-second per GGUF type (median, the
    bar; min–max over the rounds, the whisker) and the wall-clock median (dot)."""
    from int4_qat.demo.report import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    labels = [f"{d['type']} ({d['row']})\n{d['active_weight_bytes'] / 1e3:.0f} kB weights / token"
              for d in bench]
    for ax, k, title in ((axes[0], "pp", f"prompt processing ({bench[0]['pp_tokens']}-token windows)"),
                         (axes[1], "tg", "decode (one token per call)")):
        med = [d[f"{k}_cpu"] for d in bench]
        lo = [m - d[f"{k}_cpu_range"][0] for m, d in zip(med, bench, strict=True)]
        hi = [d[f"{k}_cpu_range"][1] - m for m, d in zip(med, bench, strict=True)]
        bars = ax.bar(range(len(bench)), med, yerr=[lo, hi], capsize=4,
                      color=[f"C{i}" for i in range(len(bench))], label="per CPU-second (median, min–max)")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, label_type="center")
        ax.plot(range(len(bench)), [d[k] for d in bench], "ko", markersize=4, label="wall (median)")
        ax.set_xticks(range(len(bench)), labels, fontsize=8)
        ax.set_ylabel("tokens / s")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"llama.cpp tokens/s on this machine, {bench[0]['threads']} thread(s), the demo's "
                 f"model (median of {bench[0]['rounds']} interleaved rounds)", fontsize=9)
    return _save(fig, path, plt)
