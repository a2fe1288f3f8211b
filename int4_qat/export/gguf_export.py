"""GGUF export for llama.cpp: our trained codes in Q4_0 / MXFP4 / NVFP4 blocks, streamed.

    python tools/export.py --container gguf --input runs/tiny-moe/ckpt --output out/tiny-moe.gguf
    python tools/export.py --container gguf --input HF_DIR --output out.gguf --format int4 --group-size 32

What is written (one ``.gguf`` file, via the ``gguf`` package's ``GGUFWriter``):

* header, hyperparameters and tensor names for the architecture (:mod:`.gguf_arch`), tokenizer
  metadata (:mod:`.gguf_vocab`), ``general.file_type``, and ``int4_qat.scheme`` (the scheme as
  JSON: :func:`verify_gguf` recomputes the training fake quant from it);
* quantized weights: the scheme's codes and scales (:mod:`int4_qat.formats`, the numbers the
  training fake quant used) rearranged into GGML blocks (:mod:`.gguf_blocks`) — never
  re-quantized by ggml; NVFP4 adds ``<name>.scale`` (``1/g``) tensors;
* every other tensor in the float type llama.cpp wants: F32 for 1-D / norms / router, the
  checkpoint's own dtype (BF16, F16, F32) otherwise, bit for bit.

Exactness: while writing, every quantized tensor is decoded again with ``gguf.quants`` (the
package's dequantizers) and compared with the training fake-quant weight
(:func:`~.gguf_blocks.check_decoded`); :class:`GGUFReport` says how many elements / blocks differ
and by how much (0 for INT4 with ``served: exact`` trained in fp32, and for MXFP4). The same check
runs on the finished file with :func:`verify_gguf`.

Memory and disk at scale: header and tensor table are written first from metadata alone, then
tensor data is streamed — an expert stack ``[E, N, K]`` one expert at a time — so peak memory is
the largest single source tensor plus its output (Qwen3-235B-A22B: the 151936 x 4096 embedding,
1.2 GB in bf16; one expert is 12.6 MB), never a model. Disk: one file, 0.5625 bytes per Q4_0 /
NVFP4 weight and 0.53 per MXFP4 weight plus the float tensors (Qwen3-235B-A22B with Q4_0 experts:
144 GB); llama.cpp loads a single file of any size, ``gguf-split`` can shard it. It is written as
``.<name>.tmp-*`` beside the output and renamed into place, so a failed export leaves nothing.
A training checkpoint is streamed from its files by :mod:`.megatron_source` (no model, no intermediate copy).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from int4_qat.export.gguf_arch import GGUFTensor, add_hparams, parse_config, plan_tensors
from int4_qat.export.gguf_blocks import (TensorCheck, check_decoded, check_layout, ggml_type,
                                         global_scale_inverse, pack_blocks)
from int4_qat.export.gguf_vocab import add_vocab

__all__ = ["GGUFExportResult", "GGUFReport", "SCHEME_KEY", "export_gguf", "verify_gguf", "write_gguf"]

SCHEME_KEY = "int4_qat.scheme"
SOURCE_KEY = "int4_qat.source"
_GGML_FLOAT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_FILE_TYPES = {"int4": "MOSTLY_Q4_0", "mxfp4": "MOSTLY_MXFP4_MOE", "nvfp4": "MOSTLY_NVFP4",
               "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}


@dataclass
class GGUFReport:
    """Decoded-vs-trained weight comparison of every quantized tensor, plus float tensors."""

    quantized: list[TensorCheck] = field(default_factory=list)
    floats: list[TensorCheck] = field(default_factory=list)   # verify_gguf only: bitwise copies

    @property
    def exact(self) -> bool:
        return all(c.exact for c in self.quantized + self.floats)

    @property
    def mismatched(self) -> int:
        return sum(c.mismatched for c in self.quantized + self.floats)

    def summary(self) -> str:
        n = sum(c.elements for c in self.quantized)
        bad = [c for c in self.quantized + self.floats if not c.exact]
        head = (f"{len(self.quantized)} quantized tensors ({n} weights)"
                + (f", {len(self.floats)} float tensors" if self.floats else ""))
        if not bad and not self.quantized:
            return f"{head}: no quantized tensors; every float tensor equals the source bit for bit"
        if not bad:
            return f"{head}: llama.cpp's decoded weights equal the training fake-quant weights exactly"
        worst = max(bad, key=lambda c: c.max_rel)
        notes = sorted({x for c in bad for x in c.notes})
        return (f"{head}: {sum(c.mismatched for c in bad)} weights in {len(bad)} tensors differ "
                f"(max |Δ| {max(c.max_abs for c in bad):.3g}, max relative {worst.max_rel:.3g} in "
                f"{worst.name}); {sum(c.inexact_scale_blocks for c in bad)} blocks with an inexact "
                f"fp16 scale" + (f"; why: {'; '.join(notes)}" if notes else ""))

    def table(self) -> str:
        rows = ["| tensor | type | weights | differ | max abs | max rel | inexact scales |",
                "|---|---|---|---|---|---|---|"]
        for c in self.quantized + [c for c in self.floats if not c.exact]:
            rows.append(f"| {c.name} | {c.ggml_type} | {c.elements} | {c.mismatched} | {c.max_abs:.3g} | "
                        f"{c.max_rel:.3g} | {c.inexact_scale_blocks} |")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"exact": self.exact, "mismatched": self.mismatched, "summary": self.summary(),
                "quantized": [c.as_dict() for c in self.quantized],
                "floats": [c.as_dict() for c in self.floats]}


@dataclass
class GGUFExportResult:
    output: str
    scheme: dict | None
    arch: str
    vocab: str
    report: GGUFReport
    tensors: int = 0
    quantized: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0


FLOAT_TYPES = ("f32", "f16", "bf16")


def _float_qtype(t: GGUFTensor, float_type: str | None = None):
    """F32 for 1-D / norms / router; else ``float_type`` (None: the checkpoint's dtype, lossless)."""
    import gguf

    if t.router_or_norm:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType[(float_type or _GGML_FLOAT[t.dtype]).upper()]


def _scale_name(name: str) -> str:
    return name.removesuffix(".weight") + ".scale"


def _siblings(source, scheme, module: str, quantized: set[str]) -> list[torch.Tensor]:
    """NVFP4: fused partners (gate/up, q/k/v) share one global scale, as in training."""
    from int4_qat.export.convert import _fusion_candidates

    if scheme.format.value != "nvfp4":
        return []
    return [source.read_any(n) for n in _fusion_candidates(module) if n in quantized]


def _reference(scheme, w: torch.Tensor, module: str, sibs, dtype: torch.dtype | None) -> torch.Tensor:
    """The training fake-quant weight to compare with: in ``dtype`` (None: ``w``'s own dtype,
    what a forward with these parameters computes)."""
    from int4_qat.export import convert as cv

    w = w if dtype is None else w.to(dtype)
    return cv.fake_quantize(scheme, w, module, [s.to(w.dtype) for s in sibs])


def _quantized_parts(source, scheme, t: GGUFTensor, quantized: set[str], report: TensorCheck,
                     scale_inv: list, ref_dtype: torch.dtype | None):
    """Yield the GGML blocks of ``t`` one source matrix (expert) at a time; fills ``report``."""
    from int4_qat.export import convert as cv

    for src in t.sources:
        module = src.removesuffix(".weight")
        w = source.read_any(src)
        sibs = _siblings(source, scheme, module, quantized)
        q = cv.quantize(scheme, w, module, sibs)
        blocks = pack_blocks(q, src)
        inv = global_scale_inverse(q) if q.global_scale is not None else None
        report.merge(check_decoded(src, q, blocks, _reference(scheme, w, module, sibs, ref_dtype), inv))
        if inv is not None:
            scale_inv.append(inv)
        yield blocks


def _float_parts(source, t: GGUFTensor, qtype):
    from int4_qat.export.convert import _finite

    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype.name]
    for src in t.sources:
        x = source.read_any(src)
        _finite(src, x)
        yield x.to(dtype).contiguous().view(torch.uint8).numpy()


def _stream(writer, name: str, parts, nbytes: int, bar=None) -> None:
    """``GGUFWriter.write_tensor_data`` for a tensor produced in parts (gguf 0.19.0
    gguf_writer.py): pop its tensor info, align, append the parts, pad, check the size."""
    from gguf.gguf_writer import WriterState

    fout = writer.fout[0]
    first = next(iter(writer.tensors[0]))
    if first != name:
        raise RuntimeError(f"GGUF tensor order: expected {first}, writing {name}")
    info = writer.tensors[0].pop(name)
    writer.write_padding(fout, fout.tell())
    n = 0
    for part in parts:
        part.tofile(fout)
        n += part.nbytes
        if bar is not None:
            bar.update(part.nbytes)
    if n != info.nbytes or n != nbytes:
        raise RuntimeError(f"{name}: wrote {n} bytes, the tensor table announced {info.nbytes}")
    writer.write_padding(fout, n)
    writer.state = WriterState.WEIGHTS


def write_gguf(source, output: str, scheme=None, *, tokenizer_dir: str | None = None,
               float_type: str | None = None, reference_dtype: torch.dtype | None = None,
               overwrite: bool = False, progress: bool = True, source_desc: str = "") -> GGUFExportResult:
    """Write ``source`` (``.config``, ``.tensors()``, ``.read_any(name)``: an HF source) as one GGUF
    file. ``scheme=None`` writes no quantized tensor (the unquantized control). ``float_type``
    (``"f32"``, ``"f16"``, ``"bf16"``) converts the unquantized 2-D weights (rounding, if narrower
    than the checkpoint); None keeps the checkpoint's dtype. ``reference_dtype``: the dtype the
    report's fake-quant reference is computed in (None: each tensor's own dtype, right for a
    training checkpoint, whose parameters are what its forward used)."""
    import gguf

    t0 = time.perf_counter()
    if float_type not in (None, *FLOAT_TYPES):
        raise ValueError(
            f"float_type {float_type!r}: choose one of {list(FLOAT_TYPES)} or None (the checkpoint's dtype)"
        )
    config = source.config
    arch, parts = parse_config(config)
    plan = plan_tensors(source.tensors(), config, scheme)
    quantized = {s for t in plan if t.quantized for s in t.sources}
    if scheme is not None:
        if not quantized:
            raise ValueError(
                f"scheme {scheme.describe()} quantizes no tensor of this "
                f"{config.get('model_type')} checkpoint; nothing to export as GGUF"
            )
        for t in plan:
            if t.quantized:
                check_layout(scheme, t.sources[0], t.shape)
    out = os.path.abspath(output)
    if not out.endswith(".gguf"):
        raise ValueError(f"output {out}: a GGUF export is one file; give a path ending in .gguf")
    if os.path.isdir(out) or (os.path.exists(out) and not overwrite):
        raise ValueError(f"output {out} already exists; choose another file name or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    os.close(fd)
    report = GGUFReport()
    bar = None
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        w.add_name(os.path.splitext(os.path.basename(out))[0])
        add_hparams(w, parts)
        floats = {_float_qtype(t, float_type).name for t in plan if not t.quantized and not t.router_or_norm} or {"F32"}
        kind = scheme.format.value if scheme is not None else (floats.pop() if len(floats) == 1 else "F32")
        w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[kind]]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = add_vocab(w, config, tokenizer_dir)
        w.add_string(SCHEME_KEY, json.dumps(scheme.to_dict() if scheme is not None else None))
        w.add_string(SOURCE_KEY, source_desc or getattr(source, "root", ""))
        entries = []
        for t in plan:
            qtype = ggml_type(scheme.format) if t.quantized else _float_qtype(t, float_type)
            entries.append((t.name, t, qtype, _add_info(w, t.name, t.shape, qtype)))
            if t.quantized and scheme.format.value == "nvfp4":
                f32, sh = gguf.GGMLQuantizationType.F32, ((t.shape[0],) if len(t.shape) == 3 else (1,))
                entries.append((_scale_name(t.name), None, f32, _add_info(w, _scale_name(t.name), sh, f32)))
        if scheme is not None and scheme.format.value == "nvfp4":
            # W4A16: never quantize these matmuls' activations below Q8 (src/llama-model.cpp
            # llama_prec_policy::load; the gguf 0.19.0 package has no helper for these keys)
            names = [t.name for t in plan if t.quantized]
            w.add_array("general.tensor_extra.name", names)
            w.add_array("general.tensor_extra.prec_a4", [False] * len(names))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(e[3] for e in entries), unit="B", unit_scale=True, desc="export gguf")
        scale_inv: list = []
        for name, t, qtype, nbytes in entries:
            if t is None:  # NVFP4: 1/g of each matrix of the tensor written just before
                _stream(w, name, [np.concatenate(scale_inv).astype(np.float32)], nbytes, bar)
                scale_inv = []
            elif t.quantized:
                check = TensorCheck(t.name, qtype.name)
                _stream(
                    w,
                    t.name,
                    _quantized_parts(source, scheme, t, quantized, check, scale_inv, reference_dtype),
                    nbytes,
                    bar,
                )
                if scheme.served == "bf16" and check.mismatched:
                    check.notes.append(
                        "scheme served=bf16 (Marlin): training computed bf16(q*s), "
                        "llama.cpp computes q*s exactly; train with quant.served: exact"
                    )
                report.quantized.append(check)
            else:
                _stream(w, t.name, _float_parts(source, t, qtype), nbytes, bar)
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    infos = {i.name: i for i in source.tensors()}
    return GGUFExportResult(
        output=out,
        scheme=scheme.to_dict() if scheme is not None else None,
        arch=gguf.MODEL_ARCH_NAMES[arch],
        vocab=vocab,
        report=report,
        tensors=len(entries),
        quantized=sum(t.quantized for t in plan),
        input_bytes=sum(infos[s].nbytes for t in plan for s in t.sources),
        output_bytes=os.path.getsize(out),
        seconds=time.perf_counter() - t0,
    )


def _add_info(writer, name: str, shape: tuple[int, ...], qtype) -> int:
    import gguf

    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    nbytes = math.prod(byte_shape)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    return nbytes


def export_gguf(
    input_dir: str,
    output: str,
    *,
    fmt: str | None = None,
    group_size: int | None = None,
    scope: str | None = None,
    recipe: str | None = None,
    quantize: bool = True,
    float_type: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GGUFExportResult:
    """Export an HF BF16 dir or a training checkpoint dir (``recipe.yaml``) to one GGUF file.

    The scheme is resolved as for the compressed-tensors export (a recipe fixes it; flags may only
    restate it). Without a recipe, an INT4 scheme serves ``exact`` (what llama.cpp computes), so
    the report compares with the weight llama.cpp serves. ``quantize=False`` writes the
    unquantized control (every weight in its float type; ``float_type`` as in :func:`write_gguf`).
    The report's reference is the fake quant
    in the parameters' dtype for a training checkpoint (what its forward computed) and in float32
    for an HF dir (no forward ran; float32 is the model that imports it on CPU, and what the
    scheme's served weight is).
    """
    import dataclasses

    from int4_qat.export.pipeline import is_training_checkpoint, resolve_scheme
    from int4_qat.export.source import open_hf_source

    def scheme_for(d: str):
        if not quantize:
            return None
        scheme, _ = resolve_scheme(fmt, group_size, scope, recipe, d)
        fixed = recipe is not None or os.path.isfile(os.path.join(d, "recipe.yaml"))
        if not fixed and scheme.served is not None:
            scheme = dataclasses.replace(scheme, served="exact")
        return scheme

    if is_training_checkpoint(input_dir):
        # streamed from the checkpoint files (no model built): the same source the
        # compressed-tensors export reads (int4_qat.export.megatron_source)
        from int4_qat.export.megatron_source import open_checkpoint_source

        source, iter_dir, ck_recipe = open_checkpoint_source(input_dir)
        scheme = scheme_for(str(iter_dir))
        tok = ck_recipe.model.tokenizer if ck_recipe is not None else None
        return write_gguf(
            source,
            output,
            scheme,
            tokenizer_dir=str(tok) if tok and os.path.isdir(str(tok)) else None,
            float_type=float_type,
            reference_dtype=None,
            overwrite=overwrite,
            progress=progress,
            source_desc=str(iter_dir),
        )
    source = open_hf_source(input_dir)
    return write_gguf(
        source,
        output,
        scheme_for(input_dir),
        tokenizer_dir=source.root,
        float_type=float_type,
        reference_dtype=torch.float32,
        overwrite=overwrite,
        progress=progress,
    )


def verify_gguf(
    path: str, reference, scheme=None, *, reference_dtype: torch.dtype | None = torch.float32
) -> GGUFReport:
    """Read the GGUF file at ``path`` back with ``gguf.GGUFReader``, decode every tensor with
    ``gguf.quants`` and compare with ``reference`` (an HF dir or source with the weights that were
    exported): quantized tensors against the scheme's fake quant in ``reference_dtype`` (None: the
    weights' own dtype; the scheme stored in the file unless given), float tensors bit for bit.
    Missing or extra tensors raise ValueError."""
    import gguf

    from int4_qat.export import convert as cv
    from int4_qat.export.source import open_hf_source
    from int4_qat.scheme import QuantScheme

    source = open_hf_source(reference) if isinstance(reference, (str, os.PathLike)) else reference
    reader = gguf.GGUFReader(path)
    if scheme is None:
        f = reader.get_field(SCHEME_KEY)
        stored = json.loads(f.contents()) if f is not None else None
        scheme = QuantScheme.from_dict(stored) if stored else None
    plan = plan_tensors(source.tensors(), source.config, scheme)
    have = {t.name: t for t in reader.tensors}
    want = {t.name for t in plan} | {
        _scale_name(t.name) for t in plan if t.quantized and scheme.format.value == "nvfp4"
    }
    if set(have) != want:
        raise ValueError(
            f"{path}: tensors differ from the reference: missing {sorted(want - set(have))[:5]}, "
            f"extra {sorted(set(have) - want)[:5]}"
        )
    quantized = {s for t in plan if t.quantized for s in t.sources}
    report = GGUFReport()
    for t in plan:
        rt = have[t.name]
        if tuple(int(d) for d in reversed(rt.shape.tolist())) != t.shape:
            raise ValueError(
                f"{path}: {t.name} has shape {list(reversed(rt.shape.tolist()))}, expected {list(t.shape)}"
            )
        data = rt.data.reshape(len(t.sources), *rt.data.shape[-2:]) if len(t.sources) > 1 else rt.data
        check = TensorCheck(t.name, rt.tensor_type.name)
        for e, src in enumerate(t.sources):
            w = source.read_any(src)
            part = data[e] if len(t.sources) > 1 else data
            if t.quantized:
                module = src.removesuffix(".weight")
                sibs = _siblings(source, scheme, module, quantized)
                q = cv.quantize(scheme, w, module, sibs)
                inv = None
                if q.global_scale is not None:
                    inv = np.asarray(have[_scale_name(t.name)].data, dtype=np.float32).reshape(-1)
                    inv = inv[e : e + 1]
                ref = _reference(scheme, w, module, sibs, reference_dtype)
                check.merge(check_decoded(src, q, np.asarray(part), ref, inv))
            else:
                dec = torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(part), rt.tensor_type)))
                bad = dec.double() != w.double()
                piece = TensorCheck(src, rt.tensor_type.name, elements=w.numel(), mismatched=int(bad.sum()))
                if piece.mismatched:
                    piece.max_abs = float((dec.double() - w.double()).abs().max())
                check.merge(piece)
        (report.quantized if t.quantized else report.floats).append(check)
    return report
