"""Verify an export with the *consumers'* code, not ours.

Our packing could be self-consistent and still wrong for a server. So every check here reads the
export the way a consumer does and compares with the reference BF16 checkpoint:

``packed``      each packed module is decompressed by compressed-tensors' own compressor
                (``BaseCompressor.get_value_from_registry(format).decompress`` — the function
                transformers' ``CompressedTensorsDequantize`` calls, compressors/*/base.py) using
                the ``QuantizationScheme`` parsed from the export's own ``config.json``; the
                result must equal ``scheme.fake_quantize(reference weight)`` **exactly**
                (``torch.equal``): what training saw is what the server computes. NVFP4
                gate/up (q/k/v) partners share one global scale (the fused Megatron weight's),
                so their fake quant uses the partners' joint amax.
``gpt-oss``     native MXFP4 ``*_blocks`` / ``*_scales`` are dequantized by transformers'
                ``integrations.mxfp4.convert_moe_packed_tensors``; exact as above.
``copied``      every tensor that is not packed is byte-identical to the reference.
``names``       no reference tensor missing, no extra export tensor, index ↔ shards consistent.
``ignore``      compressed-tensors' ``match_name`` applied to the generated ignore list: every
                unquantized Linear is ignored, no quantized one is; router / embeddings / norms /
                lm_head are never packed.
``structure``   the reference's tensor set is what its ``config.json`` implies (every tensor
                present, shaped and float, nothing unexpected: ``int4_qat.export.source.
                check_structure``), and the export's ``config.json`` describes the same model.
``metadata``    the export's ``quantization_config`` is the one ``tools/export.py`` writes for the
                scheme recorded in ``int4_qat_export.json``; every export tensor has the dtype and
                shape that scheme implies; ``weight_shape`` holds the reference's shape. An edited
                export is a FAIL naming the field or tensor, never a crash inside a reader.
``logits``      (small models) transformers ``AutoModelForCausalLM`` loads the export
                (compressed-tensors, or ``Mxfp4Config(dequantize=True)`` on CPU) and its logits are
                compared with the reference model whose quantized weights were replaced by their
                fake-quantized values.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from int4_qat.export import convert as cv
from int4_qat.export.pipeline import EXPORT_META
from int4_qat.export.source import open_hf_source
from int4_qat.export.writer import INDEX_NAME

__all__ = ["Check", "VerifyReport", "verify_export", "load_export_model", "fake_quantized_reference"]


@dataclass
class Check:
    name: str
    count: int = 0
    failures: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, msg: str) -> None:
        self.failures.append(msg)


@dataclass
class VerifyReport:
    checks: list[Check]
    max_logit_diff: float | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def table(self) -> str:
        rows = [("check", "items", "result", "detail")]
        for c in self.checks:
            res = "OK" if c.ok else f"FAIL ({len(c.failures)})"
            detail = c.detail if c.ok else "; ".join(c.failures[:3])
            rows.append((c.name, str(c.count), res, detail))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows]
        lines.insert(1, "-" * max(len(x) for x in lines))
        return "\n".join(lines)


class _ExportReader:
    """The export's tensors via its index (read with ``safetensors.safe_open``); a shard that is
    missing or unreadable is a ``names`` failure, and its tensors count as absent."""

    def __init__(self, root: str, names: Check):
        from int4_qat.arch.hf_io import read_index

        self.root = root
        index_path = os.path.join(root, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise ValueError(f"{root}: no {INDEX_NAME}: not a complete export (interrupted, or not an export)")
        self.weight_map: dict[str, str] = read_index(index_path)
        self.handles = {}
        self.present: set[str] = set()
        for fn in sorted(set(self.weight_map.values())):
            try:
                h = safe_open(os.path.join(root, fn), "pt")
            except Exception as e:      # noqa: BLE001 - missing / truncated / corrupt shard
                names.fail(f"{fn}: cannot be read ({type(e).__name__}: {e})")
                continue
            self.handles[fn] = h
            for k in h.keys():
                self.present.add(k)
                if self.weight_map.get(k) != fn:
                    names.fail(f"{fn}: {k} not in index")
        for k in sorted(set(self.weight_map) - self.present):
            if self.weight_map[k] in self.handles:
                names.fail(f"index lists {k} but {self.weight_map[k]} lacks it")

    def __contains__(self, name: str) -> bool:
        return name in self.present and self.weight_map.get(name) in self.handles

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        from int4_qat.export.source import _DTYPES

        sl = self.handles[self.weight_map[name]].get_slice(name)
        return _DTYPES.get(sl.get_dtype()), tuple(sl.get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.weight_map[name]].get_tensor(name)


def _load_scheme(export_dir: str):
    from int4_qat.scheme import QuantScheme

    path = os.path.join(export_dir, EXPORT_META)
    if not os.path.isfile(path):
        raise ValueError(f"{path} missing: the export was not written by tools/export.py, so the scheme "
                         "that must reproduce it is unknown")
    try:
        with open(path) as f:
            return QuantScheme.from_dict(json.load(f)["scheme"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable scheme ({type(e).__name__}: {e}); fix: re-export with "
                         f"tools/export.py") from None


def _diff(want, got, path: str, out: list[str], limit: int = 5) -> None:
    """Paths where two JSON-like values differ (at most ``limit``)."""
    if len(out) >= limit:
        return
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got), key=str):
            if k not in got:
                out.append(f"{path}.{k} is missing (expected {want[k]!r})")
            elif k not in want:
                out.append(f"{path}.{k} is unexpected ({got[k]!r})")
            else:
                _diff(want[k], got[k], f"{path}.{k}", out, limit)
    elif want != got:
        out.append(f"{path}: export has {got!r}, expected {want!r}")


def _structure_check(ref, ecfg: dict) -> Check:
    """The reference matches its own config.json; the export's config describes the same model."""
    from int4_qat.arch.base import COMMON_IGNORED_FIELDS
    from int4_qat.export.source import check_structure

    c = Check("structure (config.json)", count=len(ref.tensors()))
    try:
        check_structure(ref.root, ref.tensors())
    except ValueError as e:
        for line in str(e).splitlines()[1:] or [str(e)]:
            if not line.startswith("fix:"):
                c.fail(line.strip())
    skip = (COMMON_IGNORED_FIELDS - {"model_type"}) | {"quantization_config"}
    model_keys = lambda cfg: {k: v for k, v in cfg.items() if k not in skip}   # noqa: E731
    diffs: list[str] = []
    _diff(model_keys(ref.config), model_keys(ecfg), "config.json", diffs)
    for d in diffs:
        c.fail(f"export {d} (the reference's config.json says otherwise)")
    c.detail = "reference tensors == what config.json implies; export config == reference config"
    return c


def _metadata_check(ref, scheme, plans, ecfg: dict, reader: "_ExportReader") -> Check:
    """quantization_config and every export tensor's dtype / shape, from the recorded scheme."""
    from int4_qat.export.pipeline import _final_config

    c = Check("metadata (scheme, dtypes, shapes)")
    try:
        want = _final_config(ref.config, scheme, plans)["quantization_config"]
    except ValueError as e:
        c.fail(str(e))
        return c
    diffs: list[str] = []
    strip = lambda q: {k: v for k, v in q.items() if k != "version"}   # noqa: E731 - writer's version
    _diff(strip(want), strip(ecfg.get("quantization_config") or {}), "quantization_config", diffs)
    for d in diffs:
        c.fail(f"config.json {d} (from the scheme in {EXPORT_META}: {scheme.describe()})")
    shapes = {i.name: i.shape for i in ref.tensors()}
    for plan in plans:
        for spec in plan.outputs:
            if spec.name not in reader:
                continue
            c.count += 1
            dtype, shape = reader.meta(spec.name)
            if dtype != spec.dtype or shape != spec.shape:
                c.fail(f"{spec.name}: {str(dtype).replace('torch.', '')} {list(shape)} in the export, the "
                       f"scheme implies {str(spec.dtype).replace('torch.', '')} {list(spec.shape)}")
            elif spec.name.endswith(".weight_shape"):
                got = reader.get(spec.name).tolist()
                if got != list(shapes[plan.source]):
                    c.fail(f"{spec.name} holds {got}, the reference weight is {list(shapes[plan.source])}")
    c.detail = "quantization_config from the scheme; every tensor's dtype and shape"
    return c


def _ct_config(qc: dict):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate(qc)


def _ct_scheme_for(ct_cfg, module: str):
    """The config group compressed-tensors would apply to Linear ``module`` (None if ignored)."""
    from compressed_tensors.utils.match import match_name

    if any(match_name(module, ign) for ign in ct_cfg.ignore or []):
        return None
    for group in ct_cfg.config_groups.values():
        if "Linear" in group.targets or any(match_name(module, t) for t in group.targets):
            return group
    return None


def _decompress_ct(ct_cfg, ct_scheme, module: str, reader: _ExportReader) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor

    fmt = ct_scheme.format or ct_cfg.format
    compressor = BaseCompressor.get_value_from_registry(fmt)
    sd = {}
    for local in ("weight_packed", "weight_scale", "weight_shape", "weight_global_scale", "weight_zero_point"):
        if f"{module}.{local}" in reader:
            sd[local] = reader.get(f"{module}.{local}")
    return compressor.decompress(sd, ct_scheme)["weight"]


def verify_export(reference: str, export: str, *, logits: bool | None = None, max_logit_params: int = 50_000_000,
                  seq_len: int = 24, logit_tol: float = 1e-4) -> VerifyReport:
    """Run all checks; ``logits=None`` runs the model comparison when the model is small."""
    from int4_qat.arch.hf_io import read_config

    ref = open_hf_source(reference, structure=False)     # the structure is a reported check below
    scheme = _load_scheme(export)
    ecfg, _ = read_config(export)
    qc = ecfg.get("quantization_config")
    names, packed, gptoss, copied, ignore = (Check("names/index"), Check("packed (compressed-tensors)"),
                                             Check("packed (transformers gpt-oss)"), Check("copied bytes"),
                                             Check("ignore list"))
    if qc is None:
        raise ValueError(f"{export}/config.json has no quantization_config")
    native = qc.get("quant_method") == "mxfp4"
    reader = _ExportReader(export, names)
    expected: set[str] = set()
    from compressed_tensors.utils.match import match_name
    from transformers.quantizers.quantizers_utils import should_convert_module

    infos = ref.tensors()
    plans = cv.attach_siblings([cv.plan_tensor(i.name, i.dtype, i.shape, scheme, ref.model_type) for i in infos],
                               scheme)
    structure, meta = _structure_check(ref, ecfg), _metadata_check(ref, scheme, plans, ecfg, reader)
    try:
        ct_cfg = None if native else _ct_config(qc)
    except ValueError as e:   # compressed-tensors itself refuses the config: so would a server
        meta.fail(f"config.json quantization_config is not a valid compressed-tensors config: {e}")
        return VerifyReport([structure, meta, names])
    bad_meta = {f.split(":", 1)[0] for f in meta.failures}    # tensor names the metadata check failed
    for info, plan in zip(infos, plans, strict=True):
        expected.update(s.name for s in plan.outputs)
        missing = [s.name for s in plan.outputs if s.name not in reader]
        if missing:
            names.fail(f"{info.name}: export lacks {missing}")
            continue
        names.count += 1
        if any(s.name in bad_meta for s in plan.outputs):
            continue                     # reported by the metadata check; readers would crash on it
        with safe_open(os.path.join(ref.root, info.shard), "pt") as h:
            w = h.get_tensor(info.name)
        if plan.kind == "copy":
            copied.count += 1
            got = reader.get(info.name)
            if got.dtype != w.dtype or got.shape != w.shape or not torch.equal(
                    got.contiguous().view(-1).view(torch.uint8), w.contiguous().view(-1).view(torch.uint8)):
                copied.fail(f"{info.name} differs")
            mod = info.name[: -len(".weight")] if info.name.endswith(".weight") else None
            if mod and w.dim() == 2 and w.dtype.is_floating_point:
                ignore.count += 1
                if ct_cfg is not None and not any(match_name(mod, ig) for ig in ct_cfg.ignore or []):
                    ignore.fail(f"{mod} is not packed but not ignored")
                if native and should_convert_module(mod, qc.get("modules_to_not_convert")):
                    ignore.fail(f"{mod} is not packed but not in modules_to_not_convert")
            continue
        if cv.never_quantized(plan.module):
            ignore.fail(f"{plan.module} (router/embedding/norm/lm_head) is packed")
        if plan.kind == "gpt_oss":
            ignore.count += 1
            if not should_convert_module(plan.module, qc.get("modules_to_not_convert")):
                ignore.fail(f"{plan.module} is packed but listed in modules_to_not_convert")
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            gptoss.count += 1
            try:
                served = convert_moe_packed_tensors(reader.get(f"{info.name}_blocks"),
                                                    reader.get(f"{info.name}_scales"), dtype=torch.bfloat16)
            except Exception as e:  # noqa: BLE001 - as for compressed-tensors below
                gptoss.fail(f"{info.name}: transformers cannot dequantize it ({type(e).__name__}: {e})")
                continue
            want = scheme.fake_quantize(w.transpose(-1, -2).contiguous(), info.name).transpose(-1, -2)
            if not torch.equal(served, want.to(served.dtype)):
                gptoss.fail(f"{info.name}: max |Δ| {(served.float() - want.float()).abs().max().item():.3g}")
            continue
        packed.count += 1
        ignore.count += 1
        ct_scheme = _ct_scheme_for(ct_cfg, plan.module)
        if ct_scheme is None:
            ignore.fail(f"{plan.module} is packed but ignored by quantization_config")
            continue
        try:
            served = _decompress_ct(ct_cfg, ct_scheme, plan.module, reader)
        except Exception as e:  # noqa: BLE001 - a consumer that cannot decode it is a failed check
            packed.fail(f"{plan.module}: compressed-tensors cannot decompress it ({type(e).__name__}: {e})")
            continue
        want = cv.fake_quantize(scheme, w, plan.module, [ref.read_any(n) for n in plan.siblings])
        if served.shape != want.shape or not torch.equal(served, want.to(served.dtype)):
            diff = (served.float() - want.float()).abs().max().item() if served.shape == want.shape else "shape"
            packed.fail(f"{plan.module}: served != fake_quantize (max |Δ| {diff})")
    for extra in sorted(set(reader.weight_map) - expected)[:5]:
        names.fail(f"unexpected export tensor {extra}")
    names.detail = f"{len(reader.weight_map)} export tensors"
    packed.detail = "decompress == fake_quantize, bit-exact"
    gptoss.detail = packed.detail
    copied.detail = "byte-identical"
    ignore.detail = f"{len(qc.get('ignore', qc.get('modules_to_not_convert', [])))} entries, router never packed"
    checks = [structure, meta, names, packed if not native else gptoss, copied, ignore]
    report = VerifyReport(checks)
    n_params = sum(t.nbytes // t.dtype.itemsize for t in ref.tensors())
    if logits or (logits is None and n_params <= max_logit_params):
        lc = Check("logits (transformers load)")
        try:
            diff, top1, restored = _compare_logits(ref.root, export, scheme, ref.model_type, seq_len)
            report.max_logit_diff = diff
            lc.count = 1
            lc.detail = f"max |Δ logit| {diff:.3g}, top-1 agree {top1:.3f}" + (
                f" ({restored} NVFP4 expert stacks re-read via compressed-tensors: transformers drops "
                "weight_global_scale)" if restored else "")
            if not diff <= logit_tol:
                lc.fail(f"max |Δ logit| {diff:.3g} > {logit_tol:g}")
        except Exception as e:  # report, do not crash: this is a consumer-side load
            lc.fail(f"{type(e).__name__}: {e}")
        checks.append(lc)
    return report


def fake_quantized_reference(reference: str, out_dir: str, scheme) -> str:
    """Write a copy of ``reference`` whose quantized weights are ``scheme.fake_quantize``-d (bf16)."""
    from safetensors.torch import save_file
    import shutil

    ref = open_hf_source(reference)
    for fn in os.listdir(ref.root):
        if fn.endswith(".json") and fn != INDEX_NAME or fn.startswith("tokenizer"):
            shutil.copy2(os.path.join(ref.root, fn), os.path.join(out_dir, fn))
    weight_map = {}
    plans = {p.source: p for p in cv.attach_siblings(
        [cv.plan_tensor(i.name, i.dtype, i.shape, scheme, ref.model_type) for i in ref.tensors()], scheme)}
    for i, shard in enumerate(ref.shards):
        tensors = {}
        with safe_open(shard.path, "pt") as h:
            for info in shard.tensors:
                w = h.get_tensor(info.name)
                plan = plans[info.name]
                if plan.kind == "pack":
                    w = cv.fake_quantize(scheme, w, plan.module, [ref.read_any(n) for n in plan.siblings])
                elif plan.kind == "gpt_oss":
                    w = scheme.fake_quantize(w.transpose(-1, -2).contiguous(), info.name).transpose(-1, -2).contiguous()
                tensors[info.name] = w
        fn = f"model-{i + 1:05d}-of-{len(ref.shards):05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in tensors})
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return out_dir


def load_export_model(export: str, dtype: torch.dtype = torch.float32):
    """Load an export with transformers the way a CPU consumer does (dequantizing on load)."""
    from transformers import AutoModelForCausalLM

    with open(os.path.join(export, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    if qc.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        qcfg = Mxfp4Config(dequantize=True)
    else:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        qcfg = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=dtype, quantization_config=qcfg).eval()
    # transformers' CompressedTensorsDequantize (integrations/compressed_tensors.py) returns the
    # fused MoE expert stacks in the decompressed dtype (bf16) instead of the requested dtype, so
    # the experts would silently run in bf16: cast (exact, bf16 -> fp32) so every param is `dtype`.
    return model.to(dtype)


def _restore_nvfp4_experts(model, export: str) -> int:
    """Work around a transformers 5.24 reader defect for NVFP4 MoE experts.

    ``CompressedTensorsDequantize.convert`` (transformers integrations/compressed_tensors.py)
    builds a ``DummyModule`` with ``weight_packed``/``weight_scale``/``weight_shape`` only, so
    NVFP4 experts are decompressed *without* ``weight_global_scale`` (weights off by the global
    scale, ~3e4×); SGLang/vLLM read the global scale. We rebuild each fused expert stack the way
    transformers' qwen2_moe conversion mapping does (``MergeModulelist(dim=0)``, gate/up
    ``Concatenate(dim=1)``) from compressed-tensors' own ``decompress``. Returns stacks rebuilt.
    """
    with open(os.path.join(export, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    if qc.get("format") != "nvfp4-pack-quantized":
        return 0
    ct_cfg = _ct_config(qc)
    reader = _ExportReader(export, Check("names"))
    n = 0
    for name, mod in model.named_modules():
        if not name.endswith("mlp.experts") or not hasattr(mod, "gate_up_proj"):
            continue
        num = mod.gate_up_proj.shape[0]
        stacks = {"gate_up_proj": [], "down_proj": []}
        for e in range(num):
            w = {p: _decompress_ct(ct_cfg, _ct_scheme_for(ct_cfg, f"{name}.{e}.{p}"), f"{name}.{e}.{p}", reader)
                 for p in ("gate_proj", "up_proj", "down_proj")}
            stacks["gate_up_proj"].append(torch.cat([w["gate_proj"], w["up_proj"]], 0))
            stacks["down_proj"].append(w["down_proj"])
        with torch.no_grad():
            for p, ts in stacks.items():
                getattr(mod, p).copy_(torch.stack(ts).to(getattr(mod, p).dtype))
        n += 1
    return n


def _compare_logits(reference: str, export: str, scheme, model_type: str, seq_len: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="fq-ref-") as tmp:
        fake_quantized_reference(reference, tmp, scheme)
        ref_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    exp_model = load_export_model(export)
    restored = _restore_nvfp4_experts(exp_model, export)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref_model.config.vocab_size, (2, seq_len), generator=g)
    with torch.no_grad():
        a = ref_model(ids).logits.float()
        b = exp_model(ids).logits.float()
    return (a - b).abs().max().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item(), restored
