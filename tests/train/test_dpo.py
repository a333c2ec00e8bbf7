"""Stage dpo through the one training loop: it learns a preference that holds on held-out pairs, an adapter run
holds one copy of the base weights, it resumes to the same weights, and it starts from an SFT run."""

from __future__ import annotations

import gc
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import only_for, tiny_model_dir
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.data.encode import IGNORE_INDEX, Encoder
from sftlab.data.preference import PairEncoder, read_pairs
from sftlab.data.templates import load_template
from sftlab.runs import prepare, train
from sftlab.train.checkpoint import latest_checkpoint

QUIET = Console(quiet=True)
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
ANIMALS = ["horse", "tiger", "zebra", "camel", "otter", "panda", "sheep", "whale"]
PROMPTS = {"fruit": ["Name a fruit.", "Which fruit?"], "animal": ["Name an animal.", "Which animal?"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """The rule: the chosen answer names a thing of the kind the prompt asks for, the rejected one a thing of
    the other kind. Every word is chosen under one prompt kind and rejected under the other, so no preference
    for a word alone fits: the model must read the prompt. 96 pairs train; the 32 held out are word pairings
    never seen together."""
    rng = random.Random(0)
    rows = [{"prompt": rng.choice(PROMPTS[kind]), "chosen": f"{good.capitalize()}.", "rejected": f"{bad.capitalize()}."}
            for kind, goods, bads in (("fruit", FRUITS, ANIMALS), ("animal", ANIMALS, FRUITS))
            for good in goods for bad in bads]
    rng.shuffle(rows)
    root = tmp_path_factory.mktemp("pairs")
    files = {"train": root / "train.jsonl", "held_out": root / "held_out.jsonl", "sft": root / "sft.jsonl"}
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in rows[32:]), encoding="utf-8")
    files["held_out"].write_text("".join(json.dumps(r) + "\n" for r in rows[:32]), encoding="utf-8")
    sft = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
           for r in rows[32:]]
    files["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft), encoding="utf-8")
    return files


def config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "stage=dpo",
                                  "data.cache=false", "train.micro_batch_size=8", "train.lr=5e-3", *overrides])


def run(cfg, **kwargs):
    return train(prepare(cfg, console=QUIET), console=QUIET, **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def formula_logps(model: torch.nn.Module, example) -> float:
    """Σ log softmax(full logits)[t-1, token t] over the scored tokens: independent of sftlab's loss code."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([example.input_ids])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[t - 1, token]) for t, (token, label) in enumerate(zip(example.input_ids, example.labels))
               if label != IGNORE_INDEX)


def preference_accuracy(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, path: Path) -> float:
    """The share of pairs whose chosen answer gains more log-probability over the reference than the rejected."""
    encoder = PairEncoder(Encoder(tokenizer, load_template("chatml", tokenizer)))
    right = total = 0
    for pair in read_pairs(path):
        encoded = encoder.encode(pair)
        chosen = formula_logps(policy, encoded.chosen) - formula_logps(reference, encoded.chosen)
        rejected = formula_logps(policy, encoded.rejected) - formula_logps(reference, encoded.rejected)
        right, total = right + (chosen > rejected), total + 1
    return right / total


def test_dpo_with_lora_through_the_cli_learns_the_preference_on_held_out_pairs(model_dir, pairs, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from sftlab.runs import load_for_inference

    out = tmp_path / "run"
    config_file = tmp_path / "dpo.yaml"
    config_file.write_text(f"model: {model_dir}\nmethod: lora\nstage: dpo\noutput_dir: {out}\n"
                           f"data:\n  train: {pairs['train']}\n  eval: {pairs['held_out']}\n  template: chatml\n"
                           "  cache: false\nlora:\n  rank: 8\ndpo:\n  beta: 0.1\n"
                           "train:\n  max_steps: 30\n  lr: 5e-3\n  micro_batch_size: 8\n  eval_every_steps: 15\n",
                           encoding="utf-8")
    assert main(["train", str(config_file)]) == 0
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    trained, tokenizer, _, _ = load_for_inference(str(out))  # the exported adapter on its base
    before = preference_accuracy(base, base, tokenizer, pairs["held_out"])
    after = preference_accuracy(trained.eval(), base, tokenizer, pairs["held_out"])
    print(f"held-out preference accuracy: {before:.3f} before, {after:.3f} after")
    assert before == 0.0  # the policy is the reference: every margin is 0, no pair is preferred yet
    assert after >= 0.9
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["eval_accuracy"] >= 0.9
    steps = [r for r in metrics(out) if "loss" in r]
    assert {"pairs", "rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= steps[0].keys()
    assert steps[0]["pairs"] == 8 and abs(steps[0]["margin"]) < 1e-6 and steps[-1]["margin"] > 0.5
    for name in ("adapter/adapter_model.safetensors", "report.html", "loss.png", "finished.json"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "pairs used" in page and "scored tokens" in page  # the report counts pairs, not sides
    assert "sftlab check (preference pairs)" in page and "length bias" in page  # and holds the pair check


def parameter_bytes() -> int:
    """Bytes of every distinct parameter and buffer storage held by any live nn.Module in this process."""
    gc.collect()
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated module objects warns
        warnings.simplefilter("ignore", FutureWarning)
        modules = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module)]
    for module in modules:
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def held_while_training(cfg) -> int:
    """Parameter bytes held at the end of the first step, over what was held before the run was prepared."""
    before = parameter_bytes()
    seen = []
    run(cfg, on_step=lambda step: seen.append(parameter_bytes()) if step == 1 else None)
    return seen[0] - before


@pytest.mark.parametrize("method, precompute, ratio", [("lora", False, 1.0), ("full", False, 2.0), ("full", True, 1.0)])
def test_parameter_memory_of_a_dpo_run_against_the_sft_run(model_dir, pairs, tmp_path, method, precompute,
                                                             ratio) -> None:
    # An adapter run takes its reference from the same weights (adapters disabled); full fine-tuning holds a frozen
    # copy unless the reference is precomputed. The measurement sees the copy, so it would see any other.
    common = [f"model={model_dir}", f"method={method}", "data.cache=false", "train.max_steps=2",
              "train.micro_batch_size=8"]
    sft = held_while_training(load_config(overrides=[*common, f"data.train={pairs['sft']}",
                                                     f"output_dir={tmp_path / 'sft'}"]))
    dpo = held_while_training(config(model_dir, pairs["train"], tmp_path / "dpo", *common,
                                     f"dpo.precompute_reference={str(precompute).lower()}"))
    print(f"{method}, precompute_reference={precompute}: DPO holds {dpo:,} parameter bytes, SFT {sft:,} "
          f"({dpo / sft:.3f}x)")
    assert dpo / sft == pytest.approx(ratio, rel=0.02)


class Kill(Exception):
    pass


@pytest.mark.parametrize("method, overrides", [("lora", ["data.packing=true", "data.max_seq_len=64"]),
                                               ("full", ["dpo.precompute_reference=true", "train.lr=1e-3"])])
def test_a_dpo_run_resumes_to_the_uninterrupted_weights(model_dir, pairs, tmp_path, method, overrides) -> None:
    from safetensors.torch import load_file

    common = [f"method={method}", "train.max_steps=6", "train.save_every_steps=3", "train.micro_batch_size=4",
              "train.warmup_steps=2", *overrides]
    run(config(model_dir, pairs["train"], tmp_path / "whole", *common))

    def kill_at_4(step: int) -> None:
        if step == 4:
            raise Kill()

    with pytest.raises(Kill):
        run(config(model_dir, pairs["train"], tmp_path / "killed", *common), on_step=kill_at_4)
    assert latest_checkpoint(tmp_path / "killed").name == "step-3"
    assert run(config(model_dir, pairs["train"], tmp_path / "killed", *common)).steps == 6
    whole = load_file(latest_checkpoint(tmp_path / "whole") / "trainable.safetensors")
    resumed = load_file(latest_checkpoint(tmp_path / "killed") / "trainable.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert [r["loss"] for r in metrics(tmp_path / "killed") if "loss" in r][-3:] == \
        [r["loss"] for r in metrics(tmp_path / "whole") if "loss" in r][-3:]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_precomputed_reference_gives_the_per_step_reference_s_losses(model_dir, pairs, tmp_path, method) -> None:
    losses = {}
    for precompute in ("false", "true"):
        out = tmp_path / precompute
        run(config(model_dir, pairs["train"], out, f"method={method}", "train.max_steps=3", "train.lr=1e-3",
                   f"dpo.precompute_reference={precompute}"))
        losses[precompute] = [r["loss"] for r in metrics(out) if "loss" in r]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
    assert losses["true"][0] == pytest.approx(0.6931, abs=1e-4)  # the policy starts as the reference: log 2


@pytest.mark.parametrize("init", ["continue", "merge"])
def test_dpo_starts_from_an_sft_run(model_dir, pairs, tmp_path, init) -> None:
    from sftlab.runs import load_for_inference

    sft = tmp_path / "sft"
    run(load_config(overrides=[f"model={model_dir}", f"data.train={pairs['sft']}", f"output_dir={sft}",
                               "data.cache=false", "train.max_steps=10", "train.lr=1e-2", "lora.rank=8"]))
    out = tmp_path / "dpo"
    run(config(model_dir, pairs["train"], out, "train.max_steps=3", "lora.rank=8", f"dpo.init_from={sft}",
               f"dpo.init={init}"))
    first = next(r for r in metrics(out) if "loss" in r)
    # The reference is the SFT model and the policy starts as it: the first step's margins are 0.
    assert abs(first["margin"]) < 1e-4 and first["loss"] == pytest.approx(0.6931, abs=1e-4)
    saved = load_config(out / "config.yaml")
    if init == "merge":  # the run's base is the merged SFT model, which its config names from now on
        assert saved.model.path == str(out / "base") and saved.dpo.init_from is None
        assert (out / "base" / "config.json").is_file()
    else:
        assert saved.dpo.init_from == str(sft)
    model, _, _, method = load_for_inference(str(out))  # the run dir loads for generate/chat
    assert method.name == "lora" and model is not None


@pytest.mark.parametrize("method, init", [("lora", "dpo.init=merge"), ("full", "dpo.init=continue")])
def test_a_dpo_run_from_an_sft_run_resumes_with_the_same_command(model_dir, pairs, tmp_path, method, init) -> None:
    """Its saved config names the model it really starts from (OUTPUT/base for a merged adapter, the SFT run's
    model/ for full fine-tuning) instead of dpo.init_from; the user's own command still resumes."""
    sft = tmp_path / "sft"
    options = only_for(method, "lora.rank=8")
    run(load_config(overrides=[f"model={model_dir}", f"data.train={pairs['sft']}", f"output_dir={sft}",
                               "data.cache=false", "train.max_steps=4", "train.lr=1e-2", f"method={method}",
                               *options]))
    common = (f"method={method}", "train.max_steps=4", "train.save_every_steps=1", *options,
              f"dpo.init_from={sft}", init)

    def kill_at_2(step: int) -> None:
        if step == 2:
            raise Kill()

    run(config(model_dir, pairs["train"], tmp_path / "whole", *common))
    with pytest.raises(Kill):
        run(config(model_dir, pairs["train"], tmp_path / "killed", *common), on_step=kill_at_2)
    assert run(config(model_dir, pairs["train"], tmp_path / "killed", *common)).steps == 4
    from safetensors.torch import load_file

    whole = load_file(latest_checkpoint(tmp_path / "whole") / "trainable.safetensors")
    resumed = load_file(latest_checkpoint(tmp_path / "killed") / "trainable.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_the_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "configs" / "dpo_lora.yaml")
    assert cfg.stage == "dpo" and cfg.method == "lora"
    assert len(list(read_pairs(Path(__file__).resolve().parents[2] / cfg.data.train))) == 3


def test_inspect_shows_each_pair_s_two_sides_with_the_answer_scored(model_dir, pairs, capsys) -> None:
    assert main(["inspect", str(pairs["held_out"]), "--model", str(model_dir), "--template", "chatml", "stage=dpo",
                 "-n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    first = json.loads(pairs["held_out"].read_text().splitlines()[0])
    assert f"[[{first['chosen']}<|im_end|>]]" in out and f"[[{first['rejected']}<|im_end|>]]" in out
    assert out.count("[[") == 2  # the prompt is never scored


def test_check_reports_on_pairs(model_dir, pairs, tmp_path, capsys) -> None:
    # The full report is tested in tests/data/test_pair_quality.py; here: the command reads a dpo config's pairs.
    assert main(["check", str(pairs["held_out"]), "--model", str(model_dir), "--template", "chatml", "stage=dpo",
                 "--format", "json", "--rejects", str(tmp_path / "rejects.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["pairs"], report["rejected"], report["contradicting"]) == (32, 32, {}, 0)
    assert report["ok"] and report["lengths"]["chosen"]["count"] == 32


@pytest.mark.parametrize("method, mode", [("lora", "ddp"), ("lora", "fsdp"), ("full", "ddp"), ("full", "fsdp")])
def test_two_processes_end_with_the_single_process_weights(model_dir, pairs, tmp_path, method, mode) -> None:
    # 2 processes x 2 pairs = one process x 2 pairs x accumulation 2. Five held-out pairs make three eval batches:
    # the second rank's last is a stand-in that must add nothing. Full fine-tuning: the frozen copy, replicated
    # under DDP, sharded like the policy under FSDP.
    from test_distributed import dist_weights, launch

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(pairs["held_out"].read_text().splitlines(keepends=True)[:5]), encoding="utf-8")
    shared = [f"method={method}", "train.max_steps=3", "train.micro_batch_size=2", "train.lr=1e-3",
              f"data.eval={held_out}", *(["lora.rank=4"] if method == "lora" else [])]
    single = run(config(model_dir, pairs["train"], tmp_path / "single", *shared, "train.grad_accum_steps=2"))
    reference = {k: v.float() for k, v in load_file_of(latest_checkpoint(single.output_dir)).items()}
    dist = tmp_path / "dist"
    launch(dist, [f"model={model_dir}", f"data.train={pairs['train']}", f"output_dir={dist}", "stage=dpo",
                  "data.cache=false", *shared, f"train.distributed={mode}"])
    got = dist_weights(dist)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy", "eval_margin"):
        want = [r[key] for r in metrics(tmp_path / "single") if key in r]
        assert [r[key] for r in metrics(dist) if key in r] == pytest.approx(want, rel=1e-5, abs=1e-6) and want


def load_file_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "trainable.safetensors")
