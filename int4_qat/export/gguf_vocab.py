"""Tokenizer metadata for a GGUF file (``tokenizer.ggml.*``), so llama.cpp can load and run it.

Two cases, decided by the tokenizer directory (the HF dir itself, or a training recipe's
``model.tokenizer``):

* **No tokenizer files** — the model was trained on this project's byte-level tokenizer
  (:class:`int4_qat.data.ByteTokenizer`: ids 0..255 are UTF-8 bytes, 256 BOS, 257 EOS, 258 PAD).
  It is written as a SentencePiece-style vocabulary (``tokenizer.ggml.model = "llama"``,
  src/llama-vocab.cpp ``LLAMA_VOCAB_TYPE_SPM``) of byte tokens ``<0xXX>`` (type BYTE) at ids
  0..255: llama.cpp's SPM tokenizer finds no multi-byte piece and falls back to one byte token per
  UTF-8 byte, i.e. exactly ByteTokenizer's ids. One twist: SPM escapes every space to ``▁``
  (U+2581) before tokenizing (``escape_whitespaces`` is always on for SPM), so id 32 (the space
  byte) is the piece ``▁`` (type NORMAL) rather than ``<0x20>``; llama.cpp decodes it back to a
  space. (A literal ``▁`` in the text therefore also becomes id 32, where ByteTokenizer gives its
  three UTF-8 bytes.) ``add_space_prefix`` is off, BOS is added, EOS is not — as the training
  data packs ``[BOS] bytes [EOS]``. Ids 259..vocab_size-1 are UNUSED.
* **An HF tokenizer** (``tokenizer.json``): a byte-level BPE vocabulary (``"gpt2"``) built as
  llama.cpp's converter builds it (conversion/base.py ``get_vocab_base``: added tokens typed
  CONTROL / USER_DEFINED, missing ids ``[PAD{i}]`` UNUSED) with merges and special-token ids
  from ``gguf.SpecialVocab``. The pre-tokenizer name is the one llama.cpp's converter detects for
  the published tokenizers of the architecture (:data:`BPE_PRE`, Qwen3 = ``"qwen2"``).
"""
from __future__ import annotations

import os

__all__ = ["BPE_PRE", "add_vocab", "byte_vocab", "has_hf_tokenizer"]

#: HF model_type -> llama.cpp pre-tokenizer of its published BPE tokenizers (what
#: convert_hf_to_gguf.py's get_vocab_base_pre hash detects for Qwen/Qwen3-*: "qwen2").
BPE_PRE = {"qwen3": "qwen2", "qwen3_moe": "qwen2"}


def has_hf_tokenizer(tok_dir: str | None) -> bool:
    return bool(tok_dir) and os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))


def byte_vocab(vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) of the byte-level vocabulary described in the module docstring."""
    import gguf

    from int4_qat.data import ByteTokenizer

    ByteTokenizer(vocab_size)  # same vocab_size rule (>= 260) as training
    tokens = [f"<0x{b:02X}>" for b in range(256)] + ["<s>", "</s>", "<pad>"]
    types = [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.CONTROL] * 3
    tokens[0x20], types[0x20] = "\u2581", gguf.TokenType.NORMAL
    tokens += [f"<unused{i}>" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    return tokens, [int(t) for t in types]


def _add_byte_vocab(writer, vocab_size: int) -> None:
    from int4_qat.data import ByteTokenizer

    tokens, types = byte_vocab(vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(ByteTokenizer.BOS)
    writer.add_eos_token_id(ByteTokenizer.EOS)
    writer.add_pad_token_id(ByteTokenizer.PAD)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def _add_hf_bpe(writer, tok_dir: str, vocab_size: int, model_type: str) -> None:
    import gguf
    from transformers import AutoTokenizer

    if model_type not in BPE_PRE:
        raise ValueError(f"{tok_dir}: no known llama.cpp pre-tokenizer for {model_type!r} BPE tokenizers")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{tok_dir}: tokenizer id {max(vocab.values())} >= config vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(BPE_PRE[model_type])
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"{tok_dir}/tokenizer.json: no BPE merges found (only byte-level BPE "
                         "tokenizers are written to GGUF)")
    special.add_to_gguf(writer)


def add_vocab(writer, config: dict, tok_dir: str | None) -> str:
    """Write the tokenizer keys; returns ``"bytes"`` or ``"hf-bpe"`` (what was written)."""
    if has_hf_tokenizer(tok_dir):
        _add_hf_bpe(writer, tok_dir, int(config["vocab_size"]), config["model_type"])
        return "hf-bpe"
    _add_byte_vocab(writer, int(config["vocab_size"]))
    return "bytes"
