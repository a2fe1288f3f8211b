"""GGUF export (llama.cpp): our codes in GGML blocks, checked with the gguf package's dequantizers,
loaded and run by llama.cpp (llama-cpp-python), compared with the training model."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from int4_qat.export.gguf_blocks import check_decoded, global_scale_inverse, pack_blocks
from int4_qat.export.gguf_export import export_gguf, verify_gguf
from int4_qat.scheme import QuantScheme
from int4_qat.testing import fake_quant_hf_state_dict, make_tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16_U = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {mt: str(make_tiny_hf_checkpoint(mt, root / mt, shards=2)) for mt in ("qwen3_moe", "qwen3")}


# ------------------------------------------------------------------ blocks vs gguf.quants
@pytest.mark.parametrize("scheme", [
    QuantScheme(group_size=32, served="exact"),
    QuantScheme(group_size=128, served="exact"),            # a g128 scale fills 4 Q4_0 blocks
    QuantScheme(group_size=64, served="exact", scale_rule="amax/7.5"),  # code -8 fits Q4_0
    QuantScheme(format="mxfp4"),
])
def test_blocks_decode_to_the_fake_quant_exactly(scheme):
    torch.manual_seed(0)
    w = torch.randn(3, 16, 256) * 0.02                      # [E, N, K] fp32, as CPU training
    q = scheme.quantize(w)
    blocks = pack_blocks(q)
    assert blocks.dtype == np.uint8 and blocks.shape == gguf.quant_shape_to_byte_shape(
        w.shape, gguf.GGMLQuantizationType["Q4_0" if scheme.format.value == "int4" else "MXFP4"])
    check = check_decoded("w", q, blocks, scheme.fake_quantize(w))
    assert check.exact and check.elements == w.numel(), check
    blocks[1, 3, 5] ^= 0x10                                  # one nibble: the check must see it
    assert check_decoded("w", q, blocks, scheme.fake_quantize(w)).mismatched == 1


def test_inexact_rules_are_reported_with_their_size():
    torch.manual_seed(1)
    w = torch.randn(8, 256) * 0.02
    marlin = QuantScheme(group_size=32)                     # served=bf16: training computes bf16(q*s)
    q = marlin.quantize(w)
    c = check_decoded("w", q, pack_blocks(q), marlin.fake_quantize(w))
    assert 0 < c.mismatched < w.numel() and 0 < c.max_rel <= BF16_U
    nv = QuantScheme(format="nvfp4")                        # 1/g applied to the output in llama.cpp
    q = nv.quantize(w)
    c = check_decoded("w", q, pack_blocks(q), nv.fake_quantize(w), global_scale_inverse(q))
    assert c.mismatched > 0 and c.max_rel <= BF16_U and "1/g" in c.notes[0]


def test_q4_0_fp16_scale_claims_hold_for_every_bf16_value():
    """bf16 -> fp16 is exact for every bf16 in [2^-17, 65504]; the amax/7 floor lies above 2^-17;
    below it the exporter counts the inexact blocks; above 65504 it refuses."""
    bits = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # +0 .. max finite
    s = bits.float()
    exact = bits.to(torch.float16).float() == s
    inside = (s >= 2.0 ** -17) & (s <= 65504)
    assert bool(exact[inside].all()) and not bool(exact[s < 2.0 ** -24 * 0.5][1:].any())
    assert torch.tensor(1e-5).to(torch.bfloat16).float() >= 2.0 ** -17
    w = torch.zeros(2, 64)
    tiny_s = (1 + 127 / 128) * 2.0 ** -18                    # a bf16 below 2^-17 with an odd last bit
    w[0, :32] = torch.linspace(-1, 1, 32) * (7.5 * tiny_s)   # amax/7.5 rule -> exactly that scale
    w[1, :32] = 1.0
    s75 = QuantScheme(group_size=32, scale_rule="amax/7.5", served="exact")
    q = s75.quantize(w)
    c = check_decoded("w", q, pack_blocks(q), s75.fake_quantize(w))
    assert c.inexact_scale_blocks == 1 and c.mismatched > 0 and "2^-17" in c.notes[-1]
    big = QuantScheme(group_size=32, served="exact")
    with pytest.raises(ValueError, match="exceeds 65504"):
        pack_blocks(big.quantize(torch.full((1, 32), 1e6)), "model.layers.0.mlp.experts.0.up_proj.weight")


# ------------------------------------------------------------------ the file
def _types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_export_names_types_metadata_and_verify(tiny, tmp_path):
    out = str(tmp_path / "m.gguf")
    r = export_gguf(tiny["qwen3_moe"], out, fmt="int4", group_size=32, progress=False)
    assert r.arch == "qwen3moe" and r.vocab == "bytes" and r.quantized == 6 and r.report.exact
    assert r.scheme["served"] == "exact"   # no recipe: the scheme serves what llama.cpp computes
    types = _types(out)
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_0" and types["blk.0.ffn_down_exps.weight"] == "Q4_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_k_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == "BF16" and types["output.weight"] == "BF16"
    assert len(types) == 3 + 2 * 12                         # embd, norm, output + 12 per layer
    reader = gguf.GGUFReader(out)
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    assert field("general.architecture") == "qwen3moe" and field("qwen3moe.expert_count") == 8
    assert field("qwen3moe.expert_used_count") == 2 and field("qwen3moe.expert_feed_forward_length") == 128
    assert json.loads(field("int4_qat.scheme"))["group_size"] == 32
    exp = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    assert list(exp.shape) == [128, 128, 8]                 # ggml ne = {K, N, E}
    v = verify_gguf(out, tiny["qwen3_moe"])
    assert v.exact and len(v.quantized) == 6 and len(v.floats) == 21
    # a flipped byte in one expert is found, and named
    with open(out, "r+b") as f:
        f.seek(int(exp.data_offset) + 3 * 72 * 128 + 7)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    v = verify_gguf(out, tiny["qwen3_moe"])
    assert not v.exact and [c.name for c in v.quantized if not c.exact] == ["blk.0.ffn_up_exps.weight"]


def test_unquantized_control_and_fp4_formats(tiny, tmp_path):
    ctrl = export_gguf(tiny["qwen3_moe"], str(tmp_path / "c.gguf"), quantize=False, progress=False)
    assert ctrl.quantized == 0 and set(_types(ctrl.output).values()) == {"BF16", "F32"}
    assert verify_gguf(ctrl.output, tiny["qwen3_moe"]).exact
    mx = export_gguf(tiny["qwen3_moe"], str(tmp_path / "mx.gguf"), fmt="mxfp4", progress=False)
    assert mx.report.exact and _types(mx.output)["blk.0.ffn_up_exps.weight"] == "MXFP4"
    nv = export_gguf(tiny["qwen3_moe"], str(tmp_path / "nv.gguf"), fmt="nvfp4", progress=False)
    t = _types(nv.output)
    assert t["blk.0.ffn_up_exps.weight"] == "NVFP4" and t["blk.0.ffn_up_exps.scale"] == "F32"
    assert not nv.report.exact and max(c.max_rel for c in nv.report.quantized) <= BF16_U
    assert verify_gguf(nv.output, tiny["qwen3_moe"]).mismatched == nv.report.mismatched


@pytest.mark.parametrize("mutate, kwargs, match", [
    (lambda c: c.update(norm_topk_prob=False), {}, "norm_topk_prob: false .* always renormalises"),
    (lambda c: c.update(mlp_only_layers=[1]), {}, r"dense layers \[1\]"),
    (None, {"group_size": 16}, r"INT4 g16 .* cannot be stored as GGML Q4_0"),
])
def test_refusals(tiny, tmp_path, mutate, kwargs, match):
    import shutil

    from int4_qat.testing import random_hf_checkpoint

    d = tmp_path / "hf"
    shutil.copytree(tiny["qwen3_moe"], d)
    if mutate:      # a checkpoint whose tensors match the mutated config (else the structural check refuses first)
        cfg = json.loads((d / "config.json").read_text())
        mutate(cfg)
        shutil.rmtree(d)
        random_hf_checkpoint(cfg, d)
    with pytest.raises(ValueError, match=match):
        export_gguf(str(d), str(tmp_path / "x.gguf"), fmt="int4", progress=False, **{"group_size": 32, **kwargs})
    assert not any(p.name.startswith(".x.gguf") or p.name == "x.gguf" for p in tmp_path.iterdir())


def test_bad_weights_and_outputs_fail_cleanly(tiny, tmp_path):
    import shutil

    from int4_qat.testing import rewrite_checkpoint

    d = tmp_path / "hf"
    shutil.copytree(tiny["qwen3_moe"], d)
    nan_at = "model.layers.1.self_attn.o_proj.weight"
    rewrite_checkpoint(d, lambda n, t: t.index_fill(0, torch.tensor([3]), float("nan")) if n == nan_at else t)
    with pytest.raises(ValueError, match=f"{nan_at}: non-finite value"):        # mid-stream
        export_gguf(str(d), str(tmp_path / "nan.gguf"), fmt="int4", group_size=32, progress=False)
    shutil.rmtree(d)
    shutil.copytree(tiny["qwen3_moe"], d)
    rewrite_checkpoint(d, lambda n, t: t.index_fill(0, torch.tensor([0]), float("nan"))
                       if n.endswith("layers.1.mlp.experts.5.down_proj.weight") else t)
    with pytest.raises(ValueError, match=r"experts\.5\.down_proj: weight contains NaN"):  # a quantized one
        export_gguf(str(d), str(tmp_path / "nan.gguf"), fmt="int4", group_size=32, progress=False)
    with pytest.raises(ValueError, match="ending in .gguf"):
        export_gguf(tiny["qwen3_moe"], str(tmp_path / "outdir"), fmt="int4", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]                   # nothing half-written


def test_refused_architectures_say_why(tmp_path):
    from int4_qat.export.gguf_arch import REFUSED, parse_config

    for mt in ("gpt_oss", "deepseek_v3", "kimi_k2"):
        with pytest.raises(ValueError, match=f"model_type '{mt}' is not exported to GGUF: llama.cpp"):
            parse_config({"model_type": mt})
        assert "does not map" in REFUSED[mt] and "compressed-tensors" in REFUSED[mt]
    assert "truncate" in REFUSED["gpt_oss"]


def test_cli(tiny, tmp_path):
    cli = [sys.executable, os.path.join(REPO, "tools/export.py"), "--container", "gguf", "--input", tiny["qwen3_moe"]]
    out = str(tmp_path / "cli.gguf")
    p = subprocess.run(cli + ["--output", out, "--format", "int4", "--group-size", "32", "--no-progress"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "equal the training fake-quant weights exactly" in p.stdout and os.path.isfile(out)
    p = subprocess.run(cli + ["--output", out, "--format", "int4"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("export: error: output") and "--overwrite" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run(cli + ["--output", str(tmp_path / "y.gguf"), "--format", "int4", "--serving-tp", "2"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--serving-tp applies to the compressed-tensors container" in p.stderr


# ------------------------------------------------------------------ llama.cpp itself
def test_byte_vocab_tokenizes_like_the_training_tokenizer(tiny, tmp_path):
    from llama_cpp import Llama

    from int4_qat.data import ByteTokenizer, system_corpus

    out = export_gguf(tiny["qwen3"], str(tmp_path / "v.gguf"), quantize=False, progress=False).output
    llm = Llama(model_path=out, vocab_only=True, verbose=False)
    tok = ByteTokenizer(320)
    for text in system_corpus(max_docs=3) + ["héllo  wörld\n\t€ 𝄞"]:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert ids == [tok.BOS] + tok.encode(text)
        assert llm.detokenize(ids[1:]).decode() == text
    assert (llm.token_bos(), llm.token_eos()) == (256, 257)


def test_hf_bpe_tokenizer_tokenizes_like_transformers(tmp_path):
    """An HF byte-level BPE tokenizer (Qwen2/3 pre-tokenizer, trained here on real text) written
    to GGUF: llama.cpp splits held-out text into the same ids as transformers."""
    from llama_cpp import Llama
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from int4_qat.data import system_corpus

    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2/Qwen3 tokenizer.json pre-tokenizer
    docs = system_corpus(max_docs=40)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[:30], trainers.BpeTrainer(
        vocab_size=317, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    d = make_tiny_hf_checkpoint("qwen3", tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(d)
    r = export_gguf(str(d), str(tmp_path / "m.gguf"), quantize=False, progress=False)
    assert r.vocab == "hf-bpe"
    llm = Llama(model_path=r.output, vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(d)
    texts = docs[30:40] + ["Hello  world!\n\n  x = 3.14159; it's 'quoted' — naïve café 𝄞\t\tend"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text, add_special_tokens=False)
    assert sum(len(hf.encode(t)) for t in texts) < 0.8 * sum(len(t.encode()) for t in texts)  # merges used
    assert llm.token_eos() == hf.eos_token_id


class _Swapped:
    """An HF source whose tensors ``a`` and ``b`` are exchanged (a layout mistake, on purpose)."""

    def __init__(self, src, a: str, b: str, subst=None):
        self.src, self.a, self.b, self.config, self.root = src, a, b, src.config, src.root

    def tensors(self):
        return self.src.tensors()

    def read_any(self, n):
        return self.src.read_any(n.replace(self.a, "\0").replace(self.b, self.a).replace("\0", self.b))


@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
def test_llama_cpp_runs_the_float_export_like_transformers(tmp_path, model):
    """An F32 GGUF run by llama.cpp gives transformers' fp32 logits up to summation order, so
    names, layouts, hyperparameters and the tokenizer-free id path are what llama.cpp expects."""
    import transformers

    from int4_qat.export.consistency import compare_logits
    from int4_qat.export.gguf_eval import gguf_logits
    from int4_qat.export.gguf_export import write_gguf
    from int4_qat.export.source import open_hf_source
    from int4_qat.testing import rewrite_checkpoint

    d = make_tiny_hf_checkpoint(model, tmp_path / "hf", dtype=torch.float32)
    rewrite_checkpoint(d, lambda n, t: 6 * t if t.ndim == 2 else t)  # peaky logits: errors show
    out = export_gguf(str(d), str(tmp_path / "f.gguf"), quantize=False, progress=False).output
    assert set(_types(out).values()) == {"F32"}
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits.float()
    r = gguf_logits(out, tokens)
    rep = compare_logits(ref, r.logits, tokens)
    print(f"\n{model} llama.cpp F32 GGUF vs transformers fp32: {rep}")
    assert rep.top1_agree == 1.0 and rep.max_abs_dlogprob < 2e-5, str(rep)
    assert r.logits.shape == (2, 24, 320) and r.tokens_per_s > 0
    # the check can fail: the same file with q_norm and k_norm exchanged is another model
    bad = write_gguf(_Swapped(open_hf_source(str(d)), "q_norm", "k_norm"), str(tmp_path / "bad.gguf"),
                     progress=False).output
    assert compare_logits(ref, gguf_logits(bad, tokens).logits, tokens).mean_abs_dlogprob > 0.01


@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "nvfp4"])
def test_llama_cpp_computes_what_gguf_decodes(tmp_path, fmt, monkeypatch):
    """Each 4-bit type (NVFP4 with its 1/g ``.scale`` tensors and W4A16 ``prec_a4`` keys) loads in
    llama.cpp, which computes the weights ``gguf.quants`` decodes: against an F32 file holding those
    decoded weights only llama.cpp's Q8_0 activations differ (dense model: no routing flips)."""
    from int4_qat.export import convert as cv
    from int4_qat.export import gguf_export as G
    from int4_qat.export.consistency import compare_logits
    from int4_qat.export.gguf_blocks import decode
    from int4_qat.export.gguf_eval import gguf_logits
    from int4_qat.export.source import open_hf_source
    from int4_qat.testing import rewrite_checkpoint

    d = make_tiny_hf_checkpoint("qwen3", tmp_path / "hf", dtype=torch.float32)
    rewrite_checkpoint(d, lambda n, t: 6 * t if t.ndim == 2 else t)
    kw = {"group_size": 32} if fmt == "int4" else {}
    r = export_gguf(str(d), str(tmp_path / "q.gguf"), fmt=fmt, scope="all-linear", progress=False, **kw)
    scheme, src = QuantScheme.from_dict(r.scheme), open_hf_source(str(d))
    decoded = {}
    for t in src.tensors():
        mod = t.name.removesuffix(".weight")
        if t.name.endswith(".weight") and scheme.quantizes_hf(mod) and not cv.never_quantized(mod):
            sibs = [src.read_any(n) for n in cv._fusion_candidates(mod)] if fmt == "nvfp4" else []
            q = cv.quantize(scheme, src.read_any(t.name), mod, sibs)
            inv = G.global_scale_inverse(q) if fmt == "nvfp4" else None
            decoded[t.name] = decode(G.pack_blocks(q), fmt, inv).float()
    assert len(decoded) == 2 * 7
    f32 = G.write_gguf(_Override(src, decoded), str(tmp_path / "dq.gguf"), progress=False).output
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = gguf_logits(f32, tokens).logits
    rep = compare_logits(ref, gguf_logits(r.output, tokens).logits, tokens)
    print(f"\n{fmt} GGUF vs F32 GGUF of its gguf-decoded weights (llama.cpp Q8_0 activations): {rep}")
    assert rep.mean_abs_dlogprob < 0.05 and rep.top1_agree >= 0.95, str(rep)
    if fmt == "nvfp4":  # the check can fail: without its 1/g output scales the model is another one
        monkeypatch.setattr(G, "global_scale_inverse", lambda q: np.ones(q.global_scale.numel(), np.float32))
        bad = export_gguf(str(d), str(tmp_path / "bad.gguf"), fmt=fmt, scope="all-linear", progress=False)
        bad_rep = compare_logits(ref, gguf_logits(bad.output, tokens).logits, tokens)
        assert not bad_rep.mean_abs_dlogprob < 1  # (overflows to NaN logits, in fact)


class _Override:
    """An HF source with some tensors replaced (here: by the training fake-quant weights)."""

    def __init__(self, src, tensors: dict):
        self.src, self.over, self.config, self.root = src, tensors, src.config, src.root

    def tensors(self):
        return self.src.tensors()

    def read_any(self, n):
        return self.over[n] if n in self.over else self.src.read_any(n)


@pytest.mark.slow
def test_qat_int4_g32_moe_served_by_llama_cpp(tmp_path):
    """Acceptance (issue 13): a tiny Qwen3-MoE QAT'ed with INT4 g32 (served: exact) exports to
    GGUF Q4_0 from its training checkpoint; the weights llama.cpp decodes equal the training
    fake-quant weights bit for bit; llama.cpp runs it, and its |Δ logprob| against the training
    model is no larger than that of the unquantized BF16 control against the unquantized model."""
    import _dist_worker as W
    import modelopt.torch.quantization as mtq

    from int4_qat import checkpoint as C
    from int4_qat import data as D
    from int4_qat.export.consistency import compare_logits, megatron_logits
    from int4_qat.export.gguf_eval import GGUFModel
    from int4_qat.export.gguf_export import write_gguf
    from int4_qat.export.megatron_source import open_checkpoint_source
    from int4_qat.recipe import Recipe
    from int4_qat.train import train

    docs = D.system_corpus(max_docs=80)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:60]))
    r = W.tiny_recipe("tiny-qwen3-moe", data=[str(corpus)], fmt="int4", group=32, steps=8, warmup_steps=2,
                      save_interval=8, lr=1e-2, min_lr=1e-3)
    d = r.to_dict()
    d["quant"]["served"] = "exact"
    r = Recipe.from_dict(d)
    res = train(r, cpu=True, out=tmp_path / "run", log=lambda s: None)
    assert res.losses[-1] < res.losses[0] - 0.5
    ckpt = tmp_path / "run" / "ckpt"
    q = export_gguf(str(ckpt), str(tmp_path / "q.gguf"), progress=False)   # scheme from recipe.yaml
    assert q.scheme == r.quant.scheme().to_dict() and q.report.exact, q.report.summary()

    # 1. what llama.cpp decodes == what the training forward computed (ModelOpt's quantizers)
    model, arch, _ = C.load_model_for_export(ckpt)
    fq = fake_quant_hf_state_dict(model, arch)
    reader = {t.name: t for t in gguf.GGUFReader(q.output).tensors}
    for layer in range(2):
        for proj, gname in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            t = reader[f"blk.{layer}.{gname}.weight"]
            assert t.tensor_type.name == "Q4_0"
            dec = torch.from_numpy(np.array(gguf.quants.dequantize(np.array(t.data), t.tensor_type)))
            want = torch.stack([fq[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] for e in range(8)])
            assert want.dtype == torch.float32 and torch.equal(dec, want), (layer, proj)

    # 2. llama.cpp runs it: logits on held-out text vs the training model
    tokens = D.pack_documents(docs[60:], D.ByteTokenizer(320), 64)[:8, :64]
    src = open_checkpoint_source(ckpt)[0]      # the checkpoint's weights, streamed (no model)
    ctrl = {ft: write_gguf(src, str(tmp_path / f"{ft}.gguf"), float_type=ft, progress=False).output
            for ft in ("f32", "bf16")}
    # our weights in an F32 file: llama.cpp computes the training model without quantized arithmetic
    fq_f32 = write_gguf(_Override(src, fq), str(tmp_path / "fq.gguf"), progress=False).output

    def run(path):
        with GGUFModel(path, n_ctx=64) as m:
            return m.evaluate(tokens).logits

    served, served_f32 = run(q.output), run(fq_f32)
    train_fq = megatron_logits(model, tokens)
    mtq.disable_quantizer(model, "*")
    plain = megatron_logits(model, tokens)
    rep = compare_logits(train_fq, served, tokens)
    c32, cbf = (compare_logits(plain, run(ctrl[ft]), tokens) for ft in ("f32", "bf16"))
    ours = compare_logits(train_fq, served_f32, tokens)
    engine = compare_logits(served_f32, served, tokens)
    print(f"\nQ4_0 GGUF vs training fake quant : {rep}\nF32 control vs unquantized      : {c32}\n"
          f"BF16 control vs unquantized     : {cbf}\nF32 GGUF of the fake-quant weights vs training: {ours}\n"
          f"Q4_0 vs that F32 GGUF (llama.cpp's Q8_0 activations): {engine}")
    # the engine computes the model we wrote: F32 files match their Megatron model to fp32 noise
    assert c32.max_abs_dlogprob < 2e-5 and ours.max_abs_dlogprob < 2e-5
    # the whole Q4_0 gap is llama.cpp's own arithmetic (Q8_0 activations in Q4_0 dot products)...
    assert abs(engine.mean_abs_dlogprob - rep.mean_abs_dlogprob) < 1e-5
    # ...and no larger than the unquantized BF16 control's (margin 1 on the mean; the max, one
    # position, has Q8_0's heavier tail and is reported, not bounded: docs/DESIGN.md, GGUF)
    assert rep.mean_abs_dlogprob <= cbf.mean_abs_dlogprob and rep.top1_agree >= cbf.top1_agree - 0.01
    # the metric can fail: the unquantized model is measurably not what was exported
    assert compare_logits(plain, served, tokens).mean_abs_dlogprob > 2 * rep.mean_abs_dlogprob
