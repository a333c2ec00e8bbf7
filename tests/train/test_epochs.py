"""train.epochs: N trains exactly N passes over the examples: every example N times, no more. A step count that
does not divide the data ends with a partial optimizer step (its loss the mean over the supervised tokens it
has), and the logged epoch counter says how many passes were made."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

import sftlab.train.loop as loop
from conftest import tiny_model_dir
from sftlab.config import load_config
from sftlab.runs import prepare, train

QUIET = Console(quiet=True)
QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
      ("Who wrote Hamlet?", "Shakespeare wrote it."), ("Color of the sky?", "Blue, on a clear day."),
      ("Name a prime number.", "Seven.")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


def write_data(path: Path, count: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:count]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(model_dir: Path, data: Path, out: Path, monkeypatch, *overrides: str) -> tuple[Counter, list[dict], object]:
    """Train; returns how often each example was batched, the metrics log's step records, and the result
    (whose `batches` lists each micro-batch's supervised tokens, in order)."""
    cfg = load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "method=lora",
                                 "data.cache=false", "train.log_every_steps=1", *overrides])
    setup = prepare(cfg, console=QUIET)
    seen: Counter = Counter()
    supervised: list[int] = []
    real = loop.make_batch

    def spy(setup_, dataset, chosen, pad_id):
        batch = real(setup_, dataset, chosen, pad_id)
        seen.update(batch.where)
        supervised.append(batch.num_supervised)
        return batch

    monkeypatch.setattr(loop, "make_batch", spy)
    result = train(setup, console=QUIET)
    result.batches = supervised
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return seen, [r for r in records if "loss" in r], result


def test_a_remainder_ends_with_a_partial_step_and_no_extra_pass(model_dir, tmp_path, monkeypatch) -> None:
    # 5 examples, one per micro-batch, 2 per step: 15 micro-batches make 7 whole steps and one of 1 (before,
    # 8 whole steps ran 16 micro-batches: a 4th pass began).
    data = write_data(tmp_path / "train.jsonl", 5)
    seen, steps, result = run(model_dir, data, tmp_path / "run", monkeypatch, "train.epochs=3",
                              "train.micro_batch_size=1", "train.grad_accum_steps=2")
    assert sorted(seen.values()) == [3] * 5 and sum(seen.values()) == 15
    assert result.steps == 8 == len(steps)
    assert steps[-1]["epoch"] == 3.0 and steps[-2]["epoch"] == pytest.approx(2.8)
    # The partial step counts (and its loss averages over) the supervised tokens of its one micro-batch only.
    assert steps[-1]["supervised_tokens"] == result.batches[-1]
    assert [s["supervised_tokens"] for s in steps[:-1]] == [a + b for a, b in zip(result.batches[:-1:2],
                                                                                    result.batches[1:-1:2])]


def test_a_dataset_smaller_than_one_step(model_dir, tmp_path, monkeypatch) -> None:
    # 3 examples in micro-batches of 4: one short micro-batch is the whole epoch, and a step of 8 micro-batches
    # is clamped to it. 3 epochs are 3 steps, each example trained 3 times.
    data = write_data(tmp_path / "train.jsonl", 3)
    seen, steps, result = run(model_dir, data, tmp_path / "run", monkeypatch, "train.epochs=3",
                              "train.micro_batch_size=4", "train.grad_accum_steps=8")
    assert sorted(seen.values()) == [3] * 3
    assert result.steps == 3 and [s["epoch"] for s in steps] == [1.0, 2.0, 3.0]


def test_a_fraction_of_an_epoch_trains_that_share(model_dir, tmp_path, monkeypatch) -> None:
    data = write_data(tmp_path / "train.jsonl", 4)
    seen, steps, result = run(model_dir, data, tmp_path / "run", monkeypatch, "train.epochs=1.5",
                              "train.micro_batch_size=1")
    assert sum(seen.values()) == 6 and max(seen.values()) == 2 and len(seen) == 4
    assert result.steps == 6 and steps[-1]["epoch"] == 1.5
