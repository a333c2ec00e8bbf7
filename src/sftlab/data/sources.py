"""Data sources: where rows live — files, globs, dataset directories, the Hugging Face Hub — as one stream of Rows.

A source (config.SourceConfig; a plain string is its `path`) resolves to one of:
- files sftlab reads itself: .jsonl (streamed line by line), .json arrays, .parquet (batch by batch);
- files `datasets` reads, streamed: .arrow (`save_to_disk` shards too) and .csv;
- a directory `datasets.load_dataset` reads (data files, or a README with a `configs:` section), streamed;
- a Hub dataset id (`org/name`, `hf://datasets/org/name`): found in the Hugging Face cache first (so an
  offline machine uses what `huggingface-cli download` fetched), else downloaded; then read as a directory.

Every row keeps its provenance (`file:line` for sftlab's readers, `label[index]` for `datasets` sources),
the source's `columns` are mapped before the format is detected, and its `system_prompt` is added to
conversations that have none. Nothing is held in memory beyond the reader's batch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sftlab.config import DataConfig, SourceConfig, sources_of
from sftlab.data.formats import FieldTally, Row, _too_large, conversations_from_rows, iter_rows
from sftlab.data.rejects import RejectLog
from sftlab.data.schema import Conversation, Message
from sftlab.errors import DataError, shown

OWN_SUFFIXES = (".jsonl", ".json", ".parquet")
"""Files sftlab's own readers stream (faster than a `datasets` round trip, with file:line provenance)."""
DATASETS_BUILDERS = {".arrow": "arrow", ".csv": "csv"}
"""Files read by `datasets`' packaged builders, streamed."""
HUB_PREFIX = "hf://datasets/"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """A resolved source: what to read, and how to name it in errors and tables."""
    spec: SourceConfig
    label: str
    """A short name for tables, metrics (eval_loss/<label>) and row provenance."""
    files: tuple[Path, ...] = ()
    """Data files, read by sftlab (builder None) or by the `datasets` builder."""
    builder: str | None = None
    directory: Path | None = None
    """A directory for `datasets.load_dataset` (a dataset repo laid out as on the Hub)."""
    hub: str | None = None
    """`repo@commit` of a Hub dataset."""

    def fingerprint(self) -> str:
        """A digest of what the rows are: each file's bytes, or the Hub commit; plus config name and split."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(json.dumps([self.spec.name, self.spec.split]).encode())
        if self.hub is not None:
            digest.update(f"hub:{self.hub}".encode())
            return digest.hexdigest()
        from sftlab.data.cache import file_digest

        root = self.directory
        for path in self.data_files():
            digest.update(str(path.relative_to(root) if root else path.name).encode())
            digest.update(file_digest(path).encode())
        return digest.hexdigest()

    def data_files(self) -> list[Path]:
        """The local files the rows come from: the source's files, or a directory's files outside hidden
        folders (.git, .cache); none for a Hub dataset."""
        root = self.directory
        if root is None:
            return list(self.files)
        return sorted(p for p in root.rglob("*") if p.is_file() and
                      not any(part.startswith(".") for part in p.relative_to(root).parts))

    def data_bytes(self) -> int | None:
        """The size of data_files() (None for a Hub dataset: not known before it is read)."""
        if self.hub is not None:
            return None
        return sum(p.stat().st_size for p in self.data_files() if p.is_file())


def resolve_all(value: Any) -> list[Source]:
    """data.train / data.eval resolved, each source with a label unique among them."""
    resolved = [resolve(spec) for spec in sources_of(value)]
    seen: dict[str, int] = {}
    out = []
    for source in resolved:
        seen[source.label] = seen.get(source.label, 0) + 1
        out.append(source if seen[source.label] == 1 else replace(source, label=f"{source.label}#{seen[source.label]}"))
    return out


def resolve(spec: SourceConfig | str | Path) -> Source:
    """Find what a source's path names; a missing local path and an unreachable Hub id fail with the fix."""
    if not isinstance(spec, SourceConfig):
        spec = SourceConfig(path=str(spec))
    text = spec.path
    if text.startswith(HUB_PREFIX):
        return _hub(spec, text[len(HUB_PREFIX):])
    if spec.revision is not None and not _looks_like_hub(text):
        raise DataError(f"data source {text}: `revision` pins a Hub dataset's version; this is a local path. "
                        "Remove revision.", reason="revision on a local source")
    path = Path(text).expanduser()
    if not path.exists() and _GLOB_CHARS.search(text):  # a real path with [brackets] in it is that path
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"{text} does not exist, and as a pattern it matches no file (relative paths start "
                            f"from {Path.cwd()}); fix the path or the pattern.", reason="missing file")
        return _files(spec, matches, label=text)
    if path.is_file():
        return _files(spec, [path], label=path.name)
    if path.is_dir():
        return _directory(spec, path)
    if path.exists():
        raise DataError(f"data source {text} is neither a file nor a directory; expected a data file, a glob, a "
                        "dataset directory or a Hub dataset id.", reason="unreadable file")
    if _looks_like_hub(text):
        return _hub(spec, text)
    raise DataError(f"{text} does not exist (relative paths start from {Path.cwd()}); give an existing data file, "
                    "glob or dataset directory, or a hub dataset id (org/name).", reason="missing file")


def _looks_like_hub(text: str) -> bool:
    """`org/name` with no data-file suffix and not written as a local path (./x, /x, ~/x)."""
    return (bool(_HUB_ID.match(text)) and Path(text).suffix.lower() not in (*OWN_SUFFIXES, *DATASETS_BUILDERS)
            and not text.startswith((".", "/", "~")))


def _files(spec: SourceConfig, files: list[Path], *, label: str) -> Source:
    suffixes = sorted({p.suffix.lower() for p in files})
    known = (*OWN_SUFFIXES, *DATASETS_BUILDERS)
    unknown = [s for s in suffixes if s not in known]
    if unknown:
        first = next(p for p in files if p.suffix.lower() == unknown[0])
        raise DataError(f"{first}: unsupported file type {unknown[0] or '(none)'!r}; expected {', '.join(known)} "
                        "(or a dataset directory).", reason="unsupported file")
    if len(suffixes) > 1:
        raise DataError(f"data source {spec.path} holds files of several types ({', '.join(suffixes)}); a source "
                        "is one kind of file. List them as separate sources.", reason="mixed file types")
    _no_dataset_options(spec, "a data file")
    return Source(spec, label, files=tuple(files), builder=DATASETS_BUILDERS.get(suffixes[0]))


def _no_dataset_options(spec: SourceConfig, what: str) -> None:
    for key in ("name", "split"):
        if getattr(spec, key) is not None:
            raise DataError(f"data source {spec.path}: `{key}` chooses a dataset's config or split, but this is "
                            f"{what}. Remove {key}.", reason=f"{key} on a file")


def _directory(spec: SourceConfig, path: Path) -> Source:
    """A `save_to_disk` dir (its arrow shards), or a dataset repo dir read by `datasets.load_dataset`."""
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: one sub-dir per split
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        split = _choose_split(spec, splits)
        return _saved(spec, path / split, label=f"{path.name}:{split}")
    if (path / "state.json").is_file():
        if spec.split is not None:
            raise DataError(f"data source {spec.path}: `split` chooses a split, but this save_to_disk dir holds one "
                            "dataset. Remove split.", reason="split on a file")
        return _saved(spec, path, label=path.name)
    return Source(spec, path.name or str(path), directory=path)


def _saved(spec: SourceConfig, path: Path, *, label: str) -> Source:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [path / item["filename"] for item in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read {path / 'state.json'} ({exc}); expected a directory written by "
                        "datasets' save_to_disk. Save it again.", reason="invalid dataset dir") from None
    return Source(replace(spec, split=None), label, files=tuple(files), builder="arrow")


def _choose_split(spec: SourceConfig, splits: list[str]) -> str:
    if spec.split is not None:
        if spec.split not in splits:
            raise DataError(f"data source {spec.path} has no split {spec.split!r}; it has {', '.join(splits)}. Set "
                            "split to one of them.", reason="missing split")
        return spec.split
    if "train" in splits or len(splits) != 1:
        if "train" not in splits:
            raise DataError(f"data source {spec.path} has splits {', '.join(splits)} and none is `train`; set split "
                            "to the one to read.", reason="missing split")
        return "train"
    return splits[0]


def _hub(spec: SourceConfig, repo: str) -> Source:
    """A Hub dataset: its snapshot in the local cache if there is one, else downloaded (never a silent hang)."""
    from sftlab.data import hub

    snapshot = hub.snapshot(repo, revision=spec.revision)
    label = repo if spec.name is None else f"{repo}:{spec.name}"
    return Source(spec, label, directory=snapshot, hub=f"{repo}@{snapshot.name}")


def rows(source: Source, *, max_row_bytes: int | None = None) -> Iterator[Row]:
    """The source's rows in order, its `columns` mapped; a row of more than `max_row_bytes` bytes is an error row."""
    raw = _dataset_rows(source, max_row_bytes) if source.builder or source.directory else \
        _own_rows(source, max_row_bytes)
    columns = source.spec.columns
    for row in raw:
        yield _mapped(row, columns, source.label) if columns and row.error is None else row


def _own_rows(source: Source, max_row_bytes: int | None) -> Iterator[Row]:
    for path in source.files:
        yield from iter_rows(path, max_row_bytes=max_row_bytes)


def _dataset_rows(source: Source, max_row_bytes: int | None) -> Iterator[Row]:
    """Rows streamed by `datasets` (nothing materialised: the reader holds one batch). Arrow has already read a
    row too large for the limit, but it is rejected as a JSONL row of that size would be."""
    dataset = _load(source)
    index = -1
    try:
        for index, value in enumerate(dataset):
            where, text = f"{source.label}[{index}]", json.dumps(value, ensure_ascii=False, default=str)
            size = len(text) if max_row_bytes is None or len(text) <= max_row_bytes else len(text.encode("utf-8"))
            if max_row_bytes is not None and size > max_row_bytes:
                yield _too_large(where, size, max_row_bytes)
                continue
            yield Row(where, text, value)
    except DataError:
        raise
    except Exception as exc:  # pyarrow / datasets errors on a corrupt shard
        raise DataError(f"cannot read row {index + 1} of the dataset: {type(exc).__name__}: {str(exc).strip()[:300]}; "
                        "expected the files as datasets writes them. Re-create them, or convert to .jsonl.",
                        where=source.label, reason="invalid dataset") from None


def _load(source: Source) -> Any:
    import datasets

    spec = source.spec
    try:
        if source.directory is not None:
            loaded = datasets.load_dataset(str(source.directory), name=spec.name, streaming=True)
        else:
            loaded = datasets.load_dataset(source.builder, data_files=[str(p) for p in source.files], streaming=True)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"datasets cannot read this source: {type(exc).__name__}: {str(exc).strip()[:400]}. Check "
                        "its name (config), the files, or convert it to .jsonl.", where=source.label,
                        reason="invalid dataset") from None
    if isinstance(loaded, Mapping):  # an IterableDatasetDict: one entry per split
        loaded = loaded[_choose_split(spec, list(loaded))]
    return loaded


def _mapped(row: Row, columns: Mapping[str, str], label: str) -> Row:
    """The row with each mapped column under sftlab's name (the original names removed, so they cannot
    confuse format detection)."""
    value = row.value
    if not isinstance(value, Mapping):
        return row  # the format converter names the problem
    for ours, theirs in columns.items():
        if theirs not in value:
            return replace(row, error=DataError(
                f"column {theirs!r} (columns: {{{ours}: {theirs}}} of source {label}) is not in the row; its columns "
                f"are {shown(sorted(value))}. Fix the source's columns mapping.", where=row.where,
                reason="missing column"))
    mapped = {k: v for k, v in value.items() if k not in columns.values()}
    mapped.update({ours: value[theirs] for ours, theirs in columns.items()})
    return replace(row, value=mapped)


def read(data_path: Source | str | Path, data: DataConfig, *, on_bad_row: str, rejects: RejectLog | None = None,
         max_row_bytes: int | None = None, fields: FieldTally | None = None) -> Iterator[Conversation]:
    """A source's valid conversations (its format, role_map and system_prompt over data's); `fields` counts
    the fields of every row read, in the same pass."""
    source = data_path if isinstance(data_path, Source) else resolve(data_path)
    spec = source.spec
    raw = rows(source, max_row_bytes=max_row_bytes)
    conversations = conversations_from_rows(raw if fields is None else fields.tallied(raw),
                                            format=spec.format or data.format,
                                            role_map={**data.role_map, **spec.role_map}, on_bad_row=on_bad_row,
                                            rejects=rejects)
    if spec.system_prompt is None:
        return conversations
    return (with_system(c, spec.system_prompt) for c in conversations)


def with_system(conversation: Conversation, prompt: str) -> Conversation:
    """The conversation with `prompt` as its first message, unless it has a system message of its own."""
    if conversation.messages and conversation.messages[0].role == "system":
        return conversation
    return replace(conversation, messages=(Message("system", prompt), *conversation.messages))


def source_rows(data_path: Source | str | Path, *, max_row_bytes: int | None = None) -> Iterable[Row]:
    """Rows of a source or a path (preference pairs read these)."""
    return rows(data_path if isinstance(data_path, Source) else resolve(data_path), max_row_bytes=max_row_bytes)


def source_settings(source: Source, encoder: Any) -> dict[str, Any]:
    """What of a source's own settings its encoding depends on (weight and max_samples choose examples later)."""
    spec = source.spec
    return {"name": spec.name, "split": spec.split, "format": spec.format, "columns": spec.columns,
            "role_map": spec.role_map, "system_prompt": spec.system_prompt, "train_on": encoder.train_on,
            "label": source.label}


def encoder_for(source: Source, encoder: Any) -> Any:
    """`encoder`, or a shallow copy training this source's own `train_on`."""
    import copy

    if source.spec.train_on is None or source.spec.train_on == encoder.train_on:
        return encoder
    own = copy.copy(encoder)
    own.train_on = source.spec.train_on
    return own


def describe(value: Any) -> str | list[str]:
    """data.train / data.eval as plain text for messages and report.json: the path, or the list of paths."""
    specs = sources_of(value)
    return specs[0].path if len(specs) == 1 else [spec.path for spec in specs]


def path_of(data_path: Source | SourceConfig | str | Path) -> str:
    """The path a source was given as (for reports)."""
    if isinstance(data_path, Source):
        return data_path.spec.path
    return data_path.path if isinstance(data_path, SourceConfig) else str(data_path)
