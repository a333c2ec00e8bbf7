"""Content-keyed cache of encoded datasets.

The key hashes everything the encoded result depends on: the data file's bytes, the tokenizer (its full
serialised state, added tokens included), the template text, the data settings and sftlab's version. A
re-run with the same inputs reuses the stored arrays; any change gives a new key. Entries are written to a
temporary directory and renamed into place, so a killed build never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import sftlab

_CHUNK = 1 << 22


def cache_root(configured: str | None = None) -> Path:
    """`data.cache_dir`, else $SFTLAB_CACHE, else ~/.cache/sftlab."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("SFTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sftlab"


def file_digest(path: str | Path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with Path(path).open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
        "layout": 1,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def entry_dir(root: Path, key: str) -> Path:
    return root / "datasets" / key


def lookup(root: Path, key: str) -> Path | None:
    """The finished entry for `key`, or None."""
    entry = entry_dir(root, key)
    return entry if (entry / "meta.json").is_file() else None


def new_entry(root: Path) -> Path:
    """A private temporary directory to build an entry in (same filesystem, so `commit` is a rename)."""
    base = root / "datasets"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".building-", dir=base))


def commit(building: Path, root: Path, key: str) -> Path:
    """Atomically publish a built entry; if another process published the same key first, use theirs."""
    target = entry_dir(root, key)
    try:
        os.rename(building, target)
    except OSError:
        if lookup(root, key) is None:
            raise
        shutil.rmtree(building, ignore_errors=True)
    return target
