"""Export a BF16 (or QAT-trained) MoE checkpoint to packed 4-bit formats that servers load.

- :func:`export_checkpoint` — HF BF16 dir or training checkpoint → compressed-tensors
  ``pack-quantized`` (INT4 W4A16), ``mxfp4-pack-quantized`` / gpt-oss native MXFP4, or
  ``nvfp4-pack-quantized``; streaming, bounded memory, atomic, one or N processes (see
  :mod:`.pipeline`). A training checkpoint is read tensor by tensor from its distributed-checkpoint
  files without building the model (:mod:`.megatron_source`, :mod:`.dcp_reader`); a running model
  exports the same way from its local shards (:mod:`.live_source`).
- :func:`verify_export` — checks an export with the consumers' own readers (see :mod:`.verify`).
- :func:`train_infer_consistency` — |Δ logprob| and KL between the training model and the
  served export (see :mod:`.consistency`).
- :func:`export_gguf` — one GGUF file for llama.cpp (Q4_0 / MXFP4 / NVFP4 from our codes), with
  its exactness report (see :mod:`.gguf_export`; llama.cpp evaluation in :mod:`.gguf_eval`).

Entry points: ``tools/export.py``, ``tools/verify_export.py``.
"""
from int4_qat.export.pipeline import ExportResult, export_checkpoint

__all__ = ["ExportResult", "export_checkpoint", "export_gguf", "verify_export", "train_infer_consistency"]


def __getattr__(name):  # lazy: verification pulls in transformers / compressed-tensors
    if name == "verify_export":
        from int4_qat.export.verify import verify_export

        return verify_export
    if name == "export_gguf":  # needs the gguf package
        from int4_qat.export.gguf_export import export_gguf

        return export_gguf
    if name == "train_infer_consistency":
        from int4_qat.export.consistency import train_infer_consistency

        return train_infer_consistency
    raise AttributeError(name)
