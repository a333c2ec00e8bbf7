"""ORPO and SimPO (stages orpo, simpo): the loss of a batch equals an independently written formula and TRL 1.16's
ORPOTrainer / CPOTrainer(loss_type=simpo) on the same model and tokens, full and LoRA; no reference is kept."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import replace

import pytest
import test_dpo
import test_preference
import torch
from rich.console import Console
from test_dpo import config, held_while_training, metrics, run
from test_preference import ROWS, encoded_pairs, load, policy

from sftlab.config import load_config
from sftlab.data.encode import IGNORE_INDEX
from sftlab.data.preference import collate_pairs, with_chosen_context
from sftlab.models.attention import packed_attention
from sftlab.runs import prepare
from sftlab.train.preference import ReferenceFreeForward

# Fixtures shared with their home modules: bound by assignment so that pytest finds them here by name.
pairs, model_dir = test_dpo.pairs, test_preference.model_dir


def full_logprobs(model: torch.nn.Module, example) -> torch.Tensor:
    """log softmax of the full logits, (T, V), one sequence alone: independent of sftlab's head and batching."""
    return model(input_ids=torch.tensor([example.input_ids])).logits[0].float().log_softmax(-1)


def formula_orpo(model, pairs, *, lam: float, nll: str) -> torch.Tensor:
    """Hong et al. 2024 written out: NLL (a token mean over the batch) + λ·mean over pairs of −log σ(lo_w − lo_l),
    lo = log(p / (1 − p)) with p = exp(mean log-prob of the answer's scored tokens)."""
    nll_sum, nll_tokens, odds = 0.0, 0, []
    for pair in pairs:
        averages = []
        for side in (pair.chosen, pair.rejected):
            logprobs = full_logprobs(model, side)
            scored = [logprobs[t - 1, tok] for t, (tok, lab) in enumerate(zip(side.input_ids, side.labels))
                      if t > 0 and lab != IGNORE_INDEX]
            averages.append(torch.stack(scored).mean())
            if side is pair.chosen:
                trained = scored if nll == "answer" else [logprobs[t - 1, tok] for t, tok in
                                                         enumerate(side.input_ids) if t > 0]
                nll_sum, nll_tokens = nll_sum - torch.stack(trained).sum(), nll_tokens + len(trained)
        p_w, p_l = averages[0].exp(), averages[1].exp()
        log_odds = torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))
        odds.append(-torch.log(torch.sigmoid(log_odds)))
    return nll_sum / nll_tokens + lam * torch.stack(odds).mean()


def our_loss(engine, pairs, *, pad_id: int, packed: bool = False, context: bool = False) -> torch.Tensor:
    batch = collate_pairs([(p.chosen, p.rejected) for p in pairs], pad_id=pad_id, packed=packed)
    if context:
        batch = with_chosen_context(batch, [p.chosen for p in pairs])
    loss_sum, _ = engine(batch)
    return loss_sum / len(pairs)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("nll", ["answer", "sequence"])
def test_orpo_loss_and_gradients_equal_the_formula(model_dir, method, nll) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, method)
    engine = ReferenceFreeForward(model, chosen, loss="orpo", lambda_=0.3)
    ours = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id, context=nll == "sequence")
    ours.backward()
    params = chosen.trainable_parameters(model)
    our_grads = {name: p.grad.clone() for name, p in params.items()}
    model.zero_grad()
    want = formula_orpo(model, pairs, lam=0.3, nll=nll)
    want.backward()
    assert abs(ours.item() - want.item()) < 1e-5, (ours.item(), want.item())
    for name, param in params.items():
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(our_grads[name], param.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_the_two_orpo_nll_terms_differ_and_packing_changes_nothing(model_dir) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, "lora")
    engine = ReferenceFreeForward(model, chosen, loss="orpo", lambda_=0.1)
    with torch.no_grad():
        answer = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id)
        sequence = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id, context=True)
        with packed_attention(model):
            packed = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id, packed=True, context=True)
    assert abs(answer.item() - sequence.item()) > 1e-3  # the prompt tokens really count under nll=sequence
    torch.testing.assert_close(packed, sequence, rtol=1e-5, atol=1e-6)


def trl_features(pairs) -> list[dict]:
    """Our tokens in the form TRL's ORPO/CPO tokenize_row produces: each side's prompt + answer ids, the prompt
    labelled -100 (split where our answer starts)."""
    features = []
    for p in pairs:
        row = {"prompt_input_ids": p.chosen.input_ids[:p.prompt_tokens],
               "prompt_attention_mask": [1] * p.prompt_tokens}
        for name, side in (("chosen", p.chosen), ("rejected", p.rejected)):
            row[f"{name}_input_ids"] = list(side.input_ids)
            row[f"{name}_attention_mask"] = [1] * len(side.input_ids)
            row[f"{name}_labels"] = [IGNORE_INDEX] * p.prompt_tokens + list(side.input_ids[p.prompt_tokens:])
        features.append(row)
    return features


def trl_trainer(kind: str, tmp_path, model, tokenizer, *, peft_config=None):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    common = dict(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=512,
                  per_device_train_batch_size=len(ROWS))
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args, trainer = ORPOConfig(beta=0.3, **common), ORPOTrainer
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.5, simpo_gamma=0.7, **common)
        trainer = CPOTrainer
    dataset = datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    return trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)


def ours_for(kind: str, model, chosen) -> ReferenceFreeForward:
    if kind == "orpo":
        return ReferenceFreeForward(model, chosen, loss="orpo", lambda_=0.3)
    return ReferenceFreeForward(model, chosen, loss="simpo", beta=2.5, gamma=0.7)


def copy_lora_into_peft(model, peft_model) -> None:
    from sftlab.methods.lora import lora_modules

    with torch.no_grad():
        modules = lora_modules(model)
        assert len(modules) == 14  # 7 linear layers x 2 decoder layers, as PEFT's all-linear
        for name, module in modules.items():
            target = peft_model.get_base_model().get_submodule(name)
            target.lora_A["default"].weight.copy_(module.A)
            target.lora_B["default"].weight.copy_(module.B)
    assert peft_model.peft_config["default"].lora_alpha / 4 == next(iter(modules.values())).scaling


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_loss_equals_trl_orpo_and_cpo_simpo_trainers(model_dir, tmp_path, kind, method) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, method)
    if method == "full":
        trainer = trl_trainer(kind, tmp_path, copy.deepcopy(model), tokenizer)
    else:
        peft = pytest.importorskip("peft")
        trainer = trl_trainer(kind, tmp_path, load(model_dir), tokenizer,
                              peft_config=peft.LoraConfig(r=4, lora_alpha=32.0, target_modules="all-linear",
                                                          lora_dropout=0.0))
        copy_lora_into_peft(model, trainer.model)
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(trl_features(pairs)))
    # TRL's ORPOTrainer trains the NLL over the chosen prompt and answer: our orpo.nll=sequence.
    ours = our_loss(ours_for(kind, model, chosen), pairs, pad_id=tokenizer.pad_token_id, context=kind == "orpo")
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    assert theirs.item() > 1e-3 and theirs.item() != pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_a_reference_free_full_run_holds_the_parameter_bytes_of_sft(model_dir, pairs, tmp_path, stage) -> None:
    # DPO with full fine-tuning holds twice SFT's (a frozen reference copy, tests/train/test_dpo.py); these none.
    common = [f"model={model_dir}", "method=full", "data.cache=false", "train.max_steps=2", "train.micro_batch_size=8"]
    sft = held_while_training(load_config(overrides=[*common, f"data.train={pairs['sft']}",
                                                     f"output_dir={tmp_path / 'sft'}"]))
    cfg = config(model_dir, pairs["train"], tmp_path / stage, *common, f"stage={stage}")
    ours = held_while_training(cfg)
    print(f"{stage}: {ours:,} parameter bytes, SFT {sft:,} ({ours / sft:.3f}x)")
    assert ours / sft == pytest.approx(1.0, rel=0.02)
    console = Console(record=True, width=200, file=io.StringIO())  # and the run says so where memory is reported
    setup = prepare(replace(cfg, output_dir=str(tmp_path / "said")), console=console)
    assert setup.reference_model is None
    assert f"{stage}: no reference model (reference-free: no second copy of the weights" in console.export_text()


@pytest.mark.parametrize("stage, extra", [("orpo", ["orpo.nll=sequence", "orpo.lambda=0.5"]),
                                          ("simpo", ["simpo.beta=2.0", "simpo.gamma=0.5"])])
def test_a_lora_run_learns_the_preference_and_logs_its_metrics(model_dir, pairs, tmp_path, stage, extra) -> None:
    out = tmp_path / stage
    run(config(model_dir, pairs["train"], out, "method=lora", "lora.rank=8", "train.max_steps=20", "train.lr=1e-2",
               f"data.eval={pairs['held_out']}", *extra, f"stage={stage}"))
    steps = [r for r in metrics(out) if "loss" in r]
    wanted = {"pairs", "rewards_chosen", "rewards_rejected", "margin", "accuracy"}
    assert wanted | ({"log_odds_ratio", "nll"} if stage == "orpo" else set()) <= steps[0].keys()
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["margin"] > steps[0]["margin"]
    final = [r for r in metrics(out) if "eval_loss" in r][-1]
    assert final["eval_accuracy"] > 0.5, final
    saved = load_config(out / "config.yaml")  # the run dir's config loads back with the stage's settings
    assert saved.stage == stage and (saved.orpo.nll == "sequence" if stage == "orpo" else saved.simpo.gamma == 0.5)


@pytest.mark.parametrize("name", ["orpo_lora", "simpo_lora", "kto_lora", "ipo_lora"])
def test_the_example_configs_are_valid(name) -> None:
    from pathlib import Path

    from sftlab.data.feedback import read_feedback
    from sftlab.data.preference import read_pairs

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "examples" / "configs" / f"{name}.yaml")
    objective = name.split("_")[0]
    assert cfg.stage == {"ipo": "dpo"}.get(objective, objective) and cfg.method == "lora"
    assert cfg.dpo.loss == ("ipo" if objective == "ipo" else "sigmoid")
    reader = read_feedback if cfg.stage == "kto" else read_pairs
    assert len(list(reader(root / cfg.data.train))) >= 3
