"""Triton kernels (CUDA) of int4_qat.formats.fused -- placeholder, filled in below."""
from __future__ import annotations


def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def available() -> bool:
    return False


def why_unavailable() -> str:
    return _import_error() or "not implemented"
