"""Preference-pair report for `sftlab check DATA stage=dpo`: usable pairs, rejects, lengths, length bias,
duplicates, contradicting and near-identical pairs.

The file is streamed in batches through the same reader (`read_pairs`) and PairEncoder training uses, so the
report counts exactly what `stage: dpo` would train on. Memory stays small: per measured pair four int32
lengths (for exact percentiles), per distinct pair a 64-bit hash, and per distinct (prompt, two answers) a
hash and one int (the row number of its first occurrence and which answer it preferred). Every bad row is
counted (the reader runs with `skip` semantics here) and written, with the pairs the length policy drops, to
the rejects file; `data.on_bad_row=error` is remembered and turned into a warning instead.

Every input row ends up in exactly one of: rejected (cannot be read, validated, rendered or tokenised, or
states no preference), dropped (valid, but max_seq_len keeps it out) or pairs.
"""

from __future__ import annotations

import copy
import re
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from sftlab.config import DataConfig
from sftlab.data.dataset import BATCH_ROWS
from sftlab.data.encode import IGNORE_INDEX, SPECIAL_IN_CONTENT, Dropped, Encoder
from sftlab.data.preference import EncodedPair, Pair, PairEncoder, pair_row, pair_row_limit, read_pairs
from sftlab.data.quality import REJECTED_SHARE_WARNING, SPECIAL_TOKEN_ROWS, digest, length_spread, print_report
from sftlab.data.rejects import RejectLog
from sftlab.data.sources import Source, path_of
from sftlab.errors import DataError

LENGTH_BIAS_BOUNDS = (0.3, 0.7)
"""Warn when the share of pairs whose chosen answer is the longer one falls outside these bounds."""
EXAMPLES = 3
"""file:line examples named per warning."""
CONFLICT = -1
"""Marks a (prompt, two answers) already seen preferred both ways (stored values are non-negative)."""


@dataclass(frozen=True)
class Spread:
    """Token lengths over the measured pairs. median and p95 are observed lengths (inverted-CDF
    percentiles): at least half / 95% of the pairs are no longer."""
    count: int = 0
    min: int | None = None
    median: int | None = None
    p95: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class PairLengths:
    """Before truncation, over the pairs that train and those dropped by max_seq_len."""
    prompt: Spread = field(default_factory=Spread)
    """Tokens before the answer, shared by both sides."""
    chosen: Spread = field(default_factory=Spread)
    """Scored tokens of the chosen answer: its content and end-of-turn marker."""
    rejected: Spread = field(default_factory=Spread)
    longer_side: Spread = field(default_factory=Spread)
    """Prompt + the longer answer: the longest sequence of the pair."""


@dataclass(frozen=True)
class LengthBias:
    """Scored-token lengths of chosen vs rejected, over the same pairs as PairLengths. DPO readily learns
    "longer is better" when the chosen answer is usually the longer one."""
    chosen_longer: int = 0
    rejected_longer: int = 0
    same_length: int = 0
    chosen_longer_share: float | None = None
    """chosen_longer / (chosen_longer + rejected_longer): pairs of equal length left out; None if none differ."""
    mean_ratio: float | None = None
    """Mean over the pairs of chosen / rejected scored tokens."""


@dataclass
class PairReport:
    data_path: str
    max_seq_len: int | None
    truncation: str
    on_bad_row: str
    rows: int = 0
    """Rows read: rejected + dropped + pairs."""
    pairs: int = 0
    """Pairs that train."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rows that cannot be read, validated, rendered or tokenised, or state no preference, by reason."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Valid pairs the Encoder's length policy keeps out, by reason (too long; no scored token left)."""
    dropped_by_max_seq_len: int = 0
    """Pairs dropped because a side is longer than max_seq_len (truncation=drop), or because truncation
    left no scored token (truncation=truncate: the prompt alone fills max_seq_len)."""
    truncated: int = 0
    """Pairs that train with a side cut to max_seq_len: its answer is scored in part."""
    lengths: PairLengths = field(default_factory=PairLengths)
    length_bias: LengthBias = field(default_factory=LengthBias)
    duplicates: int = 0
    """Rows repeating an earlier pair exactly (prompt, chosen and rejected)."""
    contradicting: int = 0
    """Distinct (prompt, two answers) preferred one way in one row and the other way in another."""
    contradicting_examples: list[str] = field(default_factory=list)
    near_identical: int = 0
    """Pairs whose chosen and rejected answers differ only in whitespace or case."""
    near_identical_examples: list[str] = field(default_factory=list)
    special_token_rows: int = 0
    """Pairs whose message contents hold special-token strings, refused ones included (see QualityReport)."""
    special_tokens_in_content: str = "text"
    """data.special_tokens_in_content: how those strings are encoded (text, error or allow)."""
    rejects_path: str | None = None
    """Where rejected and dropped rows were written; None when there were none."""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when DPO on this data would learn nothing (see `problems`)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def analyze_pairs(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, *,
                  rejects_path: str | Path | None = None) -> PairReport:
    """Read and encode every pair of `data_path` as `stage: dpo` training would, and report on it.

    max_seq_len and truncation are the Encoder's (what it applies; only the answer is ever scored, whatever
    its train_on); role_map and on_bad_row come from `data`. Rejected and dropped rows go to
    `rejects_path` (created only if there are any)."""
    tally = _Tally(PairEncoder(encoder))
    with RejectLog(rejects_path) as log:
        pairs = read_pairs(data_path, role_map=data.role_map, on_bad_row="skip", rejects=log,
                           max_row_bytes=pair_row_limit(encoder))
        batches = iter(lambda: list(islice(pairs, BATCH_ROWS)), [])
        for batch, results in tally.encoder.encode_stream(batches):
            wholes = tally.untruncated(batch, results)
            for pair, result, whole in zip(batch, results, wholes):
                tally.pair(pair)
                if isinstance(result, DataError):
                    log.add(where=result.where, reason=result.reason, message=result.detail, row=pair_row(pair))
                    tally.refused(result, whole)
                else:
                    tally.usable(result, whole)
        read_rejects = log.total - tally.refused_rows
        counts = dict(log.counts)
        written = log.path if log.total else None
    report = tally.report(path_of(data_path), data, counts,
                          read_rejects)
    report.rejects_path = str(written) if written is not None else None
    report.problems, report.warnings = _problems(report), _warnings(report)
    return report


class _Tally:
    """Running counts over the stream; see the module docstring for what grows with the file."""

    def __init__(self, encoder: PairEncoder) -> None:
        self.encoder = encoder
        self._unlimited: PairEncoder | None = None
        self.lengths = {name: array("i") for name in ("prompt", "chosen", "rejected", "longer_side")}
        self.ratio_sum = 0.0
        self.seen: set[int] = set()
        self.preferred: dict[int, int] = {}  # (prompt, answers) hash -> row number << 1 | chosen is first, or CONFLICT
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {"contradicting": [], "near_identical": []}
        self.refused_rows = 0

    def untruncated(self, batch: list[Pair], results: list[EncodedPair | DataError]) -> list[EncodedPair | None]:
        """The encoding without max_seq_len of each pair the Encoder truncated or dropped (None for the
        others, and for a pair that fails without a limit too): its true lengths."""
        long = [i for i, r in enumerate(results)
                if isinstance(r, Dropped) or (isinstance(r, EncodedPair) and r.truncated)]
        full: list[EncodedPair | None] = [None] * len(results)
        if not long:
            return full
        if self._unlimited is None:
            self._unlimited = copy.copy(self.encoder)  # shares the tokenizer
            self._unlimited.max_seq_len = None
        for i, result in zip(long, self._unlimited.encode_batch([batch[i] for i in long])):
            full[i] = result if isinstance(result, EncodedPair) else None
        return full

    def pair(self, pair: Pair) -> None:
        """Duplicates, contradictions and near-identical answers, over every pair that reads."""
        prompt = [(m.role, m.content) for m in pair.prompt]
        chosen, rejected = digest((prompt, pair.chosen.content)), digest((prompt, pair.rejected.content))
        whole = digest((chosen, rejected))
        if whole in self.seen:
            self.counts["duplicates"] += 1
        self.seen.add(whole)
        key = digest((min(chosen, rejected), max(chosen, rejected)))
        line = _row_number(pair.where)
        previous = self.preferred.setdefault(key, line << 1 | (chosen < rejected))
        if previous != CONFLICT and (previous & 1) != (chosen < rejected):
            self.preferred[key] = CONFLICT
            self.counts["contradicting"] += 1
            self._example("contradicting", f"{_with_row_number(pair.where, previous >> 1)} vs {pair.where}")
        if _normalized(pair.chosen.content) == _normalized(pair.rejected.content):
            self.counts["near_identical"] += 1
            self._example("near_identical", pair.where)

    def refused(self, error: DataError, whole: EncodedPair | None) -> None:
        self.refused_rows += 1
        self.counts["special_token_rows"] += error.reason == SPECIAL_IN_CONTENT
        if isinstance(error, Dropped):
            self.dropped[error.reason] += 1
        if whole is not None:  # dropped by max_seq_len: its lengths still describe the data
            self.counts["dropped_by_max_seq_len"] += 1
            self._measure(whole)

    def usable(self, encoded: EncodedPair, whole: EncodedPair | None) -> None:
        self.counts["pairs"] += 1
        self.counts["truncated"] += encoded.truncated
        self.counts["special_token_rows"] += encoded.special_tokens_in_content > 0
        self._measure(whole if whole is not None else encoded)

    def _measure(self, encoded: EncodedPair) -> None:
        chosen, rejected = _scored(encoded.chosen.labels), _scored(encoded.rejected.labels)
        longer = max(len(encoded.chosen.input_ids), len(encoded.rejected.input_ids))
        for name, value in (("prompt", encoded.prompt_tokens), ("chosen", chosen), ("rejected", rejected),
                            ("longer_side", longer)):
            self.lengths[name].append(value)
        self.ratio_sum += chosen / max(rejected, 1)

    def _example(self, kind: str, text: str) -> None:
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(text)

    def report(self, data_path: str, data: DataConfig, rejects: dict[str, int], read_rejects: int) -> PairReport:
        c = self.counts
        encoded_rows = c["pairs"] + self.refused_rows
        return PairReport(
            data_path=data_path, max_seq_len=self.encoder.max_seq_len,
            truncation=self.encoder.truncation, on_bad_row=data.on_bad_row,
            rows=encoded_rows + read_rejects, pairs=c["pairs"], rejected=dict(Counter(rejects) - self.dropped),
            dropped=dict(self.dropped), dropped_by_max_seq_len=c["dropped_by_max_seq_len"], truncated=c["truncated"],
            lengths=PairLengths(**{name: _spread(values) for name, values in self.lengths.items()}),
            length_bias=self._bias(), duplicates=c["duplicates"], contradicting=c["contradicting"],
            contradicting_examples=self.examples["contradicting"], near_identical=c["near_identical"],
            near_identical_examples=self.examples["near_identical"], special_token_rows=c["special_token_rows"],
            special_tokens_in_content=self.encoder.encoder.special_tokens_in_content)

    def _bias(self) -> LengthBias:
        chosen = np.frombuffer(self.lengths["chosen"], dtype=np.int32)
        rejected = np.frombuffer(self.lengths["rejected"], dtype=np.int32)
        if not len(chosen):
            return LengthBias()
        longer, shorter = int((chosen > rejected).sum()), int((chosen < rejected).sum())
        share = longer / (longer + shorter) if longer + shorter else None
        return LengthBias(longer, shorter, len(chosen) - longer - shorter, share, self.ratio_sum / len(chosen))


def _scored(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE_INDEX)


def _spread(values: array) -> Spread:
    lengths = np.frombuffer(values, dtype=np.int32)
    if not len(lengths):
        return Spread()
    return Spread(*length_spread(lengths))


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def _row_number(where: str) -> int:
    """The number a reader's `where` ends with ("file:12", "file:row 12"); 0 if none. Remembering this
    instead of the string keeps a pair's memory to ints."""
    number = re.search(r"\d+$", where)
    return int(number.group()) if number else 0


def _with_row_number(where: str, number: int) -> str:
    """`where` of another row of the same file (every row's `where` differs only in its number)."""
    return re.sub(r"\d+$", str(number), where)


def _problems(r: PairReport) -> list[str]:
    """Why DPO on this data would learn nothing; empty when it would."""
    if r.pairs:
        return []
    lost = ", ".join(f"{n} {reason}" for reason, n in sorted({**r.rejected, **r.dropped}.items()))
    problem = (f"no row became a usable pair ({r.rows} rows read{': ' + lost if lost else ''}); training would "
               "learn nothing. Fix the rejected rows (see the rejects file) or raise data.max_seq_len.")
    return [problem]


def _warnings(r: PairReport) -> list[str]:
    out = []
    rejected = sum(r.rejected.values())
    where = f" (see {r.rejects_path})" if r.rejects_path else ""
    if rejected and rejected > REJECTED_SHARE_WARNING * r.rows:
        out.append(f"{rejected} of the {r.rows} rows ({rejected / r.rows:.0%}) are rejected{where}.")
    if rejected and r.on_bad_row == "error":
        out.append(f"data.on_bad_row=error: training would stop at the first rejected row{where}; "
                   "fix the rows or set data.on_bad_row=skip.")
    if r.dropped_by_max_seq_len:
        out.append(f"pairs dropped by data.max_seq_len={r.max_seq_len} (data.truncation={r.truncation}): "
                   f"{r.dropped_by_max_seq_len}. Raise max_seq_len to keep them.")
    if r.special_token_rows:
        out.append(f"pairs whose message contents hold special-token strings "
                   f"{SPECIAL_TOKEN_ROWS[r.special_tokens_in_content]}: {r.special_token_rows}.")
    if r.truncated:
        out.append(f"pairs truncated to data.max_seq_len={r.max_seq_len}: {r.truncated}; a cut answer is "
                   "compared by its first tokens only.")
    out += _bias_warnings(r.length_bias)
    if r.duplicates:
        out.append(f"rows repeating an earlier pair exactly (deduplicate them): {r.duplicates}.")
    if r.contradicting:
        out.append(f"prompts whose two answers are preferred one way in one row and the other way in another: "
                   f"{r.contradicting} (e.g. {', '.join(r.contradicting_examples)}); such pairs cancel out.")
    if r.near_identical:
        out.append(f"pairs whose answers differ only in whitespace or case: {r.near_identical} (e.g. "
                   f"{', '.join(r.near_identical_examples)}); the preference they state is about formatting.")
    return out


def _bias_warnings(bias: LengthBias) -> list[str]:
    share, (low, high) = bias.chosen_longer_share, LENGTH_BIAS_BOUNDS
    if share is None or low <= share <= high:
        return []
    longer, side = (bias.chosen_longer, "chosen") if share > high else (bias.rejected_longer, "rejected")
    differ = bias.chosen_longer + bias.rejected_longer
    lesson = "longer" if side == "chosen" else "shorter"
    warning = (f"length bias: the {side} answer is the longer one in {longer} of the {differ} pairs whose answers "
               f"differ in length ({longer / differ:.0%}; mean chosen/rejected scored tokens {bias.mean_ratio:.2f}). "
               f"DPO learns \"{lesson} is better\" from such data; balance the lengths, or compare answers of "
               "similar length.")
    return [warning]


def write(report: PairReport, fmt: str = "text", console: Any = None) -> None:
    """Print the report: `text` as rich tables, `json` as one JSON object (to `console.file` or stdout)."""
    print_report(report, lambda: (_summary_table(report), _lengths_table(report), _bias_table(report)), fmt=fmt,
                 console=console, trains=f"{report.pairs} pairs train")


def _summary_table(r: PairReport) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"sftlab check (preference pairs): {r.data_path}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    rows: list[tuple[str, object]] = [("rows read", r.rows), ("usable pairs", r.pairs)]
    rows += [(f"rejected: {reason}", n) for reason, n in sorted(r.rejected.items())]
    if sum(r.dropped.values()) != r.dropped_by_max_seq_len:  # some drops have another cause: show each reason
        rows += [(f"dropped: {reason}", n) for reason, n in sorted(r.dropped.items())]
    rows += [(f"dropped by max_seq_len={r.max_seq_len} ({r.truncation})", r.dropped_by_max_seq_len),
             ("truncated", r.truncated), ("duplicate pairs", r.duplicates),
             ("contradicting preferences", r.contradicting),
             ("answers differing only in whitespace/case", r.near_identical),
             (f"pairs with special-token text in contents ({r.special_tokens_in_content})", r.special_token_rows)]
    if r.rejects_path:
        rows.append(("rejected and dropped rows in", r.rejects_path))
    for name, value in rows:
        table.add_row(Text(name), Text(str(value)))
    return table


def _lengths_table(r: PairReport) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="tokens per pair, before truncation")
    for name in ("", "pairs", "min", "median", "p95", "max"):
        table.add_column(name, justify="left" if not name else "right")
    for name, spread in (("prompt", r.lengths.prompt), ("chosen (scored)", r.lengths.chosen),
                         ("rejected (scored)", r.lengths.rejected), ("prompt + longer answer", r.lengths.longer_side)):
        table.add_row(Text(name), *(str(v) for v in (spread.count, spread.min, spread.median, spread.p95, spread.max)))
    return table


def _bias_table(r: PairReport) -> Any:
    from rich.table import Table
    from rich.text import Text

    b = r.length_bias
    table = Table(title="length bias (scored tokens)", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    share = "-" if b.chosen_longer_share is None else f"{b.chosen_longer_share:.0%}"
    ratio = "-" if b.mean_ratio is None else f"{b.mean_ratio:.2f}"
    for name, value in (("chosen longer", b.chosen_longer), ("rejected longer", b.rejected_longer),
                        ("same length", b.same_length), ("chosen longer, of pairs that differ", share),
                        ("mean chosen/rejected ratio", ratio)):
        table.add_row(Text(name), Text(str(value)))
    return table
