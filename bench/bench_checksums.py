#!/usr/bin/env python
"""Cost of checkpoint checksums: hash throughput next to plain read throughput, side by side.

    python bench/bench_checksums.py                  # 4 files x 512 MB (2 GB) in a temp dir
    python bench/bench_checksums.py --files 8 --file-mb 1024 --dir /scratch/x

A checkpoint's ``.distcp`` files are written, then read back with 16 MiB ``readinto`` blocks by
each method, in interleaved rounds (so load on the machine hits every method alike):

``read``           the read alone: the floor any verification pays;
``xxh3_64``        what ``int4_qat.checksums`` uses (``xxhash``);
``crc32``          ``zlib.crc32`` (stdlib);
``blake2b``        ``hashlib.blake2b`` (cryptographic, stdlib);
``sha256``         ``hashlib.sha256``.

Each is measured *warm* (files in the page cache: the hash's own speed bounds it; what a save
pays, hashing files it has just written) and *cold* (``posix_fadvise(DONTNEED)`` on these files
before the round: the storage bounds it; what a resume pays). Then the real
``int4_qat.checksums.file_entries`` (save) and ``verify_checkpoint_files`` (load) run on the
directory. Printed: GB/s per method and the ratio to ``read`` in the same round, and the
extrapolation to a Qwen3-235B checkpoint with optimizer state (~3.3 TB) split over 64 ranks.
"""
import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import xxhash  # noqa: E402

from int4_qat import checksums  # noqa: E402

BLOCK = 16 << 20


def _drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_with(paths, make):
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p in paths:
        update = make()
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                update(view[:k])
                n += k
    return n / (time.perf_counter() - t0) / 1e9


def _crc():
    state = [0]

    def update(b):
        state[0] = zlib.crc32(b, state[0])
    return update


METHODS = {
    "read": lambda: (lambda b: None),
    "xxh3_64": lambda: xxhash.xxh3_64().update,
    "crc32": _crc,
    "blake2b": lambda: hashlib.blake2b().update,
    "sha256": lambda: hashlib.sha256().update,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--file-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-checksums-", dir=a.dir) as d:
        paths = []
        chunk = os.urandom(BLOCK)
        for i in range(a.files):
            p = os.path.join(d, f"__{i}_0.distcp")
            with open(p, "wb") as f:
                for _ in range(a.file_mb * (1 << 20) // BLOCK):
                    f.write(chunk)
            paths.append(p)
        total = sum(os.path.getsize(p) for p in paths) / 1e9
        print(f"{a.files} files, {total:.2f} GB, {a.rounds} interleaved rounds; GB/s (ratio to read, same round)")
        res = {(m, c): [] for m in METHODS for c in ("warm", "cold")}
        ratios = {(m, c): [] for m in METHODS for c in ("warm", "cold")}
        for _ in range(a.rounds):
            for cache in ("warm", "cold"):
                got = {}
                for m, make in METHODS.items():
                    if cache == "cold":
                        _drop_cache(paths)
                    else:
                        _read_with(paths, METHODS["read"])     # make sure they are cached
                    got[m] = _read_with(paths, make)
                for m, v in got.items():
                    res[(m, cache)].append(v)
                    ratios[(m, cache)].append(v / got["read"])
        print(f"{'method':<10} {'warm GB/s':>10} {'(x read)':>9} {'cold GB/s':>10} {'(x read)':>9}")
        for m in METHODS:
            w, c = statistics.median(res[(m, "warm")]), statistics.median(res[(m, "cold")])
            rw, rc = statistics.median(ratios[(m, "warm")]), statistics.median(ratios[(m, "cold")])
            print(f"{m:<10} {w:>10.2f} {rw:>9.2f} {c:>10.2f} {rc:>9.2f}")
        # the real functions on the directory
        t0 = time.perf_counter()
        entries = checksums.file_entries(d)
        checksums.write_checksums(d, entries)
        t_save = time.perf_counter() - t0
        _drop_cache(paths)
        t0 = time.perf_counter()
        n = checksums.verify_checkpoint_files(d)
        t_load = time.perf_counter() - t0
        print(f"int4_qat.checksums: save (warm) {total / t_save:.2f} GB/s, verify (cold) "
              f"{total / t_load:.2f} GB/s over {n} files")
        per_rank_gb = 3.3e3 / 64
        print(f"Qwen3-235B + optimizer (~3.3 TB) on 64 ranks = {per_rank_gb:.0f} GB per rank: save adds "
              f"~{per_rank_gb / (total / t_save):.0f} s, a resume's verification "
              f"~{per_rank_gb / (total / t_load):.0f} s per rank at these speeds (each rank its share)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
