"""Dataset report for `sftlab check`: trained share per role, empty/dup/too-long rows, truncation.

The file is streamed in batches of BATCH_ROWS through the same reader and Encoder training uses, so the
report counts exactly what training would see. Memory stays small: per row only a 4-byte token length
(for exact length percentiles) and, per distinct conversation / prompt, a 64-bit hash. Every bad row is
counted (the reader always runs with `skip` semantics here) and written, with the rows policy drops, to
the rejects file; `data.on_bad_row=error` is remembered and turned into a warning instead.

Every input row ends up in exactly one of: rejected (cannot be read, validated, rendered or tokenised),
dropped (valid, but the Encoder's policy keeps it out: too long, nothing trained) or examples.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby, islice
from pathlib import Path
from typing import Any

import numpy as np

from sftlab.config import DataConfig
from sftlab.data.encode import NOTHING_TRAINED, ROLE_CODES, SPECIAL_IN_CONTENT, TOO_LONG, Dropped, Encoded, Encoder
from sftlab.data.formats import field_report, tool_names
from sftlab.data.reasoning import prepare
from sftlab.data.rejects import RejectLog, conversation_row
from sftlab.data.schema import ROLES, Conversation
from sftlab.data.sources import Source, encoder_for, path_of, read, resolve, source_rows
from sftlab.data.templates import Segment
from sftlab.errors import DataError

BATCH_ROWS = 512
QUALITY_MAX_ROWS = 20_000
"""The dataset writer tallies this report for data of up to this many rows, so a run's report shows it without
reading the data again; past it (a second's worth of tallying per 20k rows) a run's report leaves it out."""
QUALITY_FILE = "quality.json"
"""In a dataset directory: {"report": QualityReport.to_dict(), "text": the report as `sftlab check` prints it}."""
REJECTED_SHARE_WARNING = 0.10
"""Warn when more than this share of the rows is rejected."""

"""The `reason` of the Encoder's two policy drops (encode.Dropped)."""
CONFLICT = -1
"""Marks a prompt already seen with two different answers (hashes are non-negative)."""
ROLE_NAMES = {code: role or "template" for role, code in ROLE_CODES.items()}
"""Per-token role code -> name in the report; code 0 is text the template inserts itself."""


@dataclass(frozen=True)
class Lengths:
    """Token lengths before truncation, of the examples and the rows dropped as too long. median and p95
    are observed lengths (inverted-CDF percentiles): at least half / 95% of those rows are no longer."""
    count: int = 0
    min: int | None = None
    median: int | None = None
    p95: int | None = None
    max: int | None = None
    over_max_seq_len: int = 0


@dataclass(frozen=True)
class RoleTokens:
    tokens: int = 0
    """Tokens of the examples (as trained, after truncation) whose text belongs to this role."""
    trained_tokens: int = 0

    @property
    def share(self) -> float | None:
        """trained_tokens / tokens; None when the role has no tokens."""
        return self.trained_tokens / self.tokens if self.tokens else None


@dataclass
class QualityReport:
    data_path: str
    max_seq_len: int | None
    truncation: str
    on_bad_row: str
    rows: int = 0
    """Rows read: rejected + dropped + examples."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rows that cannot be read, validated, rendered or tokenised, by reason."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Valid rows the Encoder's policy keeps out (too long, no trained tokens), by reason."""
    examples: int = 0
    conversations: int = 0
    """Rows that passed validation (examples + dropped + rejected while rendering or tokenising)."""
    turns: dict[str, int | None] = field(default_factory=dict)
    """User and assistant messages per conversation: min / median / max."""
    messages: dict[str, int] = field(default_factory=dict)
    """Messages by role, over the valid conversations."""
    lengths: Lengths = field(default_factory=Lengths)
    roles: dict[str, RoleTokens] = field(default_factory=dict)
    trained_tokens: int = 0
    no_trained_tokens: int = 0
    truncated: int = 0
    truncated_inside_trained_turn: int = 0
    """Truncated examples whose cut falls inside a trained turn: its end-of-turn token is lost."""
    dropped_too_long: int = 0
    duplicates: int = 0
    """Valid rows whose messages (roles and contents) repeat an earlier row exactly."""
    conflicting_prompts: int = 0
    """Distinct prompts (everything before the last assistant message) seen with different answers."""
    blank_messages: int = 0
    """Whitespace-only messages in valid rows (empty ones are rejected as 'empty content')."""
    turns_missing_end_of_turn: int = 0
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every field the rows hold: {"rows": how many rows have it, "used": whether the reader reads it}."""
    unknown_tool_calls: int = 0
    """Tool calls naming a function absent from their row's `tools`."""
    reasoning_not_rendered: int = 0
    """Assistant messages with reasoning that the template does not render (e.g. before the last user
    turn in Qwen3's); data.reasoning_turns=split trains them."""
    special_token_rows: int = 0
    """Rows whose message contents hold special-token strings (`<|im_end|>` typed in a message), refused
    ones (data.special_tokens_in_content=error) included."""
    special_tokens_in_content: str = "text"
    """data.special_tokens_in_content: how those strings are encoded (text, error or allow)."""
    rejects_path: str | None = None
    """Where rejected and dropped rows were written; None when there were none."""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when training on this data would learn nothing useful (see `problems`)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["roles"] = {name: {**asdict(counts), "share": counts.share} for name, counts in self.roles.items()}
        out["ok"] = self.ok
        return out


def analyze(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, *,
            rejects_path: str | Path | None = None) -> QualityReport:
    """Read and encode every row of `data_path` as training would, and report on it.

    max_seq_len and truncation are the Encoder's (what it applies); format, role_map and on_bad_row come
    from `data`. Rejected and dropped rows go to `rejects_path` (created only if there are any)."""
    source = data_path if isinstance(data_path, Source) else resolve(data_path)
    encoder = encoder_for(source, encoder)
    tally = _Tally(encoder)
    with RejectLog(rejects_path) as log:
        conversations = read(source, data, on_bad_row="skip", rejects=log, max_row_bytes=encoder.row_limit)
        while batch := list(islice(conversations, BATCH_ROWS)):
            for conversation in batch:
                tally.conversation(conversation)
            pieces = list(prepare(batch, encoder.template, reasoning=data.reasoning,
                                  reasoning_turns=data.reasoning_turns))  # examples as training makes them
            results = encoder.encode_batch(pieces)
            full = tally.untruncated(pieces, results)
            for conversation, result, whole in zip(pieces, results, full):
                if isinstance(result, DataError):
                    log.add(where=result.where, reason=result.reason, message=result.detail,
                            row=conversation_row(conversation))
                    tally.refused(result, whole)
                else:
                    tally.example(result, whole)
                    tally.counts["reasoning_not_rendered"] += reasoning_not_rendered(
                        encoder.template.with_inline_reasoning(conversation), result.segments)
        read_rejects = log.total - tally.refused_rows
        counts = dict(log.counts)
        written = log.path if log.total else None
    report = tally.report(path_of(data_path), data, counts, read_rejects)
    fmt = (data_path.spec.format if isinstance(data_path, Source) else None) or data.format
    report.fields = field_report(source_rows(data_path, max_row_bytes=encoder.row_limit), fmt)
    report.rejects_path = str(written) if written is not None else None
    report.problems, report.warnings = _problems(report), _warnings(report)
    return report


class WriterQuality:
    """The report `analyze` gives, tallied from the dataset writer's own encoding pass (the rows it reads, the
    results it writes), for at most QUALITY_MAX_ROWS conversations; saved to the dataset directory."""

    def __init__(self, source: Source, data: DataConfig, encoder: Encoder) -> None:
        self.source, self.data, self.tally = source, data, _Tally(encoder)
        self.active = True

    def conversations(self, conversations: Iterable[Conversation]) -> Iterator[Conversation]:
        """The conversations unchanged, each tallied as it passes (before data.reasoning_turns splits it)."""
        for conversation in conversations:
            if self.active:
                self.tally.conversation(conversation)
                self.active = self.tally.counts["conversations"] <= QUALITY_MAX_ROWS
            yield conversation

    def batch(self, pieces: Sequence[Conversation], results: Sequence[Encoded | DataError]) -> None:
        if not self.active:
            return
        template = self.tally.encoder.template
        for conversation, result, whole in zip(pieces, results, self.tally.untruncated(pieces, results)):
            if isinstance(result, DataError):
                self.tally.refused(result, whole)
            else:
                self.tally.example(result, whole)
                self.tally.counts["reasoning_not_rendered"] += reasoning_not_rendered(
                    template.with_inline_reasoning(conversation), result.segments)

    def save(self, directory: Path, rejected: dict[str, int], fields: dict[str, dict[str, Any]]) -> None:
        """Write QUALITY_FILE (nothing when the data had more rows than the tally takes)."""
        if not self.active:
            return
        from rich.console import Console

        read_rejects = sum(rejected.values()) - self.tally.refused_rows
        report = self.tally.report(path_of(self.source), self.data, rejected, read_rejects)
        report.fields = fields
        report.problems, report.warnings = _problems(report), _warnings(report)
        text = io.StringIO()
        write(report, console=Console(file=text, width=100, color_system=None, highlight=False))
        (directory / QUALITY_FILE).write_text(json.dumps({"report": report.to_dict(), "text": text.getvalue()},
                                                         ensure_ascii=False), encoding="utf-8")


class _Tally:
    """Running counts over the stream. What grows with the file: one int32 length per tokenised row and
    a 64-bit hash per distinct conversation and per distinct prompt."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._unlimited: Encoder | None = None
        self.lengths = array("i")
        self.turns: Counter[int] = Counter()
        self.messages: Counter[str] = Counter()
        self.role_tokens = np.zeros(len(ROLE_NAMES), dtype=np.int64)
        self.role_trained = np.zeros(len(ROLE_NAMES), dtype=np.int64)
        self.seen: set[int] = set()
        self.answers: dict[int, int] = {}  # prompt hash -> answer hash, or CONFLICT once it has two
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.refused_rows = 0

    def untruncated(self, batch: Sequence[Conversation],
                    results: Sequence[Encoded | DataError]) -> list[Encoded | None]:
        """The encoding without max_seq_len of each row the Encoder truncated or dropped as too long
        (None for the others): their true length, and where the cut falls."""
        long = [i for i, r in enumerate(results) if (isinstance(r, Encoded) and r.truncated)
                or (isinstance(r, Dropped) and r.reason == TOO_LONG)]
        full: list[Encoded | None] = [None] * len(results)
        if not long:
            return full
        if self._unlimited is None:
            e = self.encoder
            self._unlimited = Encoder(e.tokenizer, e.template, train_on=e.train_on, max_seq_len=None,
                                      max_row_bytes=e.row_limit,
                                      special_tokens_in_content=e.special_tokens_in_content)
        for i, result in zip(long, self._unlimited.encode_batch([batch[i] for i in long])):
            full[i] = result if isinstance(result, Encoded) else None
        return full

    def conversation(self, conversation: Conversation) -> None:
        messages = conversation.messages
        self.counts["conversations"] += 1
        if conversation.tools is not None:
            names = tool_names(conversation.tools)
            self.counts["unknown_tool_calls"] += sum(call.name not in names for m in messages for call in m.tool_calls)
        self.messages.update(m.role for m in messages)
        self.turns[sum(m.role != "system" for m in messages)] += 1
        self.counts["blank"] += sum(not m.content.strip() for m in messages)
        whole = digest([(m.role, m.content) for m in messages])
        if whole in self.seen:
            self.counts["duplicates"] += 1
        self.seen.add(whole)
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")  # validated: one exists
        prompt = digest([(m.role, m.content) for m in messages[:last]])
        answer = digest([("assistant", messages[last].content)])
        previous = self.answers.setdefault(prompt, answer)
        if previous not in (answer, CONFLICT):
            self.answers[prompt] = CONFLICT
            self.counts["conflicting"] += 1

    def refused(self, error: DataError, whole: Encoded | None) -> None:
        self.refused_rows += 1
        self.counts["special_token_rows"] += error.reason == SPECIAL_IN_CONTENT
        if isinstance(error, Dropped):
            self.dropped[error.reason] += 1
        if whole is not None:  # dropped as too long: its length still describes the data
            self.lengths.append(len(whole.trained))

    def example(self, encoded: Encoded, whole: Encoded | None) -> None:
        roles, trained = encoded.role_codes, encoded.trained
        self.role_tokens += np.bincount(roles, minlength=len(ROLE_NAMES))
        self.role_trained += np.bincount(roles[trained], minlength=len(ROLE_NAMES))
        self.counts["examples"] += 1
        self.counts["special_token_rows"] += encoded.special_tokens_in_content > 0
        self.counts["turns_missing_end_of_turn"] += turns_missing_end_of_turn(
            encoded.segments, self.encoder.template.end_of_turn)
        if not encoded.truncated:
            self.lengths.append(len(trained))
            return
        self.counts["truncated"] += 1
        if whole is not None:
            self.lengths.append(len(whole.trained))
            cut = len(trained)  # the first token cut off; a trained run across the cut loses its end
            if trained[-1] and whole.trained[cut]:
                self.counts["truncated_inside_trained_turn"] += 1

    def report(self, data_path: str, data: DataConfig, rejects: dict[str, int], read_rejects: int) -> QualityReport:
        rejected = dict(Counter(rejects) - self.dropped)
        c = self.counts
        return QualityReport(
            data_path=data_path, max_seq_len=self.encoder.max_seq_len, truncation=self.encoder.truncation,
            on_bad_row=data.on_bad_row, rows=c["conversations"] + read_rejects, rejected=rejected,
            dropped=dict(self.dropped), examples=c["examples"], conversations=c["conversations"],
            turns=_spread(self.turns), messages={role: self.messages[role] for role in ROLES},
            lengths=self._lengths(),
            roles={ROLE_NAMES[code]: RoleTokens(int(self.role_tokens[code]), int(self.role_trained[code]))
                   for code in sorted(ROLE_NAMES)},
            trained_tokens=int(self.role_trained.sum()), no_trained_tokens=self.dropped[NOTHING_TRAINED],
            truncated=c["truncated"], truncated_inside_trained_turn=c["truncated_inside_trained_turn"],
            dropped_too_long=self.dropped[TOO_LONG], duplicates=c["duplicates"],
            conflicting_prompts=c["conflicting"], blank_messages=c["blank"],
            turns_missing_end_of_turn=c["turns_missing_end_of_turn"], unknown_tool_calls=c["unknown_tool_calls"],
            reasoning_not_rendered=c["reasoning_not_rendered"], special_token_rows=c["special_token_rows"],
            special_tokens_in_content=self.encoder.special_tokens_in_content)

    def _lengths(self) -> Lengths:
        lengths = np.frombuffer(self.lengths, dtype=np.int32)
        if not len(lengths):
            return Lengths()
        limit = self.encoder.max_seq_len
        over = int((lengths > limit).sum()) if limit is not None else 0
        return Lengths(*length_spread(lengths), over)


def turns_missing_end_of_turn(segments: Sequence[Segment], end_of_turn: Sequence[str]) -> int:
    """Trained message turns (a run of trained segments of one role: content, then its closing marker)
    whose text does not end with one of the template's end-of-turn markers."""
    markers = tuple(end_of_turn)
    missing = 0
    turn_role = {"reasoning": "assistant", "tool_call": "assistant"}  # pieces of one assistant turn
    for (role, trained), run in groupby(segments, key=lambda s: (turn_role.get(s.role, s.role), s.trainable)):
        if trained and role and not "".join(s.text for s in run).endswith(markers):
            missing += 1
    return missing


def reasoning_not_rendered(conversation: Conversation, segments: Sequence[Segment]) -> int:
    """Trained assistant turns whose reasoning the template left out: the messages with reasoning minus
    the trained reasoning pieces of the render (one run of segments per turn whose reasoning it shows: the
    think tags and the reasoning's own text are separate segments)."""
    given = sum(1 for m in conversation.messages if m.role == "assistant" and m.reasoning is not None
                and m.train is not False)
    shown = sum(1 for (role, trained), _ in groupby(segments, key=lambda s: (s.role, s.trainable))
                if role == "reasoning" and trained)
    return max(given - shown, 0)


def _spread(histogram: Counter[int]) -> dict[str, int | None]:
    if not histogram:
        return {"min": None, "median": None, "max": None}
    values = np.array(sorted(histogram), dtype=np.int64)
    weights = np.array([histogram[v] for v in values], dtype=np.int64)
    median = values[np.searchsorted(np.cumsum(weights), (weights.sum() + 1) // 2)]
    return {"min": int(values[0]), "median": int(median), "max": int(values[-1])}


def length_spread(lengths: np.ndarray) -> tuple[int, int, int, int, int]:
    """(count, min, median, p95, max) of a non-empty array of lengths; median and p95 are observed lengths
    (inverted-CDF percentiles)."""
    median, p95 = np.percentile(lengths, [50, 95], method="inverted_cdf")
    return len(lengths), int(lengths.min()), int(median), int(p95), int(lengths.max())


def digest(value: Any) -> int:
    """A 64-bit hash of a JSON-able value (e.g. (role, content) pairs): a Python int costs about half a bytes
    digest in a set, and a collision among even 10^7 distinct values has odds of about 3 in a million."""
    text = repr(value)  # as exact as JSON for strings, numbers, lists and tuples (equal iff equal), and 5x cheaper
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")



SPECIAL_TOKEN_ROWS = {
    "text": "(encoded as plain text, never the control token: data.special_tokens_in_content=text)",
    "error": "(refused: data.special_tokens_in_content=error; set it to text to train them as plain text)",
    "allow": "(encoded as the control tokens, so forged turn markup is trained: data.special_tokens_in_content="
             "allow; set it to text)",
}
"""The check's warning about such rows, by data.special_tokens_in_content."""


def _problems(r: QualityReport) -> list[str]:
    """Why training on this data would learn nothing useful; empty when it would."""
    if r.examples == 0:
        lost = ", ".join(f"{n} {reason}" for reason, n in sorted({**r.rejected, **r.dropped}.items()))
        return [f"no row became a training example ({r.rows} rows read{': ' + lost if lost else ''}); "
                "training would learn nothing. Fix the rejected rows, mark assistant messages trainable "
                "(\"train\": true or data.train_on) or raise data.max_seq_len."]
    if r.trained_tokens == 0:
        return [f"the {r.examples} examples have no trained token; training would learn nothing. Check "
                "data.train_on and the messages' \"train\" flags."]
    return []


def _warnings(r: QualityReport) -> list[str]:
    out = []
    rejected = sum(r.rejected.values())
    where = f" (see {r.rejects_path})" if r.rejects_path else ""
    if rejected and rejected > REJECTED_SHARE_WARNING * r.rows:
        out.append(f"{rejected} of the {r.rows} rows ({rejected / r.rows:.0%}) are rejected{where}.")
    if rejected and r.on_bad_row == "error":
        out.append(f"data.on_bad_row=error: training would stop at the first rejected row{where}; "
                   "fix the rows or set data.on_bad_row=skip.")
    checks = [
        (r.no_trained_tokens, "rows dropped because no token is trained (every assistant message "
                              "\"train\": false, or data.train_on)"),
        (r.dropped_too_long, f"rows dropped as longer than data.max_seq_len={r.max_seq_len} "
                             "(data.truncation=drop)"),
        (r.truncated, f"examples truncated to data.max_seq_len={r.max_seq_len}"),
        (r.truncated_inside_trained_turn, "truncated examples cut inside a trained turn, which loses its "
                                          "end-of-turn token"),
        (r.duplicates, "rows repeating an earlier conversation exactly (deduplicate them)"),
        (r.conflicting_prompts, "prompts that appear with different answers"),
        (r.blank_messages, "messages that are whitespace only"),
        (r.turns_missing_end_of_turn, "trained turns not ending with an end-of-turn token (the model would "
                                      "not learn to stop)"),
        (r.unknown_tool_calls, "tool calls naming a function absent from their row's tools"),
        (r.reasoning_not_rendered, "assistant reasoning traces the template does not render, so they are not "
                                   "trained (data.reasoning_turns=split trains each turn's reasoning)"),
        (r.special_token_rows, "rows whose message contents hold special-token strings "
                               + SPECIAL_TOKEN_ROWS[r.special_tokens_in_content]),
    ]
    out += [f"{name} on {n['rows']} rows: ignored (sftlab does not read it)." for name, n in r.fields.items()
            if not n["used"]]
    out += [f"{text}: {n}." for n, text in checks if n]
    return out


def write(report: QualityReport, fmt: str = "text", console: Any = None) -> None:
    """Print the report: `text` as rich tables, `json` as one JSON object (to `console.file` or stdout)."""
    print_report(report, lambda: _tables(report), fmt=fmt, console=console, trains="the data trains something")


def print_report(report: Any, tables: Callable[[], Sequence[Any]], *, fmt: str, console: Any, trains: str) -> None:
    """Print a check report of any kind of example (conversations, pairs, feedback): `json` as its `to_dict()` in
    one JSON object (to `console.file` or stdout); `text` as its rich `tables()`, problems, warnings and verdict
    (`ok: {trains}` or `not ok`)."""
    if fmt == "json":
        file = console.file if console is not None else sys.stdout
        file.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
        return
    if fmt != "text":
        raise ValueError(f"unknown report format {fmt!r}; expected text or json")
    from rich.console import Console
    from rich.text import Text

    # Text, never markup: problems, roles and paths quote the user's data, which may hold `[...]`.
    console = console if console is not None else Console(highlight=False)
    for table in tables():
        console.print(table)
    for problem in report.problems:
        console.print(Text.assemble(("problem:", "bold red"), " ", problem))
    for warning in report.warnings:
        console.print(Text.assemble(("warning:", "yellow"), " ", warning))
    verdict = (("ok", "bold green"), f": {trains}") if report.ok else (("not ok", "bold red"),)
    console.print(Text.assemble(*verdict))


def _tables(r: QualityReport) -> list[Any]:
    return [_summary_table(r), _roles_table(r), _lengths_table(r)]


def _summary_table(r: QualityReport) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"sftlab check: {r.data_path}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    turns = "/".join(str(r.turns.get(k)) for k in ("min", "median", "max"))
    rows: list[tuple[str, object]] = [("rows read", r.rows), ("valid conversations", r.conversations),
                                      ("examples", r.examples)]
    rows += [(f"rejected: {reason}", n) for reason, n in sorted(r.rejected.items())]
    rows += [(f"dropped: {reason}", n) for reason, n in sorted(r.dropped.items())]
    rows += [("truncated", r.truncated), ("  cut inside a trained turn", r.truncated_inside_trained_turn),
             ("duplicate conversations", r.duplicates), ("prompts with different answers", r.conflicting_prompts),
             ("whitespace-only messages", r.blank_messages),
             ("trained turns without end-of-turn", r.turns_missing_end_of_turn),
             (f"rows with special-token text in contents ({r.special_tokens_in_content})", r.special_token_rows),
             ("turns per conversation (min/median/max)", turns)]
    rows += [(f"{role} messages", n) for role, n in r.messages.items()]
    rows += [(f"field {name}", f"{n['rows']} rows: {'used' if n['used'] else 'ignored'}")
             for name, n in r.fields.items()]
    if r.rejects_path:
        rows.append(("rejected and dropped rows in", r.rejects_path))
    for name, value in rows:
        table.add_row(Text(name), Text(str(value)))
    return table


def _roles_table(r: QualityReport) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="tokens per role (examples as trained)")
    for column in ("role", "tokens", "trained", "share"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for name, counts in r.roles.items():
        share = "-" if counts.share is None else f"{counts.share:.1%}"
        table.add_row(Text(name), str(counts.tokens), str(counts.trained_tokens), share)
    return table


def _lengths_table(r: QualityReport) -> Any:
    from rich.table import Table

    table = Table(title="token lengths before truncation")
    for name in ("rows", "min", "median", "p95", "max", "max_seq_len", "over max_seq_len"):
        table.add_column(name, justify="right")
    n = r.lengths
    table.add_row(*(str(v) for v in (n.count, n.min, n.median, n.p95, n.max, r.max_seq_len, n.over_max_seq_len)))
    return table
