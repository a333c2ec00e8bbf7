"""`sftlab check DATA stage=dpo`: exact counts on a pair file with one of each kind of flaw, lengths and length
bias against an independent count, the same report whatever the batch size, truncation, the rejects file,
and the CLI's exit codes and both formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import tiny_chat_tokenizer
from sftlab.cli import main
from sftlab.config import DataConfig
from sftlab.data import pair_quality
from sftlab.data.encode import Encoder
from sftlab.data.templates import load_template

MAX_SEQ_LEN = 64
LONG = " ".join(["Imagine you have two magic dice."] * 12)
GREETING = "Hello! How can I help you today?"
SYSTEM_QA = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
ROWS: list[object] = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five."},                     # 1
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five."},                     # 2 duplicate of 1
    {"prompt": "Hello!", "chosen": GREETING, "rejected": "Hi."},                               # 3
    {"prompt": "Hello!", "chosen": "Hi.", "rejected": GREETING},                               # 4 contradicts 3
    {"prompt": "Hello!", "chosen": GREETING, "rejected": "Hi."},                               # 5 duplicate of 3
    {"prompt": "Where is Paris?", "chosen": "The capital of France is Paris.",
     "rejected": "the capital of  France is paris. "},                                         # 6 near-identical
    {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."},                                  # 7 no preference
    "{not json",                                                                               # 8 bad JSON
    {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
     "rejected": [{"role": "user", "content": "Other Q?"}, {"role": "assistant", "content": "B."}]},  # 9
    {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},  # 10 not a pair
    {"prompt": "Explain quantum entanglement like I'm five.", "chosen": LONG, "rejected": "No."},  # 11 too long
    {"chosen": [*SYSTEM_QA, {"role": "assistant", "content": "4."}],
     "rejected": [*SYSTEM_QA, {"role": "assistant", "content": "It is 4, I think."}]},         # 12 implicit form
]
MEASURED = (0, 1, 2, 3, 4, 5, 10, 11)
"""Rows that encode (usable, or dropped as too long): the lengths and the length bias are over these."""
TOO_LONG_ROW = 10
REJECTS = {7: "chosen equals rejected", 8: "invalid JSON", 9: "prompts differ", 10: "not a preference row",
           11: "too long"}


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def make_encoder(truncation: str = "drop", max_seq_len: int | None = MAX_SEQ_LEN) -> Encoder:
    tokenizer = tiny_chat_tokenizer()
    return Encoder(tokenizer, load_template("chatml", tokenizer), max_seq_len=max_seq_len, truncation=truncation)


def analyze(tmp_path: Path, rows: list[object] = ROWS, truncation: str = "drop",
            max_seq_len: int | None = MAX_SEQ_LEN) -> pair_quality.PairReport:
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(max_seq_len=max_seq_len, truncation=truncation)  # type: ignore[arg-type]
    return pair_quality.analyze_pairs(data, cfg, make_encoder(truncation, max_seq_len),
                                      rejects_path=tmp_path / "rejects.jsonl")


def parts(row: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen answer, rejected answer) of either row form, read independently."""
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"]
    return row["chosen"][:-1], row["chosen"][-1]["content"], row["rejected"][-1]["content"]


def independent_lengths(row: dict) -> tuple[int, int, int]:
    """(prompt, chosen scored, rejected scored) tokens: the tokenizer's own ChatML template renders the prompt
    with its generation prompt; an answer tokenises on its own (a newline and a special token surround it) and
    is scored with its <|im_end|>."""
    tokenizer = tiny_chat_tokenizer()
    prompt, chosen, rejected = parts(row)
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    tokens = [len(tokenizer.encode(s, add_special_tokens=False)) for s in (text, chosen, rejected)]
    return tokens[0], tokens[1] + 1, tokens[2] + 1


def spread(values: list[int]) -> pair_quality.Spread:
    median, p95 = np.percentile(values, [50, 95], method="inverted_cdf")
    return pair_quality.Spread(len(values), min(values), int(median), int(p95), max(values))


def test_counts_every_kind_of_flaw(tmp_path: Path) -> None:
    report = analyze(tmp_path)
    assert report.ok and report.problems == []
    assert report.rows == 12 and report.pairs == 7
    assert report.rejected == {"chosen equals rejected": 1, "invalid JSON": 1, "prompts differ": 1,
                               "not a preference row": 1}
    assert report.dropped == {"too long": 1} and report.dropped_by_max_seq_len == 1 and report.truncated == 0
    assert report.rows == sum(report.rejected.values()) + sum(report.dropped.values()) + report.pairs
    assert report.duplicates == 2  # rows 2 and 5
    assert report.contradicting == 1  # rows 3/4 (row 5 repeats 3: the same conflict, counted once)
    assert report.contradicting_examples == [f"{tmp_path / 'pairs.jsonl'}:3 vs {tmp_path / 'pairs.jsonl'}:4"]
    assert (report.near_identical, report.near_identical_examples) == (1, [f"{tmp_path / 'pairs.jsonl'}:6"])
    assert report.rejects_path == str(tmp_path / "rejects.jsonl")
    warnings = "\n".join(report.warnings)
    for expected in ("4 of the 12 rows (33%) are rejected", "data.on_bad_row=error",
                     "dropped by data.max_seq_len=64 (data.truncation=drop): 1", "deduplicate them): 2",
                     "the other way in another: 1 (e.g.", "differ only in whitespace or case: 1 (e.g."):
        assert expected in warnings
    assert "truncated" not in warnings


def test_lengths_and_length_bias_match_an_independent_count(tmp_path: Path) -> None:
    report = analyze(tmp_path)
    lengths = [independent_lengths(ROWS[i]) for i in MEASURED]  # type: ignore[arg-type]
    prompt, chosen, rejected = (list(column) for column in zip(*lengths))
    longer = [p + max(c, r) for p, c, r in lengths]
    over = [row for row, n in zip(MEASURED, longer) if n > MAX_SEQ_LEN]
    assert over == [TOO_LONG_ROW]  # only row 11 is longer than max_seq_len
    assert report.lengths == pair_quality.PairLengths(spread(prompt), spread(chosen), spread(rejected),
                                                      spread(longer))
    c, r = np.array(chosen), np.array(rejected)
    assert report.length_bias == pair_quality.LengthBias(
        chosen_longer=int((c > r).sum()), rejected_longer=int((c < r).sum()), same_length=int((c == r).sum()),
        chosen_longer_share=pytest.approx(float((c > r).sum() / (c != r).sum())),
        mean_ratio=pytest.approx(float((c / r).mean())))


def written(report: pair_quality.PairReport, fmt: str) -> str:
    out = io.StringIO()
    pair_quality.write(report, fmt, console=Console(file=out, width=200, color_system=None))
    return out.getvalue()


@pytest.mark.parametrize("kind, share, warning", [
    ("chosen longer", 1.0, '"longer is better"'), ("rejected longer", 0.0, '"shorter is better"'),
    ("balanced", 0.5, None), ("same length", None, None)])
def test_length_bias_is_warned_outside_0_3_to_0_7(tmp_path: Path, kind: str, share: float | None,
                                                  warning: str | None) -> None:
    long, short = GREETING, "Hi."
    answers = {"chosen longer": [(long, short)] * 8, "rejected longer": [(short, long)] * 8,
               "balanced": [(long, short), (short, long)] * 4, "same length": [("A.", "B.")] * 8}[kind]
    rows = [{"prompt": f"Question {i}?", "chosen": c, "rejected": r} for i, (c, r) in enumerate(answers)]
    report = analyze(tmp_path, rows)
    lengths = [independent_lengths(row) for row in rows]
    assert len({(c, r) for _, c, r in lengths}) == (1 if kind != "balanced" else 2)  # the premise holds
    bias = report.length_bias
    assert bias.chosen_longer_share == share
    assert bias.mean_ratio == pytest.approx(np.mean([c / r for _, c, r in lengths]))
    assert (bias.chosen_longer, bias.rejected_longer, bias.same_length) == {
        "chosen longer": (8, 0, 0), "rejected longer": (0, 8, 0), "balanced": (4, 4, 0), "same length": (0, 0, 8)}[kind]
    bias_warnings = [w for w in report.warnings if w.startswith("length bias")]
    assert len(bias_warnings) == (warning is not None)
    if warning is not None:
        assert warning in bias_warnings[0] and "8 of the 8 pairs" in bias_warnings[0]
        assert "length bias" in written(report, "text")


def test_the_report_does_not_depend_on_the_batch_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = analyze(tmp_path)
    monkeypatch.setattr(pair_quality, "BATCH_ROWS", 2)  # the contradiction spans batches, so do duplicates
    assert analyze(tmp_path) == whole


def test_truncation_keeps_the_long_pair_and_its_full_lengths(tmp_path: Path) -> None:
    dropped = analyze(tmp_path)
    report = analyze(tmp_path, truncation="truncate")
    assert (report.pairs, report.truncated, report.dropped, report.dropped_by_max_seq_len) == (8, 1, {}, 0)
    assert report.lengths == dropped.lengths and report.length_bias == dropped.length_bias
    assert any("pairs truncated to data.max_seq_len=64: 1" in w for w in report.warnings)
    # A prompt that fills max_seq_len leaves no scored token: dropped by max_seq_len under either policy.
    rows = [ROWS[0], {"prompt": LONG, "chosen": "A.", "rejected": "B."}]
    for truncation, reason in (("drop", "too long"), ("truncate", "no trained tokens")):
        report = analyze(tmp_path, rows, truncation=truncation)
        assert (report.pairs, report.dropped, report.dropped_by_max_seq_len) == (1, {reason: 1}, 1)
        assert report.lengths.prompt.max == independent_lengths(rows[1])[0] > MAX_SEQ_LEN


def test_every_rejected_and_dropped_row_is_in_the_rejects_file(tmp_path: Path) -> None:
    analyze(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    data = tmp_path / "pairs.jsonl"
    assert {record["where"]: record["reason"] for record in records} == {
        f"{data}:{line}": reason for line, reason in REJECTS.items()}
    by_line = {int(record["where"].rsplit(":", 1)[1]): record for record in records}
    assert by_line[8]["row"] == "{not json"  # a read reject keeps the raw text
    assert json.loads(by_line[11]["row"])["chosen"] == [{"role": "assistant", "content": LONG}]  # fixable, refeedable
    clean = analyze(tmp_path, ROWS[:2])
    assert clean.rejects_path is None and not (tmp_path / "rejects.jsonl").exists()


def test_no_usable_pair_is_a_problem(tmp_path: Path) -> None:
    report = analyze(tmp_path, [ROWS[6], ROWS[7], ROWS[10]])
    assert not report.ok and report.pairs == 0
    problem = ("no row became a usable pair (3 rows read: 1 chosen equals rejected, 1 invalid JSON, 1 too long); "
               "training would learn nothing. Fix the rejected rows (see the rejects file) or raise data.max_seq_len.")
    assert report.problems == [problem]
    assert "not ok" in written(report, "text")
    empty = analyze(tmp_path, [])
    assert not empty.ok and empty.rows == 0 and empty.length_bias == pair_quality.LengthBias()


def test_text_and_json_output(tmp_path: Path) -> None:
    report = analyze(tmp_path)
    text = written(report, "text")
    for expected in ("usable pairs", "rejected: prompts differ", "dropped by max_seq_len=64 (drop)",
                     "tokens per pair, before truncation", "chosen (scored)", "length bias (scored tokens)",
                     "contradicting preferences", "warning: pairs whose answers differ only", "ok: 7 pairs train"):
        assert expected in text
    assert "dropped: too long" not in text  # every drop is by max_seq_len: one row says so
    as_json = json.loads(written(report, "json"))
    assert as_json["ok"] is True and as_json["pairs"] == 7
    assert as_json["lengths"]["chosen"]["count"] == 8 and as_json["length_bias"]["same_length"] >= 0
    assert as_json["warnings"] == report.warnings


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tokenizer"
    tiny_chat_tokenizer().save_pretrained(directory)
    return directory


def run_check(tmp_path: Path, tokenizer_dir: Path, rows: list[object], *options: str) -> int:
    data = write_rows(tmp_path / "data.jsonl", rows)
    return main(["check", str(data), "--model", str(tokenizer_dir), "--template", "chatml", "stage=dpo",
                 f"data.max_seq_len={MAX_SEQ_LEN}", *options])


def test_cli_reports_pairs_and_exits_0(tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(tmp_path, tokenizer_dir, ROWS, "--format", "json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["pairs"], report["duplicates"], report["contradicting"]) == (12, 7, 2, 1)
    assert len((tmp_path / "data.rejects.jsonl").read_text(encoding="utf-8").splitlines()) == 5  # DATA's name
    assert run_check(tmp_path, tokenizer_dir, ROWS, "--rejects", str(tmp_path / "out" / "bad.jsonl")) == 0
    assert "usable pairs" in capsys.readouterr().out
    assert len((tmp_path / "out" / "bad.jsonl").read_text(encoding="utf-8").splitlines()) == 5


def test_cli_exits_1_when_no_pair_would_train(tmp_path: Path, tokenizer_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(tmp_path, tokenizer_dir, [ROWS[6], ROWS[9]], "--format", "json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["pairs"] == 0 and "learn nothing" in report["problems"][0]
    assert run_check(tmp_path, tokenizer_dir, [ROWS[6]]) == 1
    assert "not ok" in capsys.readouterr().out
