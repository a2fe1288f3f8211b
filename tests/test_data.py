"""int4_qat.data: documents, errors, split, byte tokenizer, packing, DP-aware sampler."""
import json

import pytest
import torch

from int4_qat import data as D


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n\n{"txt": "no text"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: expected an object with a \"text\" field"):
        D.load_documents([p])
    p.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: \"text\" must be a string"):
        D.load_documents([p])
    p.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        D.load_documents([p])


def test_documents_txt_dirs_and_modes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("para one\nline two\n\n\npara two\n")
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "json doc"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / "LICENSE-2.0").write_text("licence text\n")
    docs = D.load_documents([tmp_path])
    assert docs == ["para one\nline two", "para two", "json doc"]
    assert D.load_documents([tmp_path / "a.txt"], txt_mode="file") == ["para one\nline two\n\n\npara two"]
    with pytest.raises(ValueError, match="does not exist"):
        D.load_documents([tmp_path / "missing.txt"])
    assert D.load_documents([tmp_path / "LICENSE-2.0"]) == ["licence text"]   # any suffix by name
    with pytest.raises(ValueError, match=r"ignored\.bin: looks binary"):
        D.load_documents([tmp_path / "ignored.bin"])


def test_system_corpus_is_real_english():
    paths = D.system_corpus_paths()
    assert any(p.name == "os.py" for p in paths)
    docs = D.system_corpus()
    text = " ".join(docs[:2000]).lower()
    assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
    for w in (" the ", " return", " file", " string"):
        assert w in text
    assert D.load_documents([D.SYSTEM_CORPUS]) == docs
    assert D.load_documents(paths) == docs        # what Recipe.train.data_paths() expands to


def test_split_is_deterministic_and_by_document():
    docs = [f"document number {i}" for i in range(100)]
    tr1, ev1 = D.split_documents(docs, 0.1, seed=7)
    tr2, ev2 = D.split_documents(docs, 0.1, seed=7)
    tr3, ev3 = D.split_documents(docs, 0.1, seed=8)
    assert (tr1, ev1) == (tr2, ev2)
    assert len(ev1) == 10 and len(tr1) == 90 and not set(tr1) & set(ev1)
    assert ev1 != ev3
    with pytest.raises(ValueError, match="eval_fraction"):
        D.split_documents(docs, 1.0, seed=1)


def test_byte_tokenizer_round_trip_and_vocab():
    tok = D.ByteTokenizer(300)
    s = "Größe naïve — 日本語 ok\n"
    ids = tok.encode(s)
    assert len(ids) == len(s.encode("utf-8")) and max(ids) < 256
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == s
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        D.ByteTokenizer(256)


def test_pack_windows_overlap_by_one():
    tok = D.ByteTokenizer(260)
    samples = D.pack_documents(["abcdefg", "hij"], tok, seq_length=4)
    stream = [256, *b"abcdefg", 257, 256, *b"hij", 257]   # 14 tokens → (14-1)//4 = 3 windows
    assert samples.shape == (3, 5)
    assert samples.tolist() == [stream[0:5], stream[4:9], stream[8:13]]
    ds = D.PackedDataset(samples)
    x, y = ds.batch([1])
    assert torch.equal(x[0], samples[1, :-1]) and torch.equal(y[0], samples[1, 1:])
    with pytest.raises(ValueError, match="cannot fill one sample"):
        D.pack_documents(["a"], tok, seq_length=8)


def test_sampler_dp_slices_cover_global_batch_and_resume():
    full = D.BatchSampler(50, global_batch=8, micro_batch=2, seed=3)
    ranks = [D.BatchSampler(50, 8, 2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    assert full.num_microbatches == 4 and ranks[0].num_microbatches == 2
    for step in (0, 5, 6, 13):          # step 6 crosses an epoch boundary (48..56)
        g = sum(full.microbatches(step), [])
        parts = [sum(s.microbatches(step), []) for s in ranks]
        assert parts[0] + parts[1] == g and len(g) == 8
    # one epoch is a permutation; the next epoch is a different one
    ep0 = full.global_indices(0, 50)
    assert sorted(ep0) == list(range(50)) and full.global_indices(50, 50) != ep0
    # a fresh sampler (as after resume) yields the same batches
    assert D.BatchSampler(50, 8, 2, seed=3).microbatches(9) == full.microbatches(9)
    with pytest.raises(ValueError, match=r"multiple of micro_batch × dp = 3 × 2 = 6"):
        D.BatchSampler(50, 8, 3, dp_size=2)


def test_build_datasets_on_system_corpus():
    tok = D.ByteTokenizer(512)
    docs = D.system_corpus(max_docs=400)
    tr_docs, ev_docs = D.split_documents(docs, 0.05, seed=1)
    train = D.PackedDataset(D.pack_documents(tr_docs, tok, 64))
    evl = D.PackedDataset(D.pack_documents(ev_docs, tok, 64))
    assert len(train) > 10 * len(evl) > 0
    assert train.samples.max() < 260 and train.seq_length == 64


def test_hf_tokenizer_directory(tmp_path):
    """A real local HF tokenizer dir (byte-level BPE trained here on the system corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = D.system_corpus(max_docs=200)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    hf = D.load_tokenizer(tmp_path, vocab_size=320)
    assert isinstance(hf, D.HFTokenizer) and hf.vocab_size <= 300 and hf.bos_id is None
    text = "Return the string representation of the object."
    ids = hf.encode(text)
    assert len(ids) < len(text) and hf.decode(ids) == text          # merges learned, exact round trip
    samples = D.pack_documents(docs[:50], hf, seq_length=16)
    assert samples.shape[1] == 17 and samples.max() < hf.vocab_size
    assert (samples == hf.eos_id).any()                              # documents end with EOS
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model vocab_size is 100"):
        D.load_tokenizer(tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="is not a directory"):
        D.load_tokenizer(tmp_path / "nope", vocab_size=320)
