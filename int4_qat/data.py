"""Text → token ids → packed training samples, deterministic and data-parallel aware.

How a language-model batch is made here
---------------------------------------
1. **Documents.** ``load_documents(paths)`` reads ``.txt`` files (by default every blank-line
   separated block is one document; ``txt_mode="file"`` makes the whole file one document),
   ``.jsonl`` files (one JSON object per line with a string ``"text"`` field; any other shape is a
   ``ValueError`` naming the file and line) and ``.py`` files (their docstrings, parsed with
   ``ast``); a file named explicitly is read whatever its suffix. Directories are expanded
   recursively in sorted order. The special entry ``"system"`` (:data:`SYSTEM_CORPUS`, also
   ``"@system"``) stands for :func:`system_corpus`: real English text
   present on every machine that has Python — the docstrings of the standard library plus the
   licence texts in ``/usr/share/common-licenses`` — so tests and CPU demos never train on random
   tokens and never download anything.
2. **Held-out split by document.** ``split_documents(docs, eval_fraction, seed)`` permutes the
   document indices with a seeded generator and holds the first ``ceil(fraction · n)`` out. A
   document is never cut between train and eval, so the eval loss measures generalisation to
   unseen text, not memorised neighbours.
3. **Tokenizer.** ``load_tokenizer(path_or_None, vocab_size)``: an HF tokenizer directory
   (``transformers.AutoTokenizer``, ``local_files_only=True``) or :class:`ByteTokenizer` — ids
   0..255 are the UTF-8 bytes, 256 = BOS, 257 = EOS, 258 = PAD; it needs a model vocabulary of at
   least 260 entries and round-trips any text exactly.
4. **Packing.** Every document becomes ``[BOS] + tokens + [EOS]``; the stream is concatenated and
   cut into windows of ``seq_length + 1`` tokens that overlap by one token (Megatron's GPT dataset
   convention), so that ``inputs = window[:-1]`` and ``labels = window[1:]`` cover every next-token
   transition exactly once. The tail shorter than a window is dropped.
5. **Sampling.** :class:`BatchSampler` walks an endless stream of epochs, each a seeded
   permutation of the samples. Step ``s`` consumes global samples ``[s·GB, (s+1)·GB)``; data
   parallel rank ``r`` of ``dp`` takes the contiguous slice ``r·GB/dp …`` of it and cuts that into
   micro-batches. The only state is the number of consumed samples, which checkpoints store, so a
   resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import ast
import functools
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

__all__ = [
    "SYSTEM_CORPUS",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "load_documents",
    "system_corpus_paths",
    "system_corpus",
    "split_documents",
    "pack_documents",
    "PackedDataset",
    "BatchSampler",
    "build_datasets",
    "iter_batches",
]

#: Entry in ``train.data`` that stands for :func:`system_corpus` (same value as
#: ``int4_qat.recipe.SYSTEM_DATA``; ``"@system"`` is accepted too).
SYSTEM_CORPUS = "system"
_SYSTEM_ALIASES = ("system", "@system")

#: Suffixes picked up when a *directory* is expanded. A file named explicitly is read whatever its
#: suffix (``.jsonl`` → JSON lines, ``.py`` → docstrings, anything else → plain text), so licence
#: files such as ``/usr/share/common-licenses/GPL-3`` work.
_DIR_SUFFIXES = (".txt", ".md", ".jsonl", ".py")


# --------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then BOS=256, EOS=257, PAD=258.

    ``vocab_size`` is the model's vocabulary (embedding rows); it must be ≥ 260 so the special
    ids fit with room to spare. Decoding drops special ids and replaces invalid UTF-8.
    """

    BOS = 256
    EOS = 257
    PAD = 258
    MIN_VOCAB = 260

    def __init__(self, vocab_size: int = 260):
        if vocab_size < self.MIN_VOCAB:
            raise ValueError(
                f"ByteTokenizer needs a model vocab_size >= {self.MIN_VOCAB} (256 bytes + BOS/EOS/PAD), "
                f"got {vocab_size}; raise vocab_size in the model config.json or set model.tokenizer"
            )
        self.vocab_size = vocab_size
        self.bos_id = self.BOS
        self.eos_id = self.EOS
        self.pad_id = self.PAD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A local Hugging Face tokenizer directory behind the same small interface."""

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None):
        from transformers import AutoTokenizer

        path = str(path)
        if not os.path.isdir(path):
            raise ValueError(f"model.tokenizer: {path!r} is not a directory with an HF tokenizer")
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer {path!r} has {self.vocab_size} tokens but the model vocab_size is {vocab_size}"
            )
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path!r} defines no eos_token; documents cannot be separated")
        self.bos_id = self.tok.bos_token_id  # may be None (Qwen3 has none): then no BOS is added
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike | None, vocab_size: int):
    """``None`` → :class:`ByteTokenizer` (needs ``vocab_size`` ≥ 260); a directory → :class:`HFTokenizer`."""
    if path is None:
        return ByteTokenizer(vocab_size)
    return HFTokenizer(path, vocab_size)


# --------------------------------------------------------------------------- documents
@functools.lru_cache(maxsize=4096)
def _py_docstrings(path: Path) -> tuple[str, ...]:
    """Docstrings of a Python source file (module, classes, functions), without importing it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 3:
                out.append(doc)
    return tuple(out)


def _txt_documents(path: Path, txt_mode: str) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    if b"\x00" in raw[:4096]:
        raise ValueError(f"{path}: looks binary (NUL bytes); data files must be UTF-8 text, .jsonl or .py")
    text = raw.decode("utf-8", errors="replace")
    if txt_mode == "file":
        return [text.strip()] if text.strip() else []
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def _jsonl_documents(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(f"{path}:{lineno}: expected an object with a \"text\" field")
            if not isinstance(obj["text"], str):
                raise ValueError(
                    f"{path}:{lineno}: \"text\" must be a string, got {type(obj['text']).__name__}"
                )
            if obj["text"].strip():
                out.append(obj["text"])
    return out


def _expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _DIR_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"train.data: {str(p)!r} does not exist")
    return files


def load_documents(paths: Sequence[str | os.PathLike], txt_mode: str = "paragraph") -> list[str]:
    """All documents of ``paths`` in a deterministic order (see the module docstring)."""
    if txt_mode not in ("paragraph", "file"):
        raise ValueError(f"txt_mode must be 'paragraph' or 'file', got {txt_mode!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: list[str] = []
    real = [p for p in paths if str(p) not in _SYSTEM_ALIASES]
    if len(real) != len(paths):
        docs.extend(system_corpus())
    for f in _expand(real):
        if f.suffix == ".jsonl":
            docs.extend(_jsonl_documents(f))
        elif f.suffix == ".py":
            docs.extend(_py_docstrings(f))
        else:
            docs.extend(_txt_documents(f, txt_mode))
    if not docs:
        raise ValueError(f"train.data: no documents found in {[str(p) for p in paths]}")
    return docs


def system_corpus_paths() -> list[Path]:
    """Standard-library ``.py`` files (top level and one package level; tests, idlelib and
    site-packages excluded) then ``/usr/share/common-licenses/*`` when present, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo")
    py = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    py = [f for f in py if not any(part in skip for part in f.relative_to(root).parts)]
    lic_dir = Path("/usr/share/common-licenses")
    lic = sorted(f for f in lic_dir.iterdir() if f.is_file()) if lic_dir.is_dir() else []
    return py + lic


def _iter_system_docs() -> Iterator[str]:
    for f in system_corpus_paths():
        if f.suffix == ".py":
            yield from _py_docstrings(f)
        else:
            yield from _txt_documents(f, "paragraph")


@functools.lru_cache(maxsize=1)
def _system_corpus_cached() -> tuple[str, ...]:
    docs = tuple(_iter_system_docs())
    if not docs:
        raise ValueError("system corpus is empty: no stdlib sources found under sysconfig 'stdlib'")
    return docs


def system_corpus(max_docs: int | None = None) -> list[str]:
    """Real English documents from this machine: stdlib docstrings + common licences (~1.5 MB).

    The whole corpus is parsed once per process (~4 s on one core). ``max_docs`` returns the
    first documents only and parses just the files needed for them (a quick subset for tests).
    """
    if max_docs is None:
        return list(_system_corpus_cached())
    out: list[str] = []
    for d in _iter_system_docs():
        if len(out) >= max_docs:
            break
        out.append(d)
    return out


def split_documents(docs: Sequence[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by document → ``(train, eval)``; order within each part is the input order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"train.eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(docs)
    n_eval = math.ceil(eval_fraction * n) if eval_fraction > 0 else 0
    if eval_fraction > 0 and n < 2:
        raise ValueError(f"cannot hold out documents: only {n} document(s)")
    n_eval = min(n_eval, n - 1)
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=g)[:n_eval].tolist())
    train = [d for i, d in enumerate(docs) if i not in held]
    evl = [d for i, d in enumerate(docs) if i in held]
    return train, evl


def pack_documents(docs: Sequence[str], tokenizer, seq_length: int) -> torch.Tensor:
    """``[num_samples, seq_length + 1]`` int64 windows over ``BOS doc EOS BOS doc EOS …``."""
    if seq_length < 1:
        raise ValueError(f"train.seq_length must be >= 1, got {seq_length}")
    stream: list[int] = []
    for d in docs:
        if tokenizer.bos_id is not None:
            stream.append(tokenizer.bos_id)
        stream.extend(tokenizer.encode(d))
        stream.append(tokenizer.eos_id)
    ids = torch.tensor(stream, dtype=torch.int64)
    n = (ids.numel() - 1) // seq_length
    if n < 1:
        raise ValueError(
            f"{ids.numel()} tokens cannot fill one sample of seq_length + 1 = {seq_length + 1}; add data"
        )
    # window i = ids[i*S : i*S + S + 1]  (one-token overlap: labels of i end where inputs of i+1 start)
    return ids[: n * seq_length + 1].unfold(0, seq_length + 1, seq_length).contiguous()


@dataclass
class PackedDataset:
    """Packed samples; ``dataset[i]`` → ``(inputs, labels)`` each ``[seq_length]``."""

    samples: torch.Tensor  # [N, S + 1] int64

    def __len__(self) -> int:
        return self.samples.shape[0]

    @property
    def seq_length(self) -> int:
        return self.samples.shape[1] - 1

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[torch.as_tensor(list(indices), dtype=torch.int64)]
        return s[:, :-1].contiguous(), s[:, 1:].contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.samples[i, :-1], self.samples[i, 1:]


class BatchSampler:
    """Deterministic, resumable, data-parallel-aware index sampler (see the module docstring).

    ``microbatches(step)`` → this rank's micro-batches of step ``step`` (0-based) as index lists;
    ``shuffle=False`` walks the samples in order (used for eval).
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234, shuffle: bool = True):
        if global_batch % (micro_batch * dp_size) != 0:
            raise ValueError(
                f"train.global_batch={global_batch} must be a multiple of micro_batch × dp = "
                f"{micro_batch} × {dp_size} = {micro_batch * dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if num_samples < 1:
            raise ValueError("dataset is empty")
        self.n, self.gb, self.mb = num_samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle

    @property
    def num_microbatches(self) -> int:
        return self.gb // (self.mb * self.dp_size)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample permutation of ``epoch`` (the last one is kept: steps walk epochs in order)."""
        cached = getattr(self, "_order_cache", None)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        if not self.shuffle:
            order = torch.arange(self.n)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g)
        self._order_cache = (epoch, order)
        return order

    def global_indices(self, start: int, count: int) -> list[int]:
        """Sample ids at positions ``[start, start+count)`` of the endless epoch stream."""
        out = []
        pos = start
        while len(out) < count:
            epoch, off = divmod(pos, self.n)
            take = min(count - len(out), self.n - off)
            out.extend(self._epoch_order(epoch)[off: off + take].tolist())
            pos += take
        return out

    def microbatches(self, step: int) -> list[list[int]]:
        idx = self.global_indices(step * self.gb, self.gb)
        per_rank = self.gb // self.dp_size
        mine = idx[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]
        return [mine[i: i + self.mb] for i in range(0, per_rank, self.mb)]

    def consumed_samples(self, steps_done: int) -> int:
        """Data position after ``steps_done`` steps (what a checkpoint stores)."""
        return steps_done * self.gb


def build_datasets(data: Sequence[str], tokenizer, seq_length: int, eval_fraction: float,
                   seed: int, txt_mode: str = "paragraph") -> tuple[PackedDataset, PackedDataset | None]:
    """Documents → split → packed ``(train, eval)`` datasets (eval ``None`` when fraction is 0)."""
    docs = load_documents(data, txt_mode=txt_mode)
    train_docs, eval_docs = split_documents(docs, eval_fraction, seed)
    train = PackedDataset(pack_documents(train_docs, tokenizer, seq_length))
    evl = PackedDataset(pack_documents(eval_docs, tokenizer, seq_length)) if eval_docs else None
    return train, evl


def iter_batches(dataset: PackedDataset, microbatches: Sequence[Sequence[int]]) -> Iterator[dict]:
    """Micro-batch dicts ``{"tokens", "labels"}`` for a schedule's data iterator."""
    for mb in microbatches:
        x, y = dataset.batch(mb)
        yield {"tokens": x, "labels": y}
