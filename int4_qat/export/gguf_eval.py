"""Run a GGUF export in llama.cpp (through llama-cpp-python) on token ids: logits and tokens/s.

llama-cpp-python 0.3.36 compiles the llama.cpp it ships when it is installed; ``Llama`` loads a
GGUF file, ``eval`` runs ``llama_decode`` on token ids, and with ``logits_all=True`` every
position's logits are kept (``Llama.scores``). This module feeds token ids directly (no
tokenizer round trip), one sequence at a time from an empty KV cache, so each row's logits are
those of a plain causal forward over that row — the quantity
:func:`int4_qat.export.consistency.compare_logits` compares with the training model.

What llama.cpp computes on CPU (ggml-cpu.c ``type_traits_cpu``): a Q4_0 / MXFP4 / NVFP4 weight is
multiplied with activations quantized to Q8_0 (int8, one fp16 scale per 32), F16 / BF16 weights
with activations rounded to F16 / BF16, F32 weights in F32. The KV cache is F16 by default; here
it is F32 (``type_k`` / ``type_v``) so that attention adds no rounding of its own and the numbers
isolate the weights' arithmetic.

    m = GGUFModel("out/tiny-moe.gguf", n_ctx=256)
    r = m.evaluate(tokens)            # tokens: int64 [B, S]
    r.logits                          # float32 [B, S, V]
    r.tokens_per_s                    # prompt-processing throughput of this run
    m.decode_tokens_per_s(prompt, 32) # greedy single-token decoding throughput
    m.decode(prompt, 32)              # the same, as a GGUFEval (logits None) with wall + CPU seconds

Timing: ``seconds`` is wall time spent in ``llama_decode``, ``cpu_seconds`` the process CPU time
(all threads) over the same calls; on a shared machine the latter is the steadier estimate of the
wall time on a quiet one (with ``n_threads=1`` they are equal there; ggml's worker threads spin
while they wait, so with more threads it counts about ``n_threads`` times the wall time).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GGUFEval", "GGUFModel", "gguf_logits"]

_GGML_TYPE_F32 = 0  # ggml.h enum ggml_type


@dataclass
class GGUFEval:
    logits: torch.Tensor | None   # float32 [B, S, V] (None for decode)
    seconds: float                # wall time spent in llama_decode
    tokens: int
    cpu_seconds: float = 0.0      # process CPU time over the same calls (module docstring)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


class GGUFModel:
    """A GGUF file loaded in llama.cpp (CPU), evaluated on token ids."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 512, n_threads: int | None = None,
                 kv_f32: bool = True):
        try:
            from llama_cpp import Llama
        except ImportError as e:  # pragma: no cover - pinned in requirements.txt
            raise ImportError("llama-cpp-python is not installed (pip install -r requirements.txt "
                              "builds it; see README 'Serving with llama.cpp')") from e
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such GGUF file")
        threads = n_threads or max(1, min(4, os.cpu_count() or 1))
        kv = {"type_k": _GGML_TYPE_F32, "type_v": _GGML_TYPE_F32} if kv_f32 else {}
        self.n_ctx = n_ctx
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                         n_threads=threads, n_threads_batch=threads, logits_all=True, seed=0,
                         verbose=False, **kv)

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def evaluate(self, tokens: torch.Tensor) -> GGUFEval:
        """Logits of every position of every row of ``tokens`` (int ``[B, S]``, S <= n_ctx)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.n_ctx:
            raise ValueError(f"tokens must be [B, S] with S <= n_ctx={self.n_ctx}, got {tuple(tokens.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.n_vocab:
            raise ValueError(f"token ids must lie in [0, {self.n_vocab}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        b, s = tokens.shape
        out = np.empty((b, s, self.n_vocab), dtype=np.float32)
        seconds = cpu = 0.0
        for i, row in enumerate(tokens.tolist()):
            self.llm.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            self.llm.eval(row)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            out[i] = self.llm.scores[:s]
        return GGUFEval(torch.from_numpy(out), seconds, b * s, cpu)

    def decode(self, prompt: list[int], n: int) -> GGUFEval:
        """Greedy decoding of ``n`` tokens after ``prompt``, one ``llama_decode`` per token; the
        timing covers the ``n`` decoding calls only (logits None)."""
        if len(prompt) + n > self.n_ctx:
            raise ValueError(f"prompt ({len(prompt)}) + n ({n}) exceeds n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(prompt)
        tok = int(np.argmax(self.llm.scores[len(prompt) - 1]))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return GGUFEval(None, time.perf_counter() - t0, n, time.process_time() - c0)

    def decode_tokens_per_s(self, prompt: list[int], n: int) -> float:
        """Greedy decoding throughput (wall) of :meth:`decode`."""
        return self.decode(prompt, n).tokens_per_s

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gguf_logits(path: str | os.PathLike, tokens: torch.Tensor, *, n_threads: int | None = None,
                kv_f32: bool = True) -> GGUFEval:
    """Load ``path`` in llama.cpp, evaluate ``tokens [B, S]``, return logits and throughput."""
    with GGUFModel(path, n_ctx=max(32, int(tokens.shape[1])), n_threads=n_threads, kv_f32=kv_f32) as m:
        return m.evaluate(tokens)
