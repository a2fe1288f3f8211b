"""Megatron-Core *training* machinery on a CPU: DDP buffers, optimizer, schedules, dist checkpoints.

Companion of :mod:`int4_qat.compat.cpu` (which makes the *model* run on a CPU). Written by the
training owner because the training loop needs it; it follows the same rules: activated
explicitly (:func:`activate`, called by ``int4_qat.train`` for ``--cpu`` runs and by tests), refuses
to run when CUDA is usable, and patches only the modules listed here.

Megatron-Core 0.16.1 writes ``device="cuda"`` / ``torch.cuda.current_device()`` /
``torch.cuda.synchronize()`` in the training-side modules below (paths relative to
site-packages/megatron/core). Instead of editing each call, each of these modules gets its module-
global ``torch`` replaced by :class:`_CpuTorch`, a proxy that forwards everything to the real
``torch`` except that tensor factories map a CUDA device to the CPU and ``torch.cuda`` answers
``current_device() -> "cpu"`` with no-op streams / synchronize / empty_cache:

* ``distributed/param_and_grad_buffer.py:783-806`` grad (and param) buffers on ``current_device()``;
  ``:417-529`` communication-stream waits.
* ``distributed/distributed_data_parallel.py``, ``distributed/finalize_model_grads.py``.
* ``optimizer/optimizer.py:473-485, 907, 1141`` ``found_inf`` / ``_scale`` / loss scale on CUDA.
* ``optimizer/clip_grads.py:90-115`` grad-norm buffers; ``utils.py:1207``
  ``local_multi_tensor_l2_norm`` returns its norm on CUDA (the no-Apex/TE fallback).
* ``pipeline_parallel/schedules.py:596, 983, 2138`` token counter on CUDA;
  ``pipeline_parallel/p2p_communication.py:190-321`` shape / receive buffers on
  ``current_device()`` and ``torch.cuda.synchronize()`` (pipeline parallel over gloo).
* ``transformer/moe/router.py:88-92`` ``TopKRouter.gating`` moves a CPU weight to
  ``current_device()`` (a no-op on the proxy).
* ``dist_checkpointing/strategies/{filesystem_async,async_utils,state_dict_saver}.py``,
  ``dist_checkpointing/exchange_utils.py``: ``torch.cuda.synchronize()`` before writing, rank
  liveness tensors and exchange buffers on CUDA.

One function is replaced rather than proxied: ``clip_grad_by_total_norm_fp32``
(``optimizer/clip_grads.py:167``) asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``; the
twin here checks the dtype (fp32/bf16) instead and scales the grads in place the same way.
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

__all__ = ["activate", "is_active", "PROXIED_MODULES"]

#: Megatron-Core modules whose module-global ``torch`` is replaced by the CPU proxy.
PROXIED_MODULES = (
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "modelopt.torch.opt.plugins.megatron",   # _modelopt_get_extra_state: torch.cuda.synchronize()
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "as_tensor")
_ACTIVE = False


def is_active() -> bool:
    return _ACTIVE


def _cpu_device(kwargs: dict) -> dict:
    d = kwargs.get("device")
    if d is not None and (isinstance(d, int) or (isinstance(d, str) and d.startswith("cuda"))
                          or (isinstance(d, torch.device) and d.type == "cuda")):
        kwargs["device"] = "cpu"
    return kwargs


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: every operation is already ordered on a CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _cuda_namespace() -> types.ModuleType:
    ns = types.ModuleType("torch.cuda (int4_qat CPU proxy)")
    ns.__getattr__ = lambda name: getattr(torch.cuda, name)  # anything else: the real torch.cuda
    ns.current_device = lambda: "cpu"
    ns.is_available = lambda: False
    ns.device_count = lambda: 0
    ns.synchronize = lambda *a, **k: None
    ns.empty_cache = lambda *a, **k: None
    ns.memory_allocated = lambda *a, **k: 0
    ns.max_memory_allocated = lambda *a, **k: 0
    ns.Stream = _NoStream
    ns.default_stream = lambda *a, **k: _NoStream()
    ns.current_stream = lambda *a, **k: _NoStream()
    ns.stream = lambda *a, **k: contextlib.nullcontext()
    return ns


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by the proxied Megatron modules (see the module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cuda_namespace()
        for name in _FACTORIES:
            real = getattr(torch, name)
            setattr(self, name, (lambda f: lambda *a, **k: f(*a, **_cpu_device(k)))(real))

    def __getattr__(self, name):
        return getattr(torch, name)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # CPU twin of megatron/core/optimizer/clip_grads.py clip_grad_by_total_norm_fp32.
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is None:
            continue
        if g.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"clip_grad_by_total_norm_fp32: expected fp32/bf16 grads, got {g.dtype}")
        grads.append(to_local_if_dtensor(g).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def activate(*, force: bool = False) -> None:
    """Install the training shims (idempotent). Also activates :mod:`int4_qat.compat.cpu`."""
    global _ACTIVE
    if _ACTIVE:
        return
    if torch.cuda.is_available() and not force:
        raise RuntimeError("int4_qat.compat.cpu_training.activate() refused: a CUDA device is "
                           "available; GPU runs use Megatron's CUDA path (pass force=True to run "
                           "the CPU path anyway)")
    from int4_qat.compat import cpu as compat_cpu

    compat_cpu.activate(force=force)
    proxy = _CpuTorch()
    for name in PROXIED_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    from megatron.core.optimizer import clip_grads, optimizer

    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _ACTIVE = True
