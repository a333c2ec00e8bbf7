"""Stage kto: the loss equals TRL 1.16's KTOTrainer (KL estimate from mismatched pairs in the batch), full and
LoRA; feedback rows read with file:line errors; `check` warns on unbalanced labels and proposes the weights; a run
SIGKILLed mid-way resumes to the uninterrupted weights."""

from __future__ import annotations

import copy
import json
import math
import random
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import assert_same_weights, drive, finish, logged_steps
from test_preference import load, policy
from test_reference_free import copy_lora_into_peft

from conftest import tiny_model_dir
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.data.encode import Encoder
from sftlab.data.feedback import FeedbackEncoder, collate_feedback, read_feedback, to_feedback
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError, DataError
from sftlab.train.preference import KTOForward

ROWS = [
    {"prompt": "What is 2+2?", "completion": "It is 4.", "label": True},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
     "completion": [{"role": "assistant", "content": "Go away."}], "label": False},
    {"prompt": "Capital of France?", "completion": "Paris.", "label": True},
    {"prompt": "Capital of Italy?", "completion": "Lyon, I think.", "label": False},
    {"prompt": "Name a fruit.", "completion": "A tiger.", "label": False},
]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango"]
ANIMALS = ["horse", "tiger", "zebra", "camel", "otter", "panda"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("kto") / "base", init_range=0.2)


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory) -> Path:
    """Answers of the asked kind are desirable, of the other kind undesirable: 72 rows, 2 undesirable per
    desirable (unbalanced, as product feedback often is)."""
    rng = random.Random(0)
    rows = []
    for kind, goods, bads in (("fruit", FRUITS, ANIMALS), ("animal", ANIMALS, FRUITS)):
        for word in goods:
            rows.append({"prompt": f"Name a {kind}.", "completion": f"{word.capitalize()}.", "label": True})
            for bad in rng.sample(bads, 2):
                rows.append({"prompt": f"Name a {kind}.", "completion": f"{bad.capitalize()}.", "label": False})
    rng.shuffle(rows)
    path = tmp_path_factory.mktemp("feedback") / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def encoded(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = FeedbackEncoder(Encoder(tokenizer, load_template("chatml", tokenizer)))
    rows = [to_feedback(row, f"t:{i}") for i, row in enumerate(ROWS, start=1)]
    return encoder.encode_batch(rows), [r.desirable for r in rows], tokenizer


def kto_trainer(tmp_path, model, tokenizer, *, ref_model=None, peft_config=None):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, desirable_weight=1.5, undesirable_weight=0.8,
                         report_to="none", use_cpu=True, bf16=False, max_length=None,
                         per_device_train_batch_size=len(ROWS))
    dataset = datasets.Dataset.from_list([{"prompt": "Q?", "completion": "A.", "label": True},
                                          {"prompt": "Q?", "completion": "B.", "label": False}])
    return trl.KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)


def trl_features(examples, labels) -> list[dict]:
    """Our tokens as TRL's KTO dataset holds them: prompt ids, completion ids, and the KL completion of each
    example: the previous example's completion (TRL rotates the completions by one within a batch)."""
    starts = [next(t for t, label in enumerate(e.labels) if label != -100) for e in examples]
    completions = [list(e.input_ids[s:]) for e, s in zip(examples, starts)]
    return [{"prompt_ids": list(e.input_ids[:s]), "completion_ids": completions[i],
             "KL_completion_ids": completions[i - 1], "label": labels[i]}
            for i, (e, s) in enumerate(zip(examples, starts))]


def moved_policy(model_dir: Path, method: str, batch):
    """The tiny model under `method`, its trained parameters moved off the base and then up the log-probs of the
    batch's sequences (as KTO training moves them), so that the reference-KL estimate is positive (it is clamped
    at 0) and really enters the loss."""
    from sftlab.train.preference import kto_reference_logps

    model, chosen = policy(model_dir, method)
    params = list(chosen.trainable_parameters(model).values())
    optimizer = torch.optim.SGD(params, lr=0.05 if method == "lora" else 0.02)
    for _ in range(6):
        optimizer.zero_grad()
        whole = replace(batch, continuations=None)  # each sequence its own forward: all 2B with gradients
        (-kto_reference_logps(model, whole).mean()).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, chosen


@pytest.mark.parametrize("method", ["full", "lora"])
def test_loss_equals_trl_kto_trainer(model_dir, tmp_path, method) -> None:
    examples, labels, tokenizer = encoded(model_dir)
    batch = collate_feedback(examples, labels, pad_id=tokenizer.pad_token_id, max_seq_len=None)
    model, chosen = moved_policy(model_dir, method, batch)
    if method == "full":
        trainer = kto_trainer(tmp_path, copy.deepcopy(model), tokenizer, ref_model=load(model_dir))
        engine = KTOForward(model, chosen, beta=0.3, desirable_weight=1.5, undesirable_weight=0.8,
                            reference_model=load(model_dir))
    else:
        peft = pytest.importorskip("peft")
        trainer = kto_trainer(tmp_path, load(model_dir), tokenizer,
                              peft_config=peft.LoraConfig(r=4, lora_alpha=32.0, target_modules="all-linear",
                                                          lora_dropout=0.0))
        copy_lora_into_peft(model, trainer.model)
        engine = KTOForward(model, chosen, beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(trl_features(examples, labels)))
    loss_sum, sums = engine(batch)
    ours = loss_sum / len(examples)
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    # The padded policy rows (what soft-prompt methods run) give the same loss as the packed ones.
    padded = collate_feedback(examples, labels, pad_id=tokenizer.pad_token_id, max_seq_len=None, packed=False)
    assert not padded.examples.packed and batch.examples.packed and batch.sequences.packed
    assert abs(engine(padded)[0].item() / len(examples) - theirs.item()) < 1e-5
    mode = "train" if trainer.model.training else "eval"
    assert trainer._metrics[mode]["kl"][-1] > 0  # a real KL estimate (clamped at 0 otherwise), and the same
    assert trainer._metrics[mode]["kl"][-1] == pytest.approx(sums[3].item() / len(examples), abs=1e-5)
    assert theirs.item() != pytest.approx((1.5 * 2 + 0.8 * 3) / 2 / len(ROWS), abs=1e-3)  # the policy moved


@pytest.mark.parametrize("method", ["full", "lora"])
def test_kl_sequences_continuing_the_prompts_equal_their_own_forwards(model_dir, method) -> None:
    """The KL sequences run as continuations of the examples' prompts (models/shared_prefix.py): the same loss,
    metrics, gradients and reference log-probs as running each of the 2B sequences whole; also when the KL
    sequences are cut by max_seq_len, down to a single completion token (an empty continuation)."""
    from sftlab.train.preference import batch_logps, kto_reference_logps, packed_rows, shared_logps

    examples, labels, tokenizer = encoded(model_dir)
    prompts = [next(t for t, label in enumerate(e.labels) if label != -100) for e in examples]
    for limit in (None, max(prompts) + 1):
        batch = collate_feedback(examples, labels, pad_id=tokenizer.pad_token_id, max_seq_len=limit)
        assert batch.continuations is not None
        if limit is not None:
            assert min(np.diff(batch.continuations.row.cu_seqlens.numpy())) == 0  # some KL completion is 1 token
        model, chosen = moved_policy(model_dir, method, batch)
        engine = KTOForward(model, chosen, beta=0.3, desirable_weight=1.5, undesirable_weight=0.8,
                            reference_model=load(model_dir) if method == "full" else None)
        results = []
        for variant in (batch, replace(batch, continuations=None)):
            with torch.no_grad():
                results.append((*engine(variant), kto_reference_logps(load(model_dir), variant)))
        (loss, sums, reference), (loss2, sums2, reference2) = results
        assert sums[3] > 0  # a real KL estimate
        torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sums, sums2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reference, reference2, atol=1e-5, rtol=1e-5)
        # The gradients through the examples' log-probs: the same. (The moved policy's loss itself is too ill-
        # conditioned to compare its gradients: a 1e-6 change of the KL estimate moves some by 1e-3.)
        weights = torch.linspace(-1.0, 2.0, len(examples))
        grads = []
        for shared in (True, False):
            model.zero_grad(set_to_none=True)
            if shared:
                logps = shared_logps(model, batch, chosen)[0]
            else:
                with packed_rows(model, batch.examples):
                    logps = batch_logps(model, batch.examples, batch.example_index, len(examples), chosen)
            (logps * weights).sum().backward()
            grads.append({n: p.grad.clone() for n, p in chosen.trainable_parameters(model).items()})
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_feedback_rows_and_their_errors(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]) + json.dumps({"prompt": "Q", "completion": "A",
                                                                                  "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:3.*'label' is \"yes\"; expected true"):
        list(read_feedback(path))
    got = list(read_feedback(path, on_bad_row="skip"))
    assert [(r.prompt[-1].content, r.completion.content, r.desirable) for r in got] == \
        [("What is 2+2?", "It is 4.", True), ("Hi!", "Go away.", False)]  # the string and conversational forms
    path.write_text(json.dumps({"prompt": "Q", "label": True}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1.*'completion'"):
        list(read_feedback(path))
    path.write_text(json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1.*not a feedback row"):
        list(read_feedback(path))


def test_kto_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="kto.beta is set, but stage is sft"):
        load_config(overrides=["kto.beta=0.2"])
    with pytest.raises(ConfigError, match="kto.undesirable_weight must be positive"):
        load_config(overrides=["stage=kto", "kto.undesirable_weight=0"])
    with pytest.raises(ConfigError, match="train.micro_batch_size to 2 or more"):
        load_config(overrides=["stage=kto", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError, match="data.packing is not available for stage kto"):
        load_config(overrides=["stage=kto", "data.packing=true"])


def check(model_dir, data, tmp_path, capsys, *overrides) -> dict:
    code = main(["check", str(data), "--model", str(model_dir), "--template", "chatml", "stage=kto", *overrides,
                 "--format", "json", "--rejects", str(tmp_path / "rejects.jsonl")])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 1)
    return report


def test_check_warns_on_unbalanced_feedback_and_proposes_the_weights(model_dir, feedback_file, tmp_path, capsys):
    report = check(model_dir, feedback_file, tmp_path, capsys)
    assert (report["rows"], report["examples"], report["desirable"], report["undesirable"]) == (36, 36, 12, 24)
    assert report["ratio"] == pytest.approx(0.5)
    low, high = report["proposal"]["desirable_weight"]  # λ_D·12 / (1·24) in [1, 4/3]
    assert (low, high) == (2.0, pytest.approx(2.667, abs=1e-3))
    assert report["proposal"]["undesirable_weight"] == [pytest.approx(0.375), 0.5]
    assert any("kto.desirable_weight in [2, 2.667]" in w for w in report["warnings"])
    balanced = check(model_dir, feedback_file, tmp_path, capsys, "kto.desirable_weight=2.2")
    assert balanced["proposal"] is None and balanced["warnings"] == [] and balanced["ok"]


def test_inspect_shows_the_completion_scored(model_dir, feedback_file, capsys) -> None:
    assert main(["inspect", str(feedback_file), "--model", str(model_dir), "--template", "chatml", "stage=kto",
                 "-n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    first = json.loads(feedback_file.read_text().splitlines()[0])
    assert f"[[{first['completion']}<|im_end|>]]" in out and out.count("[[") == 1


def kto_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "stage=kto", "data.cache=false",
            "method=lora", "lora.rank=4", "train.max_steps=6", "train.save_every_steps=2", "train.micro_batch_size=4",
            "train.lr=5e-3", "train.warmup_steps=1", "kto.desirable_weight=2.2", "data.template=chatml"]


def test_a_kto_run_sigkilled_mid_way_resumes_to_the_uninterrupted_weights(model_dir, feedback_file, tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("train:\n  log_every_steps: 1\n", encoding="utf-8")
    whole = tmp_path / "whole"
    assert main(["train", str(config_file), *kto_args(model_dir, feedback_file, whole)]) == 0
    out = tmp_path / "run"
    code, err = finish(drive(config_file, kto_args(model_dir, feedback_file, out), "--kill", "step:3"))
    assert code == -signal.SIGKILL, err[-3000:]
    code, err = finish(drive(config_file, kto_args(model_dir, feedback_file, out)))
    assert code == 0, err[-3000:]
    assert logged_steps(out) == list(range(1, 7))
    assert_same_weights(out, whole)
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert {"examples", "desirable", "kl", "rewards_chosen", "rewards_rejected", "margin"} <= steps[-1].keys()
    assert steps[-1]["margin"] > steps[0]["margin"]
    assert (whole / "report.html").is_file()


def test_kto_trains_on_two_sources_each_with_its_labels_and_eval_per_source(model_dir, feedback_file, tmp_path):
    """data.train as a list: the sources' examples and labels laid end to end, an eval loss per source."""
    from rich.console import Console

    from sftlab.runs import prepare, train

    rows = feedback_file.read_text(encoding="utf-8").splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    half = len(rows) // 2
    first.write_text("".join(rows[:half]), encoding="utf-8")
    second.write_text("".join(rows[half:]), encoding="utf-8")
    out = tmp_path / "run"
    args = [a for a in kto_args(model_dir, feedback_file, out) if not a.startswith(("data.train=", "train.save"))]
    setup = prepare(load_config(overrides=[*args, f"data.train=[{first}, {second}]", "data.eval_fraction=0.25",
                                           "train.max_steps=2"]), console=Console(quiet=True))
    labels = [json.loads(row)["label"] for row in rows]
    assert setup.train_data.desirable.tolist() == labels
    assert [setup.train_data.where(i) for i in (0, half)] == [f"{first}:1", f"{second}:1"]
    assert sorted(setup.eval_groups) == ["first.jsonl", "second.jsonl"]
    assert all(len(v) for v in setup.eval_groups.values())
    train(setup, console=Console(quiet=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = [r for r in records if "eval_loss" in r][-1]
    assert all(math.isfinite(last[f"eval_loss/{name}"]) for name in ("first.jsonl", "second.jsonl"))
