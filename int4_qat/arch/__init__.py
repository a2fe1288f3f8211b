"""Architectures: HF ``config.json`` -> Megatron-Core ``GPTModel``, and HF <-> Megatron weights.

```python
from int4_qat.arch import load_arch, build_model, import_hf_checkpoint, export_hf_state_dict
arch = load_arch(hf_dir)                    # model_type in {qwen3_moe, qwen3, deepseek_v3, kimi_k2, gpt_oss}
model = build_model(arch, use_te=False)     # on the current Megatron parallel_state
import_hf_checkpoint(model, arch, hf_dir)   # sharded safetensors, any TP/EP/PP layout
for hf_name, tensor in export_hf_state_dict(model, arch): ...   # gathered, HF names
expected = expected_hf_tensors(arch)        # {hf name: shape} the config implies (no model built)
```

Each architecture is a small module registering an :class:`~int4_qat.arch.base.ArchDefinition`
(config parsing + one name-mapping table, with tensor shapes, used both ways); see ``base.py`` for
how the table works and ``qwen3.py`` for an example. :mod:`int4_qat.arch.shape` is the torch-free
reading of a config's sizes (planner, layout checks); importing it does not import torch, which is
why the names below are resolved lazily.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Arch": "base", "ArchDefinition": "base", "ArchParts": "base", "HFConfig": "base", "Rule": "base",
    "build_model": "base", "load_arch": "base", "register_arch": "base",
    "registered_model_types": "base", "expected_hf_tensors": "expected", "ExpectedTensors": "expected",
    "HFCheckpointReader": "hf_io", "export_hf_state_dict": "hf_io", "import_hf_checkpoint": "hf_io",
    "write_hf_checkpoint": "hf_io",
    "ArchShape": "shape", "arch_shape": "shape",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"int4_qat.arch.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'int4_qat.arch' has no attribute {name!r}")
