"""Which row is compared with which, the Δ of every row with its interval, and the summary wording.

Pairing (the fair reference of each method):

``ptq`` / ``awq``  against ``bf16 trained`` (the model they quantize, no further training);
``qat``            against ``bf16 continued`` (BF16 trained further on the same batches, same budget).

Every Δ is a paired difference over the same eval windows with a bootstrap interval
(:mod:`int4_qat.demo.stats`); every row's per-window losses are on the row (``Row.window_losses``,
and ``Row.extra[name]["window_losses"]`` for an extra evaluator's column), so ``summary.json`` is
enough to recompute all of it.

Wording rules (:func:`headlines`), so that the summary never claims more than the data shows:

* a Δ whose interval excludes 0 is "significant", otherwise "within noise (interval covers 0)";
* "QAT closes X % of the PTQ gap" is quoted with its interval only when the PTQ gap is
  significant; if the interval of X also covers 0 %, the line says QAT's improvement is not
  significant instead of quoting X as an effect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from int4_qat.demo.report import Row
from int4_qat.demo.stats import RESAMPLES, Interval, gap_closed, paired_delta

__all__ = ["REFERENCE", "Gap", "assign_deltas", "gaps", "gap_line", "headlines", "delta_interval"]

#: method -> the ``bf16`` row it is compared with.
REFERENCE = {"ptq": "trained", "awq": "trained", "qat": "continued"}


@dataclass(frozen=True)
class Gap:
    """One format's PTQ gap, QAT gap and the fraction of the former the latter closes."""

    format: str
    ptq: Interval
    qat: Interval
    closed: Interval


def _reference(rows: Sequence[Row], r: Row) -> Row | None:
    want = REFERENCE.get(r.method)
    if r.format == "bf16" or want is None:
        return None
    return next((x for x in rows if x.format == "bf16" and x.method == want), None)


def delta_interval(r: Row, extra: str | None = None) -> Interval | None:
    """The row's Δ vs its BF16 reference as an :class:`Interval` (after :func:`assign_deltas`);
    ``extra``: that extra evaluator column's Δ instead."""
    if extra is not None:
        c = r.extra.get(extra, {})
        if c.get("delta_lo") is None or c.get("delta_hi") is None:
            return None
        return Interval(c["delta"], c["delta_lo"], c["delta_hi"])
    if r.delta_vs_bf16 is None or r.delta_lo is None or r.delta_hi is None:
        return None
    return Interval(r.delta_vs_bf16, r.delta_lo, r.delta_hi)


def assign_deltas(rows: Sequence[Row], *, resamples: int = RESAMPLES, seed: int = 0) -> None:
    """Set ``reference``, ``delta_vs_bf16``, ``delta_lo`` / ``delta_hi`` on every row that has a
    reference (and the same for each extra evaluator column both rows have). Rows without
    per-window losses get the Δ without an interval."""
    for r in rows:
        ref = _reference(rows, r)
        if ref is None:
            continue
        r.reference = f"bf16 {ref.method}"
        r.delta_vs_bf16 = r.eval_loss - ref.eval_loss
        if r.window_losses is not None and ref.window_losses is not None:
            iv = paired_delta(r.window_losses, ref.window_losses, resamples=resamples, seed=seed)
            r.delta_vs_bf16, r.delta_lo, r.delta_hi = iv.value, iv.lo, iv.hi
        for name, col in r.extra.items():
            other = ref.extra.get(name)
            if other is None:
                continue
            iv = paired_delta(col["window_losses"], other["window_losses"], resamples=resamples,
                              seed=seed)
            col.update(delta=iv.value, delta_lo=iv.lo, delta_hi=iv.hi)


def gaps(rows: Sequence[Row], *, resamples: int = RESAMPLES, seed: int = 0,
         extra: str | None = None) -> list[Gap]:
    """Per format with a PTQ and a QAT row with intervals (after :func:`assign_deltas`, same
    ``resamples`` / ``seed``): both gaps and the gap-closure interval; ``extra``: measured by that
    extra evaluator column (its per-window losses on the four rows) instead."""
    def losses(r: Row):
        return r.window_losses if extra is None else r.extra[extra]["window_losses"]

    by = {(r.format, r.method): r for r in rows}
    trained, cont = by.get(("bf16", "trained")), by.get(("bf16", "continued"))
    out = []
    for f in dict.fromkeys(r.format for r in rows):
        p, q = by.get((f, "ptq")), by.get((f, "qat"))
        if None in (p, q, trained, cont) or delta_interval(p, extra) is None \
                or delta_interval(q, extra) is None:
            continue
        out.append(Gap(f, delta_interval(p, extra), delta_interval(q, extra),
                       gap_closed(losses(p), losses(trained), losses(q), losses(cont),
                                  resamples=resamples, seed=seed)))
    return out


def _state(iv: Interval) -> str:
    return "significant" if iv.significant else "within noise: interval covers 0"


def gap_line(g: Gap) -> str:
    line = (f"{g.format}: PTQ Δ {g.ptq.fmt()} nats ({_state(g.ptq)}), "
            f"QAT Δ {g.qat.fmt()} ({_state(g.qat)})")
    if not g.ptq.lo > 0.0:      # covers 0 (or PTQ significantly *better*): nothing to close
        return line + "; no PTQ gap to close, so no percentage"
    closed = g.closed.fmt(".0f", scale=100, unit="%")
    if g.closed.significant:
        return line + f"; QAT closes {closed} of the PTQ gap"
    return (line + f"; QAT's improvement over PTQ is not significant (closed fraction {closed} "
            f"covers 0%)")


def headlines(rows: Sequence[Row], *, resamples: int = RESAMPLES, seed: int = 0) -> list[str]:
    """The summary lines (after :func:`assign_deltas`): one per format with PTQ and QAT, one per
    other compared row (baselines), stating significance on each; then the largest train-infer
    mismatch."""
    out, covered = [], set()
    for g in gaps(rows, resamples=resamples, seed=seed):
        out.append(gap_line(g))
        covered.add(g.format)
    for r in rows:
        iv = delta_interval(r)
        if iv is None or r.format in covered:
            continue
        out.append(f"{r.format} {r.method}: Δ {iv.fmt()} nats vs {r.reference} ({_state(iv)})")
    mm = [r for r in rows if r.max_abs_dlogprob is not None]
    if mm:
        worst = max(mm, key=lambda r: r.max_abs_dlogprob)
        out.append(f"largest train-infer |Δ logprob|: {worst.max_abs_dlogprob:.2e} "
                   f"({worst.format} {worst.method}; mean {worst.mean_abs_dlogprob:.2e})")
    return out
