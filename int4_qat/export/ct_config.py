"""``config.json`` ``quantization_config`` and ignore lists, generated from the scheme.

compressed-tensors (what SGLang/vLLM/transformers read) describes a checkpoint with one
``QuantizationConfig``: ``config_groups`` (each a ``QuantizationScheme``: ``targets`` +
``weights`` ``QuantizationArgs``), ``ignore``, ``format``, ``quantization_status`` and
``kv_cache_scheme``. We build it with compressed-tensors' own classes from its own presets
(``W4A16``, ``MXFP4A16``, ``NVFP4A16`` in compressed_tensors/quantization/quant_scheme.py) and
serialize it the way ``ModelCompressor.update_config`` does
(compressed_tensors/compressors/model_compressors/model_compressor.py), so the JSON is exactly
what llm-compressor would have written for the same scheme.

The ignore list is never hand-kept: it is computed from the set of Linear-like modules the
scheme does *not* quantize. Each name is generalized over layer / expert indices into an
anchored ``re:`` pattern (``re:model\\.layers\\.\\d+\\.self_attn\\.q_proj$``) and every pattern is
checked against the quantized modules: a pattern that would also hide a quantized module falls
back to the exact name. Consumers match ``re:`` entries with ``re.match`` (compressed-tensors
utils/match.py ``match_name``; vLLM ``should_ignore_layer``; SGLang), while *plain* entries are
compared exactly by compressed-tensors and vLLM but as substrings by SGLang; so plain names are
used only when they are no substring of any quantized name (``lm_head``).

gpt-oss native MXFP4 (``quant_method: mxfp4``) uses ``modules_to_not_convert`` instead,
matched by transformers' quantizers_utils.py ``should_convert_module`` as a boundary-anchored
regex, with ``*`` for the layer index as in the published gpt-oss configs
(``model.layers.*.self_attn``).
"""
from __future__ import annotations

import re
from typing import Iterable

__all__ = ["ct_format", "quantization_config", "ignore_list", "gpt_oss_modules_to_not_convert",
           "compressed_tensors_scheme"]

_CT_FORMAT = {"int4": "pack-quantized", "mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}
_PRESET = {"int4": "W4A16", "mxfp4": "MXFP4A16", "nvfp4": "NVFP4A16"}
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _fmt(scheme) -> str:
    return getattr(scheme.format, "value", scheme.format)


def ct_format(scheme) -> str:
    return _CT_FORMAT[_fmt(scheme)]


def compressed_tensors_scheme(scheme, targets: list[str] | None = None):
    """The ``QuantizationScheme`` compressed-tensors' preset gives for our scheme."""
    from compressed_tensors.quantization import preset_name_to_scheme

    fmt = _fmt(scheme)
    qs = preset_name_to_scheme(_PRESET[fmt], targets or ["Linear"])
    if qs.weights.group_size != scheme.group_size:
        if fmt != "int4":
            raise ValueError(
                f"{fmt} has a fixed block size {qs.weights.group_size}; got group_size {scheme.group_size}"
            )
        qs.weights.group_size = scheme.group_size
    return qs


def _generalize(name: str) -> str:
    parts = _INDEX.split(name)
    return r"\.\d+".join(re.escape(p) for p in parts)


def ignore_list(unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """Compact ignore entries covering every ``unquantized`` module and no ``quantized`` one."""
    unq, q = sorted(set(unquantized)), sorted(set(quantized))
    out: list[str] = []
    covered: set[str] = set()
    for name in unq:
        if name in covered:
            continue
        if not _INDEX.search(name) and not any(name in other for other in q):
            entry = name
            covered.add(name)
        else:
            pat = _generalize(name) + "$"
            rx = re.compile(pat)
            if any(rx.match(other) for other in q):
                pat = re.escape(name) + "$"
                rx = re.compile(pat)
            entry = "re:" + pat
            covered.update(n for n in unq if rx.match(n))
        out.append(entry)
    return out


def gpt_oss_modules_to_not_convert(unquantized: Iterable[str]) -> list[str]:
    """``model.layers.*.self_attn.q_proj``-style names (transformers ``should_convert_module``)."""
    seen: list[str] = []
    for name in sorted(set(unquantized)):
        g = _INDEX.sub(".*", name)
        if g not in seen:
            seen.append(g)
    return seen


def quantization_config(scheme, ignore: list[str]) -> dict:
    """The ``quantization_config`` dict, serialized as ``ModelCompressor.update_config`` does."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qc = QuantizationConfig(
        config_groups={"group_0": compressed_tensors_scheme(scheme)},
        format=ct_format(scheme),
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
        kv_cache_scheme=None,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude=["quant_method"]),
    }
