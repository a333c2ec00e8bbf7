"""Preference rows: both row forms, only the answer's tokens scored, the prompt's tokens shared, bad rows refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import shared_real_tokenizer, tiny_chat_tokenizer
from sftlab.config import DataConfig
from sftlab.data.encode import IGNORE_INDEX, Encoder
from sftlab.data.inspect import runs
from sftlab.data.preference import PairEncoder, build_pair_dataset, read_pairs, to_pair
from sftlab.data.rejects import RejectLog
from sftlab.data.templates import load_template
from sftlab.errors import DataError

EXPLICIT = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}],
            "chosen": [{"role": "assistant", "content": "It is 4."}],
            "rejected": [{"role": "assistant", "content": "It is 5, I think."}]}
IMPLICIT = {"chosen": EXPLICIT["prompt"] + EXPLICIT["chosen"], "rejected": EXPLICIT["prompt"] + EXPLICIT["rejected"]}


def chatml_encoder(**options) -> Encoder:
    tokenizer = tiny_chat_tokenizer()
    return Encoder(tokenizer, load_template("chatml", tokenizer), **options)


def decoded_runs(tokenizer, example) -> list[tuple[bool, str]]:
    return [(trained, tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            for trained, ids in runs(example.input_ids, example.labels)]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_only_the_answer_and_its_end_of_turn_are_scored_and_the_prompt_is_shared() -> None:
    encoder = chatml_encoder()
    pair = PairEncoder(encoder).encode(to_pair(EXPLICIT, "t.jsonl:1"))
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
              "Hello.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # The earlier assistant turn is prompt, not scored; the template's newline after the answer is cut.
    assert decoded_runs(encoder.tokenizer, pair.chosen) == [(False, prompt), (True, "It is 4.<|im_end|>")]
    assert decoded_runs(encoder.tokenizer, pair.rejected) == [(False, prompt), (True, "It is 5, I think.<|im_end|>")]
    assert pair.chosen.input_ids[:pair.prompt_tokens] == pair.rejected.input_ids[:pair.prompt_tokens]
    assert encoder.tokenizer.decode(pair.chosen.input_ids[:pair.prompt_tokens]) == prompt


def test_the_implicit_form_and_the_string_form_encode_as_the_explicit_form() -> None:
    encoder = PairEncoder(chatml_encoder())
    explicit = encoder.encode(to_pair(EXPLICIT, "t:1"))
    assert encoder.encode(to_pair(IMPLICIT, "t:1")) == explicit
    strings = encoder.encode(to_pair({"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five."}, "t:1"))
    messages = encoder.encode(to_pair({"prompt": [{"role": "user", "content": "What is 2+2?"}],
                                       "chosen": [{"role": "assistant", "content": "It is 4."}],
                                       "rejected": [{"role": "assistant", "content": "Five."}]}, "t:1"))
    assert strings == messages


def test_a_row_s_own_train_flags_do_not_change_what_is_scored() -> None:
    encoder = PairEncoder(chatml_encoder(train_on="all"))
    row = json.loads(json.dumps(EXPLICIT))
    row["prompt"][2]["train"] = True
    row["chosen"][0]["train"] = False
    assert encoder.encode(to_pair(row, "t:1")) == PairEncoder(chatml_encoder()).encode(to_pair(EXPLICIT, "t:1"))


BAD_ROWS = [
    ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}, "chosen equals rejected"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "user", "content": "Other Q?"}, {"role": "assistant", "content": "B."}]}, "prompts differ"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "assistant", "content": "B."}]}, "prompts differ"),
    ({"prompt": "Q?", "chosen": [{"role": "assistant", "content": "A."}, {"role": "assistant", "content": "A2."}],
      "rejected": "B."}, "chosen not one assistant message"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": [{"role": "user", "content": "B."}]},
     "rejected not one assistant message"),
    ({"prompt": "Q?", "chosen": "A."}, "missing rejected"),
    ({"prompt": "Q?", "chosen": "", "rejected": "B."}, "empty content"),
    ({"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "chosen": "B.",
      "rejected": "C."}, "consecutive same roles"),
    ({"prompt": [{"role": "robot", "content": "Q?"}], "chosen": "B.", "rejected": "C."}, "unknown role"),
    ({"chosen": "A.", "rejected": "B."}, "no prompt"),
    ({"chosen": [{"role": "user", "content": "Q?"}], "rejected": [{"role": "user", "content": "Q?"}]},
     "trailing user turn"),
    ({"messages": [{"role": "user", "content": "Q?"}]}, "not a preference row"),
    (["chosen", "rejected"], "not a preference row"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS, ids=[reason for _, reason in BAD_ROWS])
def test_bad_rows_raise_data_errors_naming_file_and_line(tmp_path, row, reason) -> None:
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}, row])
    with pytest.raises(DataError) as info:
        list(read_pairs(path))
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{path}:2: ")


def test_skipped_bad_rows_are_logged_and_the_good_ones_kept(tmp_path) -> None:
    rows = [EXPLICIT] + [row for row, _ in BAD_ROWS[:3]] + [IMPLICIT]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    log = RejectLog(tmp_path / "rejects.jsonl")
    pairs = list(read_pairs(path, on_bad_row="skip", rejects=log))
    log.close()
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:5"]
    assert log.counts == {"chosen equals rejected": 1, "prompts differ": 2}
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 3


def test_sides_whose_prompt_tokens_differ_are_refused() -> None:
    # The template machinery already renders a prompt identically before either answer (its text is fixed per
    # role sequence, and a token straddling the answer's start is refused); the join checks it again on the ids.
    from sftlab.data.preference import _join
    from sftlab.data.schema import Conversation, Message

    encoder = chatml_encoder(train_on="last_assistant")
    sides = encoder.encode_detailed([Conversation((Message("user", prompt), Message("assistant", "A.")), "t.jsonl:7")
                                     for prompt in ("Q?", "Other Q?")])
    refused = _join(*sides)
    assert isinstance(refused, DataError) and refused.reason == "prompts differ"
    assert str(refused).startswith("t.jsonl:7: ")


def test_a_pair_dataset_round_trips_and_collates_chosen_then_rejected(tmp_path) -> None:
    rows = [EXPLICIT, {"prompt": "Q?", "chosen": "Yes.", "rejected": "No, never."}, IMPLICIT]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    encoder = chatml_encoder()
    data = build_pair_dataset(path, DataConfig(cache=False), encoder)
    assert len(data) == 3 and data.stats.examples == 6
    direct = PairEncoder(encoder).encode(to_pair(rows[1], f"{path}:2"))
    assert data.pair(1) == (direct.chosen, direct.rejected)
    assert data.lengths[1] == len(direct.chosen.input_ids) + len(direct.rejected.input_ids)
    pad = encoder.tokenizer.pad_token_id
    padded = data.collate([1, 0], pad_id=pad)
    packed = data.collate([1, 0], pad_id=pad, packed=True)
    examples = [data.pair(1)[0], data.pair(0)[0], data.pair(1)[1], data.pair(0)[1]]
    for batch in (padded, packed):
        assert batch.num_pairs == 2 and batch.where == (f"{path}:2", f"{path}:1")
        # Each supervised position's sequence and target: that sequence's scored tokens, in order.
        for sequence, example in enumerate(examples):
            targets = batch.batch.loss_targets[batch.sequence_index == sequence].tolist()
            assert targets == [t for t in example.labels if t != IGNORE_INDEX]
        assert batch.sequence_tokens.tolist() == [sum(t != IGNORE_INDEX for t in e.labels) for e in examples]
    assert padded.batch.input_ids.shape[0] == 4 and packed.batch.input_ids.shape[0] == 1
    data.reference_logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]).numpy()
    assert data.collate([1, 0], pad_id=pad).reference_logps.tolist() == [-3.0, -1.0, -4.0, -2.0]
    data.close()


def test_truncation_keeps_both_sides_and_a_prompt_too_long_is_dropped() -> None:
    encoder = PairEncoder(chatml_encoder(max_seq_len=24, truncation="truncate"))
    pair = encoder.encode(to_pair({"prompt": "Q?", "chosen": "Hello! How can I help you today? " * 3,
                                   "rejected": "No."}, "t:1"))
    assert pair.truncated and len(pair.chosen.input_ids) == 24 and pair.rejected.labels[-1] != IGNORE_INDEX
    dropped = PairEncoder(chatml_encoder(max_seq_len=24)).encode_batch(
        [to_pair({"prompt": "Hello! How can I help you today? " * 3, "chosen": "A.", "rejected": "B."}, "t:2")])
    assert isinstance(dropped[0], DataError) and dropped[0].reason == "too long"


REAL = ["qwen2_5", "llama3_2", "gemma3"]
EOT = {"qwen2_5": "<|im_end|>", "llama3_2": "<|eot_id|>", "gemma3": "<end_of_turn>"}


@pytest.mark.fixtures
@pytest.mark.parametrize("name", REAL)
def test_real_templates_score_only_the_answer_after_the_generation_prompt(name: str) -> None:
    # The independent reference: the upstream tokenizer's own render of the prompt with its generation prompt
    # is exactly the tokens before the answer, and the scored tokens decode to the answer + end-of-turn.
    tokenizer = shared_real_tokenizer(name)
    encoder = PairEncoder(Encoder(tokenizer, load_template("auto", tokenizer)))
    pair = encoder.encode(to_pair(EXPLICIT, "t:1"))
    prompt_text = tokenizer.apply_chat_template(EXPLICIT["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    for side, answer in ((pair.chosen, "It is 4."), (pair.rejected, "It is 5, I think.")):
        assert side.input_ids[:pair.prompt_tokens] == prompt_ids
        assert all(label == IGNORE_INDEX for label in side.labels[:pair.prompt_tokens])
        scored = [t for t in side.labels if t != IGNORE_INDEX]
        assert side.input_ids[pair.prompt_tokens:] == scored
        assert tokenizer.decode(scored, skip_special_tokens=False) == answer + EOT[name]


def test_a_pair_dataset_is_cached_by_content(tmp_path) -> None:
    path = write_rows(tmp_path / "pairs.jsonl", [EXPLICIT, IMPLICIT])
    settings = DataConfig(cache=True, cache_dir=str(tmp_path / "cache"))
    first = build_pair_dataset(path, settings, chatml_encoder())
    again = build_pair_dataset(path, settings, chatml_encoder())
    assert again.examples.directory == first.examples.directory and again.pair(1) == first.pair(1)
    changed = build_pair_dataset(path, DataConfig(cache=True, cache_dir=str(tmp_path / "cache"), max_seq_len=512),
                                 chatml_encoder(max_seq_len=512))
    assert changed.examples.directory != first.examples.directory


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_max_seq_len_applies_to_what_trains_not_to_the_templates_trailing_text(truncation) -> None:
    """ChatML renders a newline after the last <|im_end|>, which is cut (nothing scored depends on it): a pair
    whose trained sides fit max_seq_len exactly is kept whole; one token less and it is dropped or cut."""
    pair = to_pair(EXPLICIT, "t:1")
    whole = PairEncoder(chatml_encoder()).encode(pair)
    longest = max(len(whole.chosen.input_ids), len(whole.rejected.input_ids))
    fits = PairEncoder(chatml_encoder(max_seq_len=longest, truncation=truncation)).encode(pair)
    assert fits == whole and not fits.truncated
    (short,) = PairEncoder(chatml_encoder(max_seq_len=longest - 1, truncation=truncation)).encode_batch([pair])
    if truncation == "drop":
        assert isinstance(short, DataError) and short.reason == "too long" and f"{longest} tokens" in str(short)
    else:
        assert short.truncated and max(len(short.chosen.input_ids), len(short.rejected.input_ids)) == longest - 1
        assert short.chosen.input_ids == whole.chosen.input_ids[:longest - 1]
    (prompt_only,) = PairEncoder(chatml_encoder(max_seq_len=whole.prompt_tokens, truncation=truncation)
                                 ).encode_batch([pair])
    assert isinstance(prompt_only, DataError)  # nothing of the answers would be scored


def test_a_bad_pair_deep_in_the_file_fails_before_any_pair_is_tokenised(tmp_path, monkeypatch) -> None:
    rows = [EXPLICIT] * 300 + [{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    encoded = []
    real = PairEncoder.encode_batch
    monkeypatch.setattr(PairEncoder, "encode_batch",
                        lambda self, pairs: encoded.append(len(pairs)) or real(self, pairs))
    with pytest.raises(DataError, match=rf"{path}:301: 'chosen' and 'rejected' are the same answer"):
        build_pair_dataset(path, DataConfig(cache=False), chatml_encoder())
    assert encoded == []


def test_feedback_report_from_the_encoded_dataset_equals_the_check(tmp_path):
    """A KTO run's report counts from the dataset training encoded (stats and labels), not by encoding the rows
    again, and says exactly what `sftlab check` says: rejected, dropped (too long), labels, special tokens."""
    from sftlab.config import KTOConfig
    from sftlab.data.feedback import build_feedback_dataset
    from sftlab.data.feedback_quality import analyze_feedback, from_dataset

    rows = [{"prompt": "Say hi.", "completion": "Hi!", "label": True},
            {"prompt": "Say no.", "completion": "No <|im_end|> way.", "label": False},
            {"prompt": "Long " * 60, "completion": "ok", "label": True},
            {"prompt": "x", "completion": "y", "label": 3}, {"chosen": "a"},
            {"prompt": "Count.", "completion": "One two three.", "label": True}]
    path = write_rows(tmp_path / "feedback.jsonl", rows)
    data = DataConfig(train=str(path), template="chatml", on_bad_row="skip", cache=False, max_seq_len=48)
    kto = KTOConfig(desirable_weight=1.0, undesirable_weight=1.0)
    encoder = chatml_encoder(max_seq_len=48)
    dataset = build_feedback_dataset(path, data, encoder)
    saved = from_dataset(dataset, path, data, kto, encoder.special_tokens_in_content)
    direct = analyze_feedback(path, data, chatml_encoder(max_seq_len=48), kto)
    assert saved == direct
    assert (saved.rows, saved.desirable, saved.undesirable, saved.dropped, saved.special_token_rows) == (6, 2, 1, 1, 1)
    assert saved.rejected == {"label not true or false": 1, "not a feedback row": 1}
