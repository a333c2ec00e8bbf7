"""Content-keyed cache of encoded datasets.

The key hashes everything the encoded result depends on: the data file's bytes, the tokenizer (its full
serialised state, added tokens included), the template text, the data settings and sftlab's version. A
re-run with the same inputs reuses the stored arrays; any change gives a new key. Entries are written to a
temporary directory and renamed into place, so a killed build never leaves a half entry behind.

An entry carries the size and CRC-32 of each of its files (entry.json, written just before the rename); a
lookup checks them and rebuilds an entry that no longer matches (a truncated or edited `input_ids.bin`, a
deleted file), saying so, instead of training on it or failing deep in numpy. Checking reads the entry once
(CRC-32 runs at 1-2.5 GB/s here: about a second per 500M tokens), which is small beside hashing the data
file for the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sftlab
from sftlab.errors import ConfigError

_CHUNK = 1 << 22
MANIFEST = "entry.json"
"""Inside an entry: {file name: {"bytes": size, "crc32": checksum}} of every other file in it."""


def cache_root(configured: str | None = None) -> Path:
    """`data.cache_dir`, else $SFTLAB_CACHE, else ~/.cache/sftlab."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("SFTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sftlab"


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
"""file_digest results by (path, size, mtime, inode, device): a run hashes its data file once, for the cache
key and for the resume check (train/rundir.py) both."""


def file_digest(path: str | Path) -> str:
    """BLAKE2b of the file's bytes (~600 MB/s here), remembered for the file as it is now."""
    path = Path(path)
    stat = path.stat()
    known = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    if known in _DIGESTS:
        return _DIGESTS[known]
    digest = hashlib.blake2b(digest_size=20)
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    _DIGESTS[known] = digest.hexdigest()
    return _DIGESTS[known]


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What identifies a data source's content: for a file its size, modification time and full digest (the
    digest decides; size and time say what changed); for a directory the same over its files; for anything
    else (a hub id) only its name."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "bytes": stat.st_size, "modified": _when(stat.st_mtime),
                "blake2b": file_digest(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.blake2b(digest_size=20)
        for file in files:
            digest.update(f"{file.relative_to(path)}\0{file_digest(file)}\0".encode())
        return {"path": str(path), "bytes": sum(f.stat().st_size for f in files), "files": len(files),
                "modified": _when(max((f.stat().st_mtime for f in files), default=0.0)),
                "blake2b": digest.hexdigest()}
    return {"path": str(path)}


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of the tokenizer's full state (vocabulary, merges, normaliser, added tokens)."""
    digest = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(type(tokenizer).__name__.encode())
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def dataset_key(data_path: str | Path, *, tokenizer: Any, template_source: str,
                settings: Mapping[str, Any], data_digest: str | None = None) -> str:
    """`data_digest` stands for the data file's bytes when the data is not one file (data/sources.py)."""
    parts = {
        "data": data_digest or file_digest(data_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": hashlib.blake2b(template_source.encode("utf-8"), digest_size=20).hexdigest(),
        "settings": dict(settings),
        "sftlab": sftlab.__version__,
        "layout": 3,  # 2: entries carry entry.json; 3: and quality.json (conversations of up to 20k rows)
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def entry_dir(root: Path, key: str) -> Path:
    return root / "datasets" / key


def lookup(root: Path, key: str) -> Path | None:
    """The finished, whole entry for `key`, or None. An entry whose files no longer match their recorded
    sizes and checksums is removed (saying why, on stderr), so the caller builds it again."""
    entry = entry_dir(root, key)
    if not entry.is_dir():
        return None
    problem = damage(entry)
    if problem is None:
        return entry
    print(f"data cache: {entry} is damaged ({problem}); encoding the data again", file=sys.stderr, flush=True)
    discard(entry)
    return None


def damage(entry: Path) -> str | None:
    """What no longer matches in `entry` (a file missing, its size or checksum changed), or None if whole."""
    try:
        files = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))["files"]
        expected = {str(name): (int(f["bytes"]), int(f["crc32"])) for name, f in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST}: the entry is incomplete"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable: {type(exc).__name__}"
    for name, (size, crc) in sorted(expected.items()):
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, {size:,} were written"
        if _crc32(path) != crc:
            return f"{name} was changed after it was written (checksum differs)"
    return None


def discard(entry: Path) -> None:
    """Remove an entry: renamed aside first, so no reader ever finds a half-deleted one under its key."""
    trash = entry.with_name(f".discarded-{entry.name}-{os.getpid()}")
    try:
        os.rename(entry, trash)
    except OSError:
        return  # another process discarded (or replaced) it first
    shutil.rmtree(trash, ignore_errors=True)


def new_entry(root: Path) -> Path:
    """A private temporary directory to build an entry in (same filesystem, so `commit` is a rename)."""
    base = root / "datasets"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (base, *base.parents) if p.exists() and not p.is_dir()), base)
        raise ConfigError(f"the data cache dir {root} cannot be used: {blocker} is a file, not a directory. Set "
                          "data.cache_dir (or $SFTLAB_CACHE) to a directory, or data.cache=false to encode "
                          "without caching.") from None
    try:
        return Path(tempfile.mkdtemp(prefix=".building-", dir=base))
    except PermissionError:
        raise ConfigError(f"the data cache dir {root} is not writable (permission denied in {base}). Set "
                          "data.cache_dir (or $SFTLAB_CACHE) to a directory you can write, or data.cache=false."
                          ) from None


def seal(building: Path) -> None:
    """Record the size and CRC-32 of every file of a built entry in its entry.json."""
    files = {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)}
             for p in sorted(building.iterdir()) if p.is_file() and p.name != MANIFEST}
    (building / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def _crc32(path: Path) -> int:
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return crc


def commit(building: Path, root: Path, key: str) -> Path:
    """Atomically publish a built entry (sealed first); if another process published the same key first,
    use theirs."""
    seal(building)
    target = entry_dir(root, key)
    try:
        os.rename(building, target)
    except OSError:
        if lookup(root, key) is None:  # not published by another process (a damaged one is discarded): retry
            os.rename(building, target)
        else:
            shutil.rmtree(building, ignore_errors=True)
    return target
