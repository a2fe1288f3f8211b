"""Architectures: HF ``config.json`` -> Megatron-Core ``GPTModel``, and HF <-> Megatron weights.

```python
from int4_qat.arch import load_arch, build_model, import_hf_checkpoint, export_hf_state_dict
arch = load_arch(hf_dir)                    # model_type in {qwen3_moe, qwen3, deepseek_v3, gpt_oss}
model = build_model(arch, use_te=False)     # on the current Megatron parallel_state
import_hf_checkpoint(model, arch, hf_dir)   # sharded safetensors, any TP/EP/PP layout
for hf_name, tensor in export_hf_state_dict(model, arch): ...   # gathered, HF names
```

Each architecture is a small module registering an :class:`~int4_qat.arch.base.ArchDefinition`
(config parsing + one name-mapping table used both ways); see ``base.py`` for how the table
works and ``qwen3.py`` for an example.
"""
from int4_qat.arch.base import (
    Arch,
    ArchDefinition,
    ArchParts,
    HFConfig,
    Rule,
    build_model,
    load_arch,
    register_arch,
    registered_model_types,
)
from int4_qat.arch.hf_io import (
    HFCheckpointReader,
    export_hf_state_dict,
    import_hf_checkpoint,
    write_hf_checkpoint,
)

__all__ = [
    "Arch",
    "ArchDefinition",
    "ArchParts",
    "HFConfig",
    "HFCheckpointReader",
    "Rule",
    "build_model",
    "export_hf_state_dict",
    "import_hf_checkpoint",
    "load_arch",
    "register_arch",
    "registered_model_types",
    "write_hf_checkpoint",
]
