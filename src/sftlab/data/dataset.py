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

import contextlib
import json
import shutil
import tempfile
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sftlab.config import DataConfig
from sftlab.data import cache
from sftlab.data.encode import IGNORE_INDEX, Dropped, Encoded, Encoder, Example
from sftlab.data.formats import FieldTally
from sftlab.data.parallel import EncodePool, RowReader, Validator, encoding_ranks, worker_count
from sftlab.data.quality import WriterQuality
from sftlab.data.reasoning import prepare
from sftlab.data.rejects import RejectLog, conversation_row
from sftlab.data.schema import Conversation
from sftlab.data.sources import Source, encoder_for, read, resolve, source_settings
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

    def quality(self) -> dict[str, Any] | None:
        """The `sftlab check` report the writer tallied ({"report": dict, "text": str}), or None (too many rows,
        or not conversations)."""
        path = self.directory / "quality.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def close(self) -> None:
        """Release the arrays, and delete the directory of an uncached build."""
        self._ids = self._trained = np.zeros(0)
        if self._keep_alive is not None:
            self._keep_alive.cleanup()
            self._keep_alive = None

    def __enter__(self) -> EncodedDataset:
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
    settings = {k: v for k, v in asdict(data).items()
                if k not in ("train", "eval", "cache_dir", "cache", "num_workers")}  # num_workers: same result
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


class RowKind(Protocol):
    """What a dataset is written from — conversations (SFT), preference pairs, feedback rows: how its items are
    read and encoded, and what each encoded item adds. `write_examples` does the rest, the same for all."""

    def read(self, on_bad_row: str, rejects: RejectLog | None, fields: FieldTally | None) -> Iterator[Any]:
        """The valid items, in order; `fields` (when given, and the kind reports fields) counts each row's."""

    def validating_reader(self) -> RowReader:
        """`read("error", None, None)` as something that pickles, for a validating process (parallel.Validator)."""

    def encode_stream(self, batches: Iterable[Sequence[Any]]) -> Iterator[tuple[Sequence[Any], list[Any]]]:
        """Each batch with its results (an encoded item, or the DataError / Dropped of that item)."""

    def written(self, item: Any, result: Any) -> Written:
        """The examples an encoded item adds, and its flags."""

    def reject_row(self, item: Any) -> Any:
        """The item as a row for rejects.jsonl."""

    def finish(self, directory: Path, stats: DatasetStats) -> dict[str, Any]:
        """Write the kind's own files and fix its stats; the extra keys of meta.json."""


@dataclass(frozen=True)
class Written:
    examples: list[tuple[np.ndarray, np.ndarray, str]]
    """(input ids, trained flags, `file:line`) of each example an item gives (a pair: its two sides)."""
    truncated: bool = False
    special_tokens: bool = False


def write_examples(kind: RowKind, data: DataConfig, directory: Path, settings: dict[str, Any],
                   added_tokens: list[str], *, fields: FieldTally | None = None) -> None:
    """Fill `directory` (the layout above) from a kind's items in one encoding pass: examples, rejects, stats,
    the fields the rows hold (counted as they stream by), the kind's own files (conversations: the quality
    report a run's report shows, so it never encodes the data again), meta.json."""
    validator = None
    if data.on_bad_row == "error":
        # Every row read and validated first (no tokenising), so a bad row deep in the file fails at once
        # instead of after encoding all the rows before it; beside the encoding, for a large input.
        reader = kind.validating_reader()
        if Validator.wanted(data.on_bad_row, reader.input_bytes, ranks=encoding_ranks(data.cache)):
            with contextlib.suppress(Exception):  # a reader that does not pickle, no process to start: here
                validator = Validator(reader)
        if validator is None:
            for _ in kind.read("error", None, None):
                pass
    try:
        stats, offsets = _encode_into(kind, data, directory, fields, validator)
        if validator is not None:
            validator.finish()
    except DataError:
        if validator is not None:
            validator.finish()  # a bad row found by reading comes first, as if validated before encoding
        raise
    finally:
        if validator is not None:
            validator.stop()
    stats.ignored_fields = {} if fields is None else {name: n["rows"] for name, n in fields.report().items()
                                                        if not n["used"]}
    extra = kind.finish(directory, stats)
    np.frombuffer(offsets, dtype=np.int64).tofile(directory / "offsets.bin")
    stats.tokens = offsets[-1]
    meta = {"stats": asdict(stats), "settings": settings, "added_tokens": added_tokens, **extra}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")


def _encode_into(kind: RowKind, data: DataConfig, directory: Path, fields: FieldTally | None,
                 validator: Validator | None) -> tuple[DatasetStats, array]:
    """The encoding pass: examples and rejects written, the stats and example offsets returned."""
    with _Sink(directory) as sink:
        held = _HeldRejects(sink.log)
        items = kind.read(data.on_bad_row, held, fields)  # type: ignore[arg-type]

        def batches() -> Iterator[list[Any]]:
            while batch := list(islice(items, BATCH_ROWS)):
                yield batch
                held.batch += 1

        for number, (batch, results) in enumerate(kind.encode_stream(batches())):
            if validator is not None:
                validator.check()
            held.release(number + 1)
            sink.count_rows(batch)
            kept = []
            for item, result in zip(batch, results):
                if not isinstance(result, DataError):
                    kept.append(kind.written(item, result))
                elif data.on_bad_row == "error" and not isinstance(result, Dropped):
                    raise result
                else:
                    sink.reject(result, kind.reject_row(item))
            sink.add(kept)
        held.release(None)
    return sink.stats, sink.offsets


class _HeldRejects:
    """The reader's rejects, each written where a one-batch-ahead pipeline writes it, whatever the encoder's
    depth (data.num_workers keeps several batches in flight): the rows rejected while reading batch k + 1
    come before the encoding rejects of batch k, so rejects.jsonl is the same for any number of workers."""

    def __init__(self, log: RejectLog) -> None:
        self.log = log
        self.batch = 0
        """The batch being read now."""
        self._held: deque[tuple[int, dict[str, Any]]] = deque()

    def add(self, **reject: Any) -> None:
        self._held.append((self.batch, reject))

    def release(self, upto: int | None) -> None:
        """Write the rejects read while reading batches up to `upto` (None: all)."""
        while self._held and (upto is None or self._held[0][0] <= upto):
            self.log.add(**self._held.popleft()[1])


class _Sink:
    """The open files of a dataset being written, its offsets and running stats."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stats = DatasetStats()
        self.offsets = array("q", [0])  # 8 bytes per example, not a Python int object each
        self.rows = self.encode_rejects = 0
        self._last_where: str | None = None

    def __enter__(self) -> _Sink:
        self.log = RejectLog(self.directory / "rejects.jsonl").__enter__()
        self._ids = (self.directory / "input_ids.bin").open("wb")
        self._trained = (self.directory / "trained.bin").open("wb")
        self._where = (self.directory / "where.txt").open("w", encoding="utf-8")
        return self

    def count_rows(self, batch: Sequence[Any]) -> None:
        for item in batch:  # split reasoning turns: several examples of one row, one after another
            self.rows += item.where != self._last_where
            self._last_where = item.where

    def reject(self, error: DataError, row: Any) -> None:
        self.log.add(where=error.where, reason=error.reason, message=error.detail, row=row)
        self.encode_rejects += 1

    def add(self, kept: list[Written]) -> None:
        """One write per batch, not per example."""
        examples = [example for written in kept for example in written.examples]
        for written in kept:
            self.stats.truncated += int(written.truncated)
            self.stats.special_token_rows += int(written.special_tokens)
        if not examples:
            return
        for ids, _, _ in examples:
            self.offsets.append(self.offsets[-1] + len(ids))
        trained = np.concatenate([t for _, t, _ in examples])
        np.concatenate([ids for ids, _, _ in examples]).astype(np.int32).tofile(self._ids)
        trained.astype(np.uint8).tofile(self._trained)
        self._where.write("".join(where + "\n" for _, _, where in examples))
        self.stats.examples += len(examples)
        self.stats.trained_tokens += int(trained.sum())

    def __exit__(self, *exc: object) -> None:
        for file in (self._ids, self._trained, self._where):
            file.close()
        self.stats.rows = self.rows + self.log.total - self.encode_rejects  # rows rejected while reading never
        self.stats.rejected = dict(self.log.counts)                         # reached a batch
        self.log.__exit__(*exc)


class Conversations:
    """The rows of a source as conversations (SFT): prepared as data.reasoning / reasoning_turns say."""

    def __init__(self, source: Source, data: DataConfig, encoder: Encoder) -> None:
        self.source, self.data, self.encoder = source, data, encoder
        self.fields = FieldTally(_format_of(source, data))
        self.quality = WriterQuality(source, data, encoder)

    def read(self, on_bad_row: str, rejects: RejectLog | None, fields: FieldTally | None) -> Iterator[Conversation]:
        data = self.data
        conversations = read(self.source, data, on_bad_row=on_bad_row, rejects=rejects,
                             max_row_bytes=self.encoder.row_limit, fields=fields)
        if rejects is None:  # the validation pass: nothing is rendered
            return conversations
        return prepare(self.quality.conversations(conversations), self.encoder.template, reasoning=data.reasoning,
                       reasoning_turns=data.reasoning_turns)

    def validating_reader(self) -> RowReader:
        """`read("error", None, None)` as a RowReader (the validation pass)."""
        return RowReader(read, (self.source, self.data), {"on_bad_row": "error", "rejects": None,
                                                          "max_row_bytes": self.encoder.row_limit, "fields": None},
                         self.source.data_bytes())

    def encode_stream(self, batches: Iterable[Sequence[Any]]) -> Iterator[tuple[Sequence[Any], list[Any]]]:
        workers = worker_count(self.data.num_workers, self.source.data_bytes(),
                               ranks=encoding_ranks(self.data.cache))
        if workers > 1:
            # Results come back without their segments once the quality report stops tallying (only it reads them).
            stream = EncodePool(self.encoder, workers).encode_stream(batches, lambda: self.quality.active)
        else:
            stream = self.encoder.encode_stream(batches)
        for batch, results in stream:
            self.quality.batch(batch, results)
            yield batch, results

    def written(self, item: Conversation, result: Encoded) -> Written:
        return Written([(result.ids, result.trained, result.where)], result.truncated,
                       result.special_tokens_in_content > 0)

    def reject_row(self, item: Conversation) -> Any:
        return conversation_row(item)

    def finish(self, directory: Path, stats: DatasetStats) -> dict[str, Any]:
        self.quality.save(directory, stats.rejected, self.fields.report())
        return {}


def _write(data_path: Source, data: DataConfig, encoder: Encoder, directory: Path,
           settings: dict[str, Any]) -> None:
    kind = Conversations(data_path, data, encoder)
    write_examples(kind, data, directory, settings, encoder.added_tokens, fields=kind.fields)


def _format_of(data_path: Source | str | Path, data: DataConfig) -> str:
    """The row format a source is read in: its own `format`, else data.format."""
    return (data_path.spec.format if isinstance(data_path, Source) else None) or data.format
