"""Export from a training checkpoint (Megatron-Core distributed checkpoint + ``recipe.yaml``).

The trained model is loaded on one CPU process by :func:`int4_qat.checkpoint.load_model_for_export`
(dist_checkpointing reshards any TP/EP/PP layout), its *raw* (master) weights are gathered to HF
names by :func:`int4_qat.arch.export_hf_state_dict` — the single HF⇄Megatron name mapping — and
written, in the parameters' own dtype, as an intermediate HF safetensors dir in a temp directory
beside the output (:func:`materialized_hf_dir`). That dir then goes through exactly the same
streaming conversion as an HF input (:func:`int4_qat.export.pipeline.export_hf_dir`, or the GGUF
writer :func:`int4_qat.export.gguf_export.write_gguf`) with the recipe's scheme, so the packed
codes are computed from the same fp32 weights the training fake quant saw (no bf16 rounding
before quantization) and the train-infer gap is zero by construction.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator

__all__ = ["export_megatron", "materialized_hf_dir"]


@contextmanager
def materialized_hf_dir(iter_dir: str, output: str) -> Iterator[tuple[str, str | None]]:
    """``(hf_dir, tokenizer_dir)``: the checkpoint as a temporary HF dir beside ``output`` (removed
    on exit) and the recipe's HF tokenizer dir (``None``: the byte-level tokenizer)."""
    from int4_qat.arch import export_hf_state_dict, write_hf_checkpoint
    from int4_qat.checkpoint import load_model_for_export

    model, arch, recipe = load_model_for_export(iter_dir)
    config = dict(arch.hf_config)
    dtypes = {p.dtype for p in model.parameters()}
    config["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "") if len(dtypes) == 1 else "float32"
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".megatron-hf-", dir=parent) as tmp:
        write_hf_checkpoint(export_hf_state_dict(model, arch), tmp, config=config)
        del model
        side = None
        tok = getattr(getattr(recipe, "model", None), "tokenizer", None) if recipe is not None else None
        if tok and os.path.isdir(str(tok)):
            side = str(tok)
        yield tmp, side


def export_megatron(iter_dir: str, output_dir: str, scheme, *, serving_tp: int = 1, serving_ep: int = 1, overwrite: bool = False,
                    progress: bool = True, workers: int | None = None, allow_unservable: bool = False):
    from int4_qat.export.pipeline import export_hf_dir

    with materialized_hf_dir(iter_dir, output_dir) as (tmp, side):
        return export_hf_dir(tmp, output_dir, scheme, serving_tp=serving_tp, serving_ep=serving_ep, workers=workers, overwrite=overwrite,
                             progress=progress, allow_unservable=allow_unservable, side_dir=side)
