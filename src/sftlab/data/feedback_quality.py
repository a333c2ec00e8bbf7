"""Feedback report for `sftlab check DATA stage=kto`: usable examples, rejects, the desirable/undesirable balance
and the loss weights it calls for.

KTO weighs each desirable example's loss by kto.desirable_weight (λ_D) and each undesirable one's by
kto.undesirable_weight (λ_U). The KTO paper (Ethayarajh et al. 2024, eq. 8) recommends
    1 ≤ λ_D·n_D / (λ_U·n_U) ≤ 4/3
for n_D desirable and n_U undesirable examples; outside it the report warns and proposes either weight (keeping
the other) that brings the ratio into that range — the rule TRL's KTOTrainer also warns by.

Every input row ends up in exactly one of: rejected (cannot be read, validated, rendered or tokenised), dropped
(valid, but max_seq_len keeps it out) or examples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

from sftlab.config import DataConfig, KTOConfig
from sftlab.data.dataset import BATCH_ROWS
from sftlab.data.encode import NOTHING_TRAINED, SPECIAL_IN_CONTENT, TOO_LONG, Dropped, Encoder
from sftlab.data.feedback import FeedbackDataset, FeedbackEncoder, feedback_row, read_feedback
from sftlab.data.preference import _role_map
from sftlab.data.quality import SPECIAL_TOKEN_ROWS, print_report
from sftlab.data.rejects import RejectLog
from sftlab.data.sources import Source, path_of
from sftlab.errors import DataError

BALANCE = (1.0, 4 / 3)
"""The recommended range of λ_D·n_D / (λ_U·n_U)."""


@dataclass(frozen=True)
class Proposal:
    """Weights that bring the ratio into BALANCE: change one of them (either), not both."""
    desirable_weight: tuple[float, float]
    """The range for kto.desirable_weight, keeping kto.undesirable_weight."""
    undesirable_weight: tuple[float, float]
    """The range for kto.undesirable_weight, keeping kto.desirable_weight."""


@dataclass(frozen=True)
class FeedbackReport:
    file: str
    rows: int = 0
    examples: int = 0
    desirable: int = 0
    undesirable: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    weights: tuple[float, float] = (1.0, 1.0)
    """(kto.desirable_weight, kto.undesirable_weight) the check was run with."""
    ratio: float | None = None
    """λ_D·n_D / (λ_U·n_U); None without examples of both kinds."""
    proposal: Proposal | None = None
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    special_token_rows: int = 0
    """Rows whose message contents hold special-token strings, refused ones included (see QualityReport)."""
    special_tokens_in_content: str = "text"
    """data.special_tokens_in_content: how those strings are encoded (text, error or allow)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def analyze_feedback(data_path: str | Path | Source, data: DataConfig, encoder: Encoder, kto: KTOConfig, *,
                     rejects_path: str | Path | None = None) -> FeedbackReport:
    """Read and encode every row as stage kto would (bad rows counted and written to `rejects_path`)."""
    feedback_encoder = FeedbackEncoder(encoder)
    counts = {True: 0, False: 0}
    dropped: Counter[str] = Counter()
    encode_rejects = read = refused_special = 0
    with RejectLog(rejects_path) as log:
        rows = read_feedback(data_path, role_map=_role_map(data_path, data), on_bad_row="skip", rejects=log,
                             max_row_bytes=encoder.row_limit)
        for batch in iter(lambda: list(islice(rows, BATCH_ROWS)), []):
            read += len(batch)
            for row, result in zip(batch, feedback_encoder.encode_batch(batch)):
                if isinstance(result, DataError):
                    refused_special += result.reason == SPECIAL_IN_CONTENT
                    if isinstance(result, Dropped):
                        dropped[result.reason] += 1
                    encode_rejects += 1
                    log.add(where=result.where, reason=result.reason, message=result.detail, row=feedback_row(row))
                    continue
                counts[row.desirable] += 1
        rows_total = read + log.total - encode_rejects  # rows read as feedback, and the reader's rejects
        logged = dict(log.counts)
    return _finished(path_of(data_path), rows_total, (counts[True], counts[False]), logged, dropped, kto, data,
                     feedback_encoder.special_token_rows + refused_special, encoder.special_tokens_in_content)


def from_dataset(dataset: FeedbackDataset, data_path: str | Path | Source, data: DataConfig, kto: KTOConfig,
                 special_tokens_in_content: str) -> FeedbackReport:
    """The report `analyze_feedback` gives, read from the encoded dataset training built (its stats and labels:
    everything the report counts), so a run's report never encodes the rows again."""
    stats, desirable = dataset.stats, int(dataset.desirable.sum())
    dropped = Counter({reason: stats.rejected[reason] for reason in (TOO_LONG, NOTHING_TRAINED)
                       if reason in stats.rejected})
    special = stats.special_token_rows + stats.rejected.get(SPECIAL_IN_CONTENT, 0)
    return _finished(path_of(data_path), stats.rows, (desirable, len(dataset) - desirable), stats.rejected, dropped,
                     kto, data, special, special_tokens_in_content)


def _finished(file: str, rows: int, labels: tuple[int, int], logged: dict[str, int], dropped: Counter[str],
              kto: KTOConfig, data: DataConfig, special: int, mode: str) -> FeedbackReport:
    """The report from its counts: `logged` every row of the rejects file by reason, `dropped` those max_seq_len
    kept out (counted as dropped, not rejected)."""
    rejected = {reason: n - dropped[reason] for reason, n in logged.items() if n > dropped[reason]}
    report = _report(file, rows, *labels, rejected, sum(dropped.values()), kto, on_bad_row=data.on_bad_row)
    warnings = report.warnings + ([f"rows whose message contents hold special-token strings "
                                   f"{SPECIAL_TOKEN_ROWS[mode]}: {special}."] if special else [])
    return replace(report, special_token_rows=special, special_tokens_in_content=mode, warnings=warnings)


def _report(file: str, rows: int, desirable: int, undesirable: int, rejected: dict[str, int], dropped: int,
            kto: KTOConfig, *, on_bad_row: str) -> FeedbackReport:
    weights = (kto.desirable_weight, kto.undesirable_weight)
    warnings, problems = [], []
    ratio = proposal = None
    if desirable + undesirable == 0:
        problems.append("no usable example: every row was rejected or dropped (see the rejects file).")
    elif desirable == 0 or undesirable == 0:
        kind = "desirable (label true)" if desirable == 0 else "undesirable (label false)"
        warnings.append(f"there is no {kind} example: KTO then only pushes every answer one way. Add examples "
                        "of both labels.")
    else:
        ratio = weights[0] * desirable / (weights[1] * undesirable)
        if not BALANCE[0] - 1e-9 <= ratio <= BALANCE[1] + 1e-9:
            base_d = undesirable * weights[1] / desirable  # λ_D giving ratio 1
            base_u = desirable * weights[0] / undesirable  # λ_U giving ratio 1
            proposal = Proposal((round(base_d * BALANCE[0], 3), round(base_d * BALANCE[1], 3)),
                                (round(base_u / BALANCE[1], 3), round(base_u / BALANCE[0], 3)))
            warnings.append(f"{desirable} desirable and {undesirable} undesirable examples with "
                            f"kto.desirable_weight={weights[0]:g} and kto.undesirable_weight={weights[1]:g} give "
                            f"λ_D·n_D / (λ_U·n_U) = {ratio:.3g}; the KTO paper recommends 1 to 4/3. Set EITHER "
                            f"kto.desirable_weight in [{proposal.desirable_weight[0]:g}, "
                            f"{proposal.desirable_weight[1]:g}] OR kto.undesirable_weight in "
                            f"[{proposal.undesirable_weight[0]:g}, {proposal.undesirable_weight[1]:g}] (not both).")
    if rejected and on_bad_row == "error":
        warnings.append(f"{sum(rejected.values())} row(s) would stop training with data.on_bad_row=error; fix them "
                        "or set data.on_bad_row=skip.")
    return FeedbackReport(file, rows, desirable + undesirable, desirable, undesirable, rejected, dropped, weights,
                          ratio, proposal, warnings, problems)


def write(report: FeedbackReport, fmt: str = "text", console: Any = None) -> None:
    """Print the report: `text` as a rich table, `json` as one JSON object (to `console.file` or stdout)."""
    print_report(report, lambda: (_table(report),), fmt=fmt, console=console,
                 trains=f"{report.examples} examples train")


def _table(report: FeedbackReport) -> Any:
    from rich.table import Table
    from rich.text import Text

    # Text, never markup: the path quotes the user's data, which may hold `[...]`.
    table = Table(title=Text(f"sftlab check (feedback): {report.file}"))
    table.add_column("")
    table.add_column("count", justify="right")
    for name, value in (("rows", report.rows), ("examples", report.examples), ("desirable", report.desirable),
                        ("undesirable", report.undesirable), ("dropped (max_seq_len)", report.dropped),
                        (f"special-token text in contents ({report.special_tokens_in_content})",
                         report.special_token_rows),
                        *((f"rejected: {reason}", n) for reason, n in sorted(report.rejected.items()))):
        table.add_row(Text(name), Text(str(value)))
    if report.ratio is not None:
        table.add_row("λ_D·n_D / (λ_U·n_U)", f"{report.ratio:.3g}")
    return table
