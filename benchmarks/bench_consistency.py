"""What checking files against each other costs (issue 14, point 8): the data fingerprint a resumed run
compares, and the size + CRC-32 check of a data-cache entry.

Not a unit test. Writes a file of --size-mb random bytes (in the page cache, as a data file just read is)
and times, each the best of --repeat runs:
- `cache.file_digest` (BLAKE2b over the whole file: the resume fingerprint, shared with the cache key, so a
  run hashes its data once) and the same call again (remembered: the second use in one run is free);
- a partial fingerprint (size + mtime + hash of the first and last MiB), the cheaper alternative considered;
- `cache.seal` and `cache.damage` on an entry holding the file (CRC-32 of every file: the cache check).

    python benchmarks/bench_consistency.py                 # 512 MB
    python benchmarks/bench_consistency.py --size-mb 2048
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from sftlab.data import cache  # noqa: E402


def best(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def partial_digest(path: Path, edge: int = 1 << 20) -> str:
    digest = hashlib.blake2b(digest_size=20)
    stat = path.stat()
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as file:
        digest.update(file.read(edge))
        file.seek(max(0, stat.st_size - edge))
        digest.update(file.read(edge))
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-consistency-") as scratch:
        entry = Path(scratch) / "entry"
        entry.mkdir()
        data = entry / "input_ids.bin"
        with data.open("wb") as file:
            for _ in range(args.size_mb):
                file.write(os.urandom(1 << 20))
        size = data.stat().st_size

        def full() -> None:
            cache._DIGESTS.clear()
            cache.file_digest(data)

        cache.file_digest(data)  # warm the page cache
        results = {
            "size_mb": args.size_mb,
            "full_digest_s": best(args.repeat, full),
            "remembered_digest_s": best(args.repeat, lambda: cache.file_digest(data)),
            "partial_digest_s": best(args.repeat, lambda: partial_digest(data)),
            "seal_s": best(args.repeat, lambda: cache.seal(entry)),
            "verify_s": best(args.repeat, lambda: cache.damage(entry)),
        }
    mb = size / 1e6
    print(f"{'what':<34}{'seconds':>10}{'MB/s':>10}")
    for key, label in (("full_digest_s", "full BLAKE2b fingerprint"), ("remembered_digest_s", "same file again"),
                       ("partial_digest_s", "size+mtime+first/last MiB"), ("seal_s", "cache entry: seal (CRC-32)"),
                       ("verify_s", "cache entry: verify (CRC-32)")):
        seconds = results[key]
        rate = f"{mb / seconds:,.0f}" if seconds > 1e-3 else "-"
        print(f"{label:<34}{seconds:>10.3f}{rate:>10}")
    out = REPO / "benchmarks" / "results" / "bench_consistency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
