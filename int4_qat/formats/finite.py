"""Finiteness of quantized weights: raise at once (export, tests) or defer to once per step.

A NaN or Inf in a weight must never be quantized silently: its group's scale would be NaN and
the served weight garbage. Every format computes the per-group ``amax`` anyway and a NaN or Inf
anywhere in a group shows up in it, so the check costs one reduction of a small tensor. What it
must not cost is a device-to-host synchronisation per weight: ``bool(flag)`` on a CUDA tensor
waits for the GPU, and a training forward fake-quantizes every expert weight (about 1,500 per
micro-batch for Qwen3-30B-A3B at EP 8) -- 1,500 stalls, and no CUDA-graph capture at all.

Two modes, process-wide:

``"raise"`` (default)
    :func:`report_nonfinite` raises ``ValueError`` naming the tensor immediately: what direct
    callers (the exporter, tests, notebooks) want.
``"defer"``
    The flag stays on the device: it is OR-ed in place into a persistent per-name 0-d bool buffer
    (one device op, no host sync, capturable in a CUDA graph once the buffer exists).
    :func:`raise_if_nonfinite` later checks every buffer with one ``any()`` per device -- one
    sync -- and raises ``ValueError`` naming every weight that was non-finite since the last check.

Training uses the second (``int4_qat.train.Trainer.train_step``)::

    from int4_qat.formats import finite_check, raise_if_nonfinite
    with finite_check("defer"):
        loss = run_forward_backward()      # fake quant on every expert weight, no syncs
    raise_if_nonfinite()                   # once per step, after the loss was fetched anyway
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

__all__ = [
    "FINITE_CHECK_MODES",
    "check_finite",
    "finite_check",
    "finite_check_mode",
    "raise_if_nonfinite",
    "report_nonfinite",
    "set_finite_check",
]

FINITE_CHECK_MODES = ("raise", "defer")
_mode = "raise"
#: (name, device) -> persistent 0-d bool flag: True once a non-finite weight was seen.
_flags: dict[tuple[str, torch.device], Tensor] = {}


def _check_mode(mode: str) -> str:
    if mode not in FINITE_CHECK_MODES:
        raise ValueError(f"unknown finite-check mode {mode!r} (allowed: {list(FINITE_CHECK_MODES)})")
    return mode


def finite_check_mode() -> str:
    """The current mode, ``"raise"`` or ``"defer"``."""
    return _mode


def set_finite_check(mode: str) -> str:
    """Set the process-wide mode; returns the previous one."""
    global _mode
    prev, _mode = _mode, _check_mode(mode)
    return prev


@contextlib.contextmanager
def finite_check(mode: str) -> Iterator[None]:
    """``with finite_check("defer"): ...`` -- the mode inside the block, restored after it."""
    prev = set_finite_check(mode)
    try:
        yield
    finally:
        set_finite_check(prev)


def report_nonfinite(bad: Tensor, name: str) -> None:
    """``bad`` is a 0-d (or 1-element) bool tensor, True when ``name``'s weight holds NaN / Inf.

    ``"raise"``: one ``bool()`` (a sync on GPU) and a ValueError naming the tensor.
    ``"defer"``: OR-ed into ``name``'s flag on ``bad``'s device, no sync.
    """
    if _mode == "raise":
        if bool(bad):
            raise ValueError(f"{name}: weight contains NaN or Inf; refusing to quantize it")
        return
    key = (name, bad.device)
    flag = _flags.get(key)
    if flag is None:
        flag = _flags[key] = torch.zeros((), dtype=torch.bool, device=bad.device)
    flag.logical_or_(bad.reshape(()))


def check_finite(amax: Tensor, name: str) -> None:
    """``amax`` is a reduction of |w|; a NaN or Inf anywhere in ``w`` shows up in it."""
    report_nonfinite(~torch.isfinite(amax).all(), name)


def raise_if_nonfinite() -> None:
    """Raise ``ValueError`` naming every weight flagged since the last call (deferred mode).

    One ``any()`` per device over all flags (one host sync per device); the flags are cleared
    when they are reported, so one bad step is reported once.
    """
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for (name, dev), flag in _flags.items():
        by_device.setdefault(dev, []).append((name, flag))
    bad: list[str] = []
    for items in by_device.values():
        stacked = torch.stack([f for _, f in items])
        if bool(stacked.any()):
            bad += [n for (n, f), b in zip(items, stacked.tolist(), strict=True) if b]
            for _, f in items:
                f.zero_()
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(f"{len(bad)} quantized weight(s) contain NaN or Inf: {shown}; "
                         "the fake quant of this step is invalid (check the learning rate, "
                         "the loss scale and the checkpoint these weights came from)")
