"""The encoded dataset: built by streaming rows through the Encoder into flat on-disk arrays.

Memory stays flat in the size of the file: rows are read, encoded and appended in batches, and the
arrays are memory-mapped when read back. Layout of a built dataset directory:

    meta.json      counts and settings
    input_ids.bin  int32, all examples' tokens concatenated
    trained.bin    uint8, 1 where the token is trained (labels = input_ids there, IGNORE_INDEX elsewhere)
    offsets.bin    int64, example i spans [offsets[i], offsets[i+1])
    where.txt      `file:line` of each example's source row
    rejects.jsonl  every row that did not become an example, with its reason
"""

from __future__ import annotations

import json
import shutil
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from sftlab.config import DataConfig
from sftlab.data import cache
from sftlab.data.encode import IGNORE_INDEX, Dropped, Encoder, Example
from sftlab.data.formats import field_report
from sftlab.data.reasoning import prepare
from sftlab.data.sources import Source, encoder_for, read, resolve, source_rows, source_settings
from sftlab.data.rejects import RejectLog, conversation_row
from sftlab.errors import DataError

BATCH_ROWS = 512


@dataclass
class DatasetStats:
    rows: int = 0
    """Rows read (valid or not)."""
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Rows that did not become examples, by reason."""
    special_token_rows: int = 0
    """Examples whose message contents hold special-token strings (as text, or as control tokens under
    data.special_tokens_in_content=allow); refused ones are among `rejected`."""
    ignored_fields: dict[str, int] = field(default_factory=dict)
    """Fields of the rows (or their messages, `messages[].KEY`) the reader does not use: rows holding each."""


class EncodedDataset:
    """Read-only view of a built dataset directory; `ds[i]` is an Example."""

    def __init__(self, directory: str | Path, *, keep_alive: Any = None) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        self.stats = DatasetStats(**meta["stats"])
        self.added_tokens: list[str] = meta.get("added_tokens", [])
        self.offsets = np.fromfile(self.directory / "offsets.bin", dtype=np.int64)
        total = int(self.offsets[-1])
        self._ids = _memmap(self.directory / "input_ids.bin", np.int32, total)
        self._trained = _memmap(self.directory / "trained.bin", np.uint8, total)
        self._keep_alive = keep_alive  # e.g. the TemporaryDirectory of an uncached build

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def max_token_id(self) -> int:
        return int(self._ids.max()) if len(self._ids) else -1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, index: int) -> Example:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self._ids[start:end].astype(np.int64)
        labels = np.where(self._trained[start:end] == 1, ids, IGNORE_INDEX)
        return Example(ids.tolist(), labels.tolist(), self.where(index))

    def where(self, index: int) -> str:
        if not hasattr(self, "_where"):
            self._where = (self.directory / "where.txt").read_text(encoding="utf-8").splitlines()
        return self._where[index]

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    @property
    def rejects_path(self) -> Path:
        return self.directory / "rejects.jsonl"

    def close(self) -> None:
        """Release the arrays, and delete the directory of an uncached build."""
        self._ids = self._trained = np.zeros(0)
        if self._keep_alive is not None:
            self._keep_alive.cleanup()
            self._keep_alive = None

    def __enter__(self) -> "EncodedDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _memmap(path: Path, dtype: type, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


Writer = Callable[[str | Path, DataConfig, Encoder, Path, dict[str, Any]], None]
"""Fills a dataset directory (the layout above) from a data file."""


def build_dataset(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, *,
                  rejects_path: str | Path | None = None, write: Writer | None = None,
                  rows: str | None = None) -> EncodedDataset:
    """Encode `data_path` (or reuse the cached encoding); copy its rejected rows to `rejects_path`. `write`
    fills a dataset directory from the file (default: conversations); a writer of other `rows` (preference
    pairs) names them, so their encoding never shares a cache entry with the file's conversations."""
    write = write or _write
    source = data_path if isinstance(data_path, Source) else resolve(data_path)
    encoder = encoder_for(source, encoder)
    settings = {k: v for k, v in asdict(data).items() if k not in ("train", "eval", "cache_dir", "cache")}
    settings["added_tokens"] = encoder.added_tokens
    settings["source"] = source_settings(source, encoder)
    if rows is not None:
        settings["rows"] = rows
    if data.cache:
        root = cache.cache_root(data.cache_dir)
        key = cache.dataset_key(data_path, tokenizer=encoder.tokenizer, template_source=encoder.template.source,
                                settings=settings, data_digest=source.fingerprint())
        found = cache.lookup(root, key)
        if found is None:
            building = cache.new_entry(root)
            try:
                write(source, data, encoder, building, settings)
            except BaseException:
                shutil.rmtree(building, ignore_errors=True)
                raise
            found = cache.commit(building, root, key)
        dataset = EncodedDataset(found)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="sftlab-data-")
        write(source, data, encoder, Path(scratch.name), settings)
        dataset = EncodedDataset(scratch.name, keep_alive=scratch)
    if rejects_path is not None and dataset.rejects_path.is_file():
        Path(rejects_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dataset.rejects_path, rejects_path)
    return dataset


def _write(data_path: Source, data: DataConfig, encoder: Encoder, directory: Path,
           settings: dict[str, Any]) -> None:
    if data.on_bad_row == "error":
        # Every row read and validated first (no tokenising: ~1 s per 100k rows), so a bad row deep in the
        # file fails at once instead of after encoding all the rows before it.
        for _ in read(data_path, data, on_bad_row="error", max_row_bytes=encoder.row_limit):
            pass
    stats = DatasetStats()
    offsets = array("q", [0])  # 8 bytes per example, not a Python int object each
    encode_rejects = 0
    with RejectLog(directory / "rejects.jsonl") as log, \
            (directory / "input_ids.bin").open("wb") as ids_file, \
            (directory / "trained.bin").open("wb") as trained_file, \
            (directory / "where.txt").open("w", encoding="utf-8") as where_file:
        conversations = prepare(read(data_path, data, on_bad_row=data.on_bad_row, rejects=log,
                                     max_row_bytes=encoder.row_limit),
                                encoder.template, reasoning=data.reasoning, reasoning_turns=data.reasoning_turns)
        encoded_rows, last_where = 0, None
        batches = iter(lambda: list(islice(conversations, BATCH_ROWS)), [])
        for batch, results in encoder.encode_stream(batches):
            for conversation in batch:  # split reasoning turns: several examples of one row, one after another
                encoded_rows += conversation.where != last_where
                last_where = conversation.where
            kept = []
            for conversation, result in zip(batch, results):
                if isinstance(result, DataError):
                    if data.on_bad_row == "error" and not isinstance(result, Dropped):
                        raise result
                    log.add(where=result.where, reason=result.reason, message=result.detail,
                            row=conversation_row(conversation))
                    encode_rejects += 1
                    continue
                kept.append(result)
                offsets.append(offsets[-1] + len(result.ids))
                stats.truncated += int(result.truncated)
                stats.special_token_rows += int(result.special_tokens_in_content > 0)
            if kept:  # one write per batch, not per example
                trained = np.concatenate([r.trained for r in kept])
                np.concatenate([r.ids for r in kept]).astype(np.int32).tofile(ids_file)
                trained.astype(np.uint8).tofile(trained_file)
                where_file.write("".join(r.example.where + "\n" for r in kept))
                stats.examples += len(kept)
                stats.trained_tokens += int(trained.sum())
        stats.rows = encoded_rows + log.total - encode_rejects  # rows rejected while reading never reached a batch
        stats.rejected = dict(log.counts)
    fields = field_report(source_rows(data_path, max_row_bytes=encoder.row_limit), _format_of(data_path, data))
    stats.ignored_fields = {name: n["rows"] for name, n in fields.items() if not n["used"]}
    np.frombuffer(offsets, dtype=np.int64).tofile(directory / "offsets.bin")
    stats.tokens = offsets[-1]
    meta = {"stats": asdict(stats), "settings": settings, "added_tokens": encoder.added_tokens}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")


def _format_of(data_path: Source | str | Path, data: DataConfig) -> str:
    """The row format a source is read in: its own `format`, else data.format."""
    return (data_path.spec.format if isinstance(data_path, Source) else None) or data.format
