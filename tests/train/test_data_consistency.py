"""A run and its data are checked against each other: a resumed run refuses data whose content changed since
its checkpoints were written (naming both fingerprints) unless train.resume_on_new_data=true; and a step
never runs through the data more than once (train.grad_accum_steps is clamped to an epoch, and says so)."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
from rich.console import Console

from conftest import tiny_model_dir
from sftlab.config import load_config
from sftlab.data.cache import fingerprint
from sftlab.errors import ConfigError
from sftlab.runs import prepare, train
from sftlab.train.checkpoint import latest_checkpoint

QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."), ("Who wrote Hamlet?", "Shakespeare."),
      ("Color of the sky?", "Blue."), ("Name a prime number.", "Seven."), ("Say hi.", "Hi there!")]
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def write_data(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "method=lora",
                                  "lora.rank=4", "train.micro_batch_size=2", "train.max_steps=4",
                                  "train.save_every_steps=1", *overrides])


class Kill(Exception):
    pass


def killed_run(model_dir: Path, data: Path, out: Path, *overrides: str) -> None:
    """A run killed after step 2 (checkpoints step-1 and step-2 written)."""
    def kill_at_2(step: int) -> None:
        if step == 2:
            raise Kill()

    with pytest.raises(Kill):
        train(prepare(config(model_dir, data, out, *overrides), console=QUIET), console=QUIET, on_step=kill_at_2)
    assert latest_checkpoint(out).name == "step-2"


def recorded(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())["state"]["extra"]["data"]


@pytest.mark.parametrize("change", ["replaced", "same_size"])
def test_resuming_on_changed_data_is_refused_naming_both_fingerprints(model_dir, tmp_path, change) -> None:
    data = write_data(tmp_path / "train.jsonl", QA)
    out = tmp_path / "run"
    killed_run(model_dir, data, out)
    before = fingerprint(data)
    assert recorded(latest_checkpoint(out))["train"] == before  # what the checkpoints were trained on
    if change == "replaced":
        write_data(data, QA[::-1] + QA[:2])
    else:  # an edit in place that keeps the size: the digest, not size or time, decides
        text = data.read_text()
        data.write_text(text.replace("Paris.", "Rome!!"))
        assert data.stat().st_size == before["bytes"]
    after = fingerprint(data)
    with pytest.raises(ConfigError) as caught:
        prepare(config(model_dir, data, out), console=QUIET)
    message = str(caught.value)
    assert f"the data changed since {out / 'checkpoints' / 'step-2'} was written: data.train {data}: " in message
    for old, new in ((before, after),):
        assert f"{old['bytes']:,} bytes, modified {old['modified']}, blake2b {old['blake2b'][:12]} then" in message
        assert f"{new['bytes']:,} bytes, modified {new['modified']}, blake2b {new['blake2b'][:12]} now" in message
    assert "train.resume_on_new_data=true" in message and "--no-resume" in message
    assert latest_checkpoint(out).name == "step-2" and not (out / "adapter").exists()


def test_resume_on_new_data_continues_and_records_the_new_data(model_dir, tmp_path) -> None:
    data = write_data(tmp_path / "train.jsonl", QA)
    out = tmp_path / "run"
    killed_run(model_dir, data, out)
    write_data(data, QA[::-1])
    printed = io.StringIO()
    console = Console(file=printed, width=400)
    cfg = config(model_dir, data, out, "train.resume_on_new_data=true")
    result = train(prepare(cfg, console=console), console=console)
    assert result.steps == 4
    assert re.search(rf"train.resume_on_new_data: resuming {re.escape(str(out / 'checkpoints' / 'step-2'))} on "
                     rf"changed data \(data.train {re.escape(str(data))}: ", printed.getvalue())
    assert recorded(latest_checkpoint(out))["train"] == fingerprint(data)


def test_touching_the_data_without_changing_it_resumes(model_dir, tmp_path) -> None:
    data = write_data(tmp_path / "train.jsonl", QA)
    out = tmp_path / "run"
    killed_run(model_dir, data, out)
    os.utime(data, (1_000_000_000, 1_000_000_000))
    result = train(prepare(config(model_dir, data, out), console=QUIET), console=QUIET)
    assert result.steps == 4


def test_a_changed_eval_file_is_named_too(model_dir, tmp_path) -> None:
    data = write_data(tmp_path / "train.jsonl", QA)
    held = write_data(tmp_path / "eval.jsonl", QA[:2])
    out = tmp_path / "run"
    killed_run(model_dir, data, out, f"data.eval={held}")
    write_data(held, QA[2:4])
    with pytest.raises(ConfigError, match=f"was written: data.eval {re.escape(str(held))}: "):
        prepare(config(model_dir, data, out, f"data.eval={held}"), console=QUIET)


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accum_larger_than_the_data_is_clamped_with_a_message(model_dir, tmp_path, packing) -> None:
    """6 examples in micro-batches of 2 are 3 micro-batches an epoch; accumulating 30 ran through the data ten
    times per step. Clamped to the epoch, each example is summed once per step and the message says why."""
    data = write_data(tmp_path / "train.jsonl", QA)
    printed = io.StringIO()
    console = Console(file=printed, width=400)
    seen: list[str] = []
    import sftlab.train.loop as loop

    real = loop.make_batch

    def recording(setup, dataset, chosen, pad_id):
        batch = real(setup, dataset, chosen, pad_id)
        seen.extend(batch.where)
        return batch

    cfg = config(model_dir, data, tmp_path / "run", "train.grad_accum_steps=30", "train.max_steps=1",
                 f"data.packing={str(packing).lower()}", "data.max_seq_len=64")
    setup = prepare(cfg, console=console)
    per_epoch = loop.epoch_length(setup)
    loop.make_batch = recording
    try:
        result = train(setup, console=console)
    finally:
        loop.make_batch = real
    assert result.steps == 1
    assert sorted(seen) == sorted(setup.train_data.where(i) for i in range(len(QA)))  # each example once
    text = " ".join(printed.getvalue().split())
    unit = "packed rows" if packing else "examples"
    assert (f"train.grad_accum_steps=30 is more than the data holds: an epoch of 6 examples makes {per_epoch} "
            f"micro-batches of 2 {unit}; using grad_accum_steps={per_epoch}") in text
    assert "grad_accum_steps: 30" in (tmp_path / "run" / "config.yaml").read_text()  # the user's value is kept


def test_grad_accum_clamped_gives_the_steps_of_whole_epochs(model_dir, tmp_path) -> None:
    import sftlab.train.loop as loop

    data = write_data(tmp_path / "train.jsonl", QA)
    cfg = load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                                 "method=lora", "train.micro_batch_size=2", "train.grad_accum_steps=10",
                                 "train.epochs=3"])
    setup = prepare(cfg, console=QUIET)
    assert loop.epoch_length(setup) == 3 and loop.grad_accum_steps(setup) == 3
    assert loop.total_steps(setup) == 3  # one step per epoch, not one step over 3 epochs at once
    assert train(setup, console=QUIET).steps == 3
