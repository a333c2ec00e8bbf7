"""The one training loop: it learns, accumulates gradients exactly, and resumes to the same weights."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import only_for, tiny_model_dir, write_qa_chats
from sftlab.config import load_config
from sftlab.data.templates import load_template
from sftlab.generate import generate
from sftlab.models.attention import packed_attention
from sftlab.runs import prepare, train
from sftlab.train.checkpoint import latest_checkpoint
from sftlab.train.loop import TrainingError

QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
      ("Who wrote Hamlet?", "Shakespeare wrote it."), ("Color of the sky?", "Blue, on a clear day."),
      ("Name a prime number.", "Seven."), ("Say hi.", "Hi there!")]
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_qa_chats(tmp_path_factory.mktemp("data") / "qa.jsonl", QA, system="Answer briefly.")


def config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={out}",
                                  "data.cache=false", "train.log_every_steps=1", *overrides])


def run(cfg, **kwargs):
    return train(prepare(cfg, console=QUIET), console=QUIET, **kwargs)


def trainable(setup_or_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(latest_checkpoint(setup_or_dir) / "trainable.safetensors")


@pytest.mark.parametrize("method, lr, steps", [("full", "3e-3", 40), ("lora", "1e-2", 40)])
def test_training_learns_and_answers_held_in_prompts(model_dir, data, tmp_path, method, lr, steps) -> None:
    cfg = config(model_dir, data, tmp_path / method, *only_for(method, f"method={method}", f"train.lr={lr}",
                 f"train.max_steps={steps}", "train.micro_batch_size=6", "train.warmup_steps=3", "lora.rank=8"))
    setup = prepare(cfg, console=QUIET)
    result = train(setup, console=QUIET)
    losses = [json.loads(line)["loss"] for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.1 * losses[0]
    template = load_template("auto", setup.tokenizer)
    for question, answer in QA:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
        assert generate(setup.model, setup.tokenizer, template, messages, temperature=0) == answer
    assert result.steps == steps and result.export_dir.is_dir()


def test_grad_accumulation_equals_one_big_batch(model_dir, data, tmp_path) -> None:
    # Micro-batches of 2 hold different numbers of supervised tokens; the step's loss is still the
    # mean over all of them, so 2 x 2 must give the weights of 4 x 1.
    common = ("method=full", "train.max_steps=1", "train.lr=1e-2", "train.max_grad_norm=null")
    big = prepare(config(model_dir, data, tmp_path / "big", "train.micro_batch_size=4", *common), console=QUIET)
    small = prepare(config(model_dir, data, tmp_path / "small", "train.micro_batch_size=2",
                           "train.grad_accum_steps=2", *common), console=QUIET)
    first = big.train_indices  # same seed, same order: the step sees the same four examples
    train(big, console=QUIET)
    train(small, console=QUIET)
    a, b = big.method.state_dict(big.model), small.method.state_dict(small.model)
    moved = 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-6, msg=name)
    reference = prepare(config(model_dir, data, tmp_path / "ref", "method=full"), console=QUIET)
    for name, value in reference.method.state_dict(reference.model).items():
        moved += int(not torch.equal(value, a[name]))
    assert moved > 0 and len(first) == len(QA)
    records = [json.loads(x) for x in (tmp_path / "small" / "metrics.jsonl").read_text().splitlines()]
    big = json.loads((tmp_path / "big" / "metrics.jsonl").read_text())
    assert records[0]["supervised_tokens"] == big["supervised_tokens"]


class Kill(Exception):
    pass


@pytest.mark.parametrize("method, packing", [("lora", "false"), ("full", "false"), ("lora", "true")])
def test_resume_after_a_kill_gives_the_uninterrupted_weights(model_dir, data, tmp_path, method, packing) -> None:
    # Packed rows of 160 tokens (2-3 examples each), 4 rows a batch: one step an epoch, 7 epochs.
    common = only_for(method, f"method={method}", "train.max_steps=7", "train.save_every_steps=3",
                      "train.micro_batch_size=4", "train.lr=5e-3", "lora.dropout=0.1", "train.warmup_steps=2",
                      f"data.packing={packing}", "data.max_seq_len=160")
    run(config(model_dir, data, tmp_path / "whole", *common))

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise Kill()

    with pytest.raises(Kill):
        run(config(model_dir, data, tmp_path / "killed", *common), on_step=kill_at_5)
    assert latest_checkpoint(tmp_path / "killed").name == "step-3"
    result = run(config(model_dir, data, tmp_path / "killed", *common))
    assert result.steps == 7
    whole, resumed = trainable(tmp_path / "whole"), trainable(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    lines = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line][-3:] == [5, 6, 7]  # (the probe's line follows step 7)


@pytest.mark.parametrize("packing", [False, True])
def test_epochs_cover_every_example_once_per_epoch(model_dir, data, tmp_path, monkeypatch, packing) -> None:
    import sftlab.train.loop as loop

    # Packed: rows of 160 tokens hold two of these 53-79 token examples, so 6 examples make 3 rows.
    cfg = config(model_dir, data, tmp_path / "epochs", "method=lora", "train.epochs=2", "train.micro_batch_size=2",
                 f"data.packing={str(packing).lower()}", "data.max_seq_len=160")
    setup = prepare(cfg, console=QUIET)
    seen: list[list[str]] = []
    real = loop.make_batch

    def spy(setup_, dataset, chosen, pad_id):
        batch = real(setup_, dataset, chosen, pad_id)
        seen.append(list(batch.where))
        assert batch.packed == packing
        return batch

    monkeypatch.setattr(loop, "make_batch", spy)
    result = train(setup, console=QUIET)
    per_epoch = len(seen) // 2
    assert result.steps == 2 * per_epoch  # the step count known up front matches the plan
    first, second = [w for b in seen[:per_epoch] for w in b], [w for b in seen[per_epoch:] for w in b]
    assert sorted(first) == sorted(second) == sorted(f"{data}:{i}" for i in range(1, 7))
    if packing:
        assert per_epoch == 2  # 3 rows, 2 per micro-batch (unpacked: 3 batches of 2 examples)


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "adapter", "lora.dora=true"])
def test_a_packed_step_equals_an_unpacked_step(model_dir, data, tmp_path, method) -> None:
    # One step over all six examples: packed into one padding-free row, or padded in one micro-batch. The
    # step's mean loss and its gradients must agree to fp32 rounding. (Weights after an AdamW step are no
    # fair comparison: its first update is lr * g / (|g| + eps), which magnifies rounding where g ~ eps.)
    import sftlab.train.loop as loop
    from sftlab.train.loss import loss_sum

    method = method if "=" in method else f"method={method}"
    common = (method, "train.max_steps=1", "train.micro_batch_size=6", "train.lr=1e-2", "data.max_seq_len=400")
    setups = {"unpacked": prepare(config(model_dir, data, tmp_path / "unpacked", *common), console=QUIET),
              "packed": prepare(config(model_dir, data, tmp_path / "packed", *common, "data.packing=true"),
                                console=QUIET)}
    grads = {}
    for name, setup in setups.items():
        plan = loop.epoch_plan(setup, 0)
        assert len(plan) == 1 and sorted(plan[0]) == list(range(6))
        batch = loop.make_batch(setup, setup.train_data, plan[0], setup.tokenizer.pad_token_id)
        assert batch.packed == (name == "packed")
        assert bool(batch.shared_tokens) == (name == "packed")  # the system prompt runs once (data.share_prefixes)
        with packed_attention(setup.model) if batch.packed else contextlib.nullcontext():
            (loss_sum(setup.model, batch, setup.method) / batch.num_supervised).backward()
        grads[name] = {k: p.grad.clone() for k, p in setup.method.trainable_parameters(setup.model).items()}
        setup.model.zero_grad()
        train(setup, console=QUIET)
    for key, grad in grads["unpacked"].items():
        torch.testing.assert_close(grads["packed"][key], grad, rtol=1e-4, atol=1e-6, msg=key)
    logged = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]) for name in setups}
    assert logged["packed"]["loss"] == pytest.approx(logged["unpacked"]["loss"], rel=1e-5)
    assert logged["packed"]["supervised_tokens"] == logged["unpacked"]["supervised_tokens"]
    assert logged["packed"]["tokens"] == logged["unpacked"]["tokens"] == sum(setups["packed"].train_data.lengths)
    assert setups["packed"].model.config._attn_implementation == "sdpa"  # restored after training


def test_shared_prefixes_train_as_unshared_rows_do(model_dir, data, tmp_path) -> None:
    # data.share_prefixes (on by default) against off, three LoRA steps over packed rows whose conversations all
    # begin with the same system prompt: the same losses and weights up to fp32 rounding, fewer tokens run.
    common = ("method=lora", "train.max_steps=3", "train.micro_batch_size=1", "data.packing=true",
              "data.max_seq_len=160", "train.lr=1e-3")
    outputs = {}
    for share in ("true", "false"):
        setup = prepare(config(model_dir, data, tmp_path / share, *common, f"data.share_prefixes={share}"),
                        console=QUIET)
        console = Console(file=io.StringIO(), width=200)
        train(setup, console=console)
        weights = {k: v.detach().clone() for k, v in setup.method.state_dict(setup.model).items()}
        logged = [json.loads(line) for line in (tmp_path / share / "metrics.jsonl").read_text().splitlines()]
        outputs[share] = (weights, [r for r in logged if "loss" in r], console.file.getvalue())
    (shared_w, shared_log, shared_out), (plain_w, plain_log, plain_out) = outputs["true"], outputs["false"]
    assert [r["loss"] for r in shared_log] == pytest.approx([r["loss"] for r in plain_log], rel=1e-5)
    assert [r["tokens"] for r in shared_log] == [r["tokens"] for r in plain_log]
    assert all(r["tokens_shared"] > 0 for r in shared_log) and "tokens_shared" not in plain_log[0]
    for key, value in plain_w.items():
        torch.testing.assert_close(shared_w[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert "shared prefixes:" in shared_out and "shared prefixes:" not in plain_out
    # train.compile: no sharing (each row's prefixes would specialise the compiled layers anew)
    import sftlab.train.loop as loop

    compiled = prepare(config(model_dir, data, tmp_path / "compiled", *common, "train.compile=true"), console=QUIET)
    assert not loop.objective_of(compiled).share_prefixes


def test_profile_splits_each_step_into_phases(model_dir, data, tmp_path) -> None:
    cfg = config(model_dir, data, tmp_path / "profile", "method=lora", "train.max_steps=2", "train.profile=true",
                 "train.grad_accum_steps=2", "train.micro_batch_size=2")
    run(cfg)
    for line in (tmp_path / "profile" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        phases = [record[f"time_{p}"] for p in ("data", "forward", "backward", "optimizer")]
        assert all(t > 0 for t in phases) and sum(phases) <= record["seconds"]


def test_nan_loss_stops_with_the_rows_named(model_dir, data, tmp_path, monkeypatch) -> None:
    import sftlab.train.loss as loss_module

    real = loss_module.loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, method=None):
        calls["n"] += 1
        value = real(model, batch, method)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(loss_module, "loss_sum", poisoned)
    cfg = config(model_dir, data, tmp_path / "nan", "method=lora", "train.max_steps=5", "train.save_every_steps=1",
                 "train.micro_batch_size=2")
    with pytest.raises(TrainingError, match=r"loss became nan at step 3 \(rows .*qa.jsonl:\d"):
        run(cfg)
    assert latest_checkpoint(tmp_path / "nan").name == "step-2"


def test_gradient_checkpointing_gives_the_same_step(model_dir, data, tmp_path) -> None:
    common = ("method=lora", "train.max_steps=2", "train.micro_batch_size=3", "lora.rank=4")
    plain = prepare(config(model_dir, data, tmp_path / "plain", *common), console=QUIET)
    recomputed = prepare(config(model_dir, data, tmp_path / "gc", *common, "train.gradient_checkpointing=true"),
                         console=QUIET)
    train(plain, console=QUIET)
    train(recomputed, console=QUIET)
    a, b = plain.method.state_dict(plain.model), recomputed.method.state_dict(recomputed.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    loss = [json.loads(x)["loss"] for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    loss_gc = [json.loads(x)["loss"] for x in (tmp_path / "gc" / "metrics.jsonl").read_text().splitlines()]
    assert loss == pytest.approx(loss_gc, rel=1e-5)


def test_held_out_fraction_is_evaluated_and_early_stopping_stops(model_dir, data, tmp_path) -> None:
    cfg = config(model_dir, data, tmp_path / "eval", "method=lora", "data.eval_fraction=0.34", "train.max_steps=50",
                 "train.eval_every_steps=1", "train.early_stopping_patience=2", "train.lr=0.5",
                 "train.schedule=constant", "train.micro_batch_size=2")
    setup = prepare(cfg, console=QUIET)
    assert len(setup.eval_indices) == 2 and len(setup.train_indices) == 4
    assert not set(setup.eval_indices) & set(setup.train_indices)
    result = train(setup, console=QUIET)
    records = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert result.steps < 50 and len(evals) == result.steps  # a huge lr makes eval loss stop improving
    best = min(range(len(evals)), key=evals.__getitem__)
    assert len(evals) - 1 - best == 2  # stopped exactly `patience` evaluations after the best
    assert all("eval_perplexity" in r for r in records if "eval_loss" in r)


def test_setup_prints_the_trainable_share(model_dir, data, tmp_path) -> None:
    console = Console(record=True, width=200)
    prepare(config(model_dir, data, tmp_path / "share", "method=lora", "lora.rank=4"), console=console)
    text = console.export_text()
    import re

    match = re.search(r"method lora: trainable (\d+\.\d\d)% — (\d+\.\d\d)M of (\d+\.\d\d)M", text)
    assert match, text
    assert 0 < float(match.group(1)) < 20


def test_a_checkpoint_resumes_only_under_the_world_size_that_wrote_it(model_dir, data, tmp_path) -> None:
    from sftlab.errors import SftlabError
    from sftlab.train import checkpoint
    from sftlab.train.distributed import Dist

    setup = prepare(config(model_dir, data, tmp_path / "one", "method=lora", "train.max_steps=1"), console=QUIET)
    train(setup, console=QUIET)
    params = setup.method.trainable_parameters(setup.model)
    optimizer = torch.optim.AdamW(params.values())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(SftlabError, match="written by 1 processes and this run has 2; resume with the same number"):
        checkpoint.load_checkpoint(latest_checkpoint(tmp_path / "one"), optimizer=optimizer, scheduler=scheduler,
                                   method=setup.method, model=setup.model, ctx=Dist(rank=0, world=2, mode="ddp"))
