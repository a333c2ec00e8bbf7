"""DPO / IPO: the loss of a batch equals the formula computed independently and TRL's DPOTrainer on the same model
and tokens; the log-probs never build full logits; the reference is the base model with adapters disabled."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_dir
from sftlab.config import load_config
from sftlab.data.encode import IGNORE_INDEX, Encoder
from sftlab.data.preference import EncodedPair, PairEncoder, collate_pairs, to_pair
from sftlab.data.templates import load_template
from sftlab.errors import SftlabError
from sftlab.methods import METHODS
from sftlab.models.attention import packed_attention
from sftlab.train import loss as loss_module
from sftlab.train.preference import PreferenceForward, reference_logps, sequence_logps

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5, I think."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
     "chosen": "Hello! How can I help you today?", "rejected": "Go away."},
    {"prompt": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "Sure?"}], "chosen": "Yes, Paris.", "rejected": "No, Lyon."},
]
SETTINGS = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("dpo") / "base", init_range=0.2)


def load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def encoded_pairs(model_dir: Path) -> tuple[list[EncodedPair], object]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = PairEncoder(Encoder(tokenizer, load_template("chatml", tokenizer)))
    return [encoder.encode(to_pair(row, f"t:{i}")) for i, row in enumerate(ROWS, start=1)], tokenizer


def policy(model_dir: Path, method: str) -> tuple[torch.nn.Module, object]:
    """The tiny model under `method`, its trained parameters moved off their initial values (so that policy
    and reference differ)."""
    rank = ["lora.rank=4"] if method == "lora" else []
    cfg = load_config(overrides=[f"model={model_dir}", f"method={method}", *rank])
    model = load(model_dir)
    chosen = METHODS[method](cfg)
    chosen.apply(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in chosen.trainable_parameters(model).values():
            param.add_(torch.randn_like(param) * (0.3 if method != "full" else 0.02))
    return model, chosen


def formula_logps(model: torch.nn.Module, example) -> torch.Tensor:
    """Σ log softmax(full logits)[t-1, token t] over the scored tokens t, one sequence at a time."""
    ids = torch.tensor([example.input_ids])
    logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(logprobs[t - 1, token] for t, (token, label) in enumerate(zip(example.input_ids, example.labels))
               if label != IGNORE_INDEX)


def formula_loss(policy_model, reference_model, pairs, *, beta: float, loss: str,
                 label_smoothing: float) -> torch.Tensor:
    """The pair losses straight from the papers' formulas, averaged over pairs."""
    total = 0.0
    for pair in pairs:
        with torch.no_grad():
            ref_w, ref_l = formula_logps(reference_model, pair.chosen), formula_logps(reference_model, pair.rejected)
        delta_w = formula_logps(policy_model, pair.chosen) - ref_w
        delta_l = formula_logps(policy_model, pair.rejected) - ref_l
        if loss == "sigmoid":
            h = beta * (delta_w - delta_l)
            total = total - (1 - label_smoothing) * torch.log(1 / (1 + torch.exp(-h))) \
                - label_smoothing * torch.log(1 / (1 + torch.exp(h)))
        else:
            n_w = sum(label != IGNORE_INDEX for label in pair.chosen.labels)
            n_l = sum(label != IGNORE_INDEX for label in pair.rejected.labels)
            total = total + (delta_w / n_w - delta_l / n_l - 1 / (2 * beta)) ** 2
    return total / len(pairs)


def our_loss(engine: PreferenceForward, pairs, *, pad_id: int, packed: bool = False) -> torch.Tensor:
    batch = collate_pairs([(p.chosen, p.rejected) for p in pairs], pad_id=pad_id, packed=packed)
    loss_sum, _ = engine(batch)
    return loss_sum / len(pairs)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("loss, label_smoothing", SETTINGS)
def test_loss_and_gradients_equal_the_formula(model_dir, method, loss, label_smoothing) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, method)
    base = load(model_dir)  # the independent reference: a fresh copy of the base model
    engine = PreferenceForward(model, chosen, beta=0.5, loss=loss, label_smoothing=label_smoothing,
                               reference_model=base if method == "full" else None)
    ours = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id)
    ours.backward()
    params = chosen.trainable_parameters(model)
    our_grads = {name: p.grad.clone() for name, p in params.items()}
    model.zero_grad()
    want = formula_loss(model, base, pairs, beta=0.5, loss=loss, label_smoothing=label_smoothing)
    want.backward()
    assert abs(ours.item() - want.item()) < 1e-5, (ours.item(), want.item())
    assert want.item() > 1e-3  # the policy really differs from the reference
    for name, param in params.items():  # fp32 rounding, to the scale of each gradient
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(our_grads[name], param.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_a_packed_batch_gives_the_padded_batch_s_log_probs(model_dir) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, "lora")
    engine = PreferenceForward(model, chosen, beta=0.5)
    padded = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id)
    with packed_attention(model):
        packed = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id, packed=True)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def trl_loss(trainer, pairs) -> torch.Tensor:
    """TRL's own loss on our tokens: its collator over (prompt, chosen, rejected) ids split where ours are."""
    inputs = trainer.data_collator([{"prompt_ids": p.chosen.input_ids[:p.prompt_tokens],
                                     "chosen_ids": p.chosen.input_ids[p.prompt_tokens:],
                                     "rejected_ids": p.rejected.input_ids[p.prompt_tokens:]} for p in pairs])
    return trainer.compute_loss(trainer.model, inputs)


def dpo_trainer(tmp_path, model, tokenizer, *, loss: str, ref_model=None, peft_config=None):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.5, loss_type=[loss], report_to="none",
                         use_cpu=True, bf16=False, max_length=None, per_device_train_batch_size=len(ROWS))
    dataset = datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_full_fine_tuning_loss_equals_trl_dpo_trainer(model_dir, tmp_path, loss) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, "full")
    trainer = dpo_trainer(tmp_path, copy.deepcopy(model), tokenizer, loss=loss, ref_model=load(model_dir))
    theirs = trl_loss(trainer, pairs)
    engine = PreferenceForward(model, chosen, beta=0.5, loss=loss, reference_model=load(model_dir))
    ours = our_loss(engine, pairs, pad_id=tokenizer.pad_token_id)
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    assert theirs.item() != pytest.approx(math.log(2) if loss == "sigmoid" else 1.0, abs=1e-3)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_lora_loss_equals_trl_dpo_trainer_with_a_peft_adapter(model_dir, tmp_path, loss) -> None:
    # Both references are the base with the adapter disabled (TRL: PEFT's disable_adapter; ours: the wrappers
    # swapped out); the adapters hold the same matrices.
    peft = pytest.importorskip("peft")
    from sftlab.methods.lora import lora_modules

    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, "lora")
    peft_config = peft.LoraConfig(r=4, lora_alpha=32.0, target_modules="all-linear", lora_dropout=0.0)
    trainer = dpo_trainer(tmp_path, load(model_dir), tokenizer, loss=loss, peft_config=peft_config)
    theirs_model = trainer.model.get_base_model()
    with torch.no_grad():
        modules = lora_modules(model)
        assert len(modules) == 14  # 7 linear layers x 2 decoder layers, as PEFT's all-linear
        for name, module in modules.items():
            target = theirs_model.get_submodule(name)
            target.lora_A["default"].weight.copy_(module.A)
            target.lora_B["default"].weight.copy_(module.B)
    assert trainer.model.peft_config["default"].lora_alpha / 4 == next(iter(modules.values())).scaling
    theirs = trl_loss(trainer, pairs)
    ours = our_loss(PreferenceForward(model, chosen, beta=0.5, loss=loss), pairs, pad_id=tokenizer.pad_token_id)
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())


ADAPTER_METHODS = ["lora", "qlora", "adapter", "prompt", "ptuning", "prefix"]


@pytest.mark.parametrize("method", ADAPTER_METHODS + ["dora"])
def test_adapters_disabled_computes_the_base_model_without_a_copy(model_dir, method) -> None:
    options = {"lora": ["lora.rank=4"], "dora": ["lora.rank=4", "lora.dora=true"], "adapter": [],
               "qlora": ["lora.rank=4"], "prompt": ["prompt.num_virtual_tokens=3"],
               "ptuning": ["ptuning.num_virtual_tokens=3"], "prefix": ["prefix.num_virtual_tokens=3"]}[method]
    overrides = [f"model={model_dir}", f"method={'lora' if method == 'dora' else method}", *options]
    cfg = load_config(overrides=overrides)
    model = load(model_dir)
    chosen = METHODS[cfg.method](cfg, trainable_token_ids=[5, 7])  # trainable token rows are wrapped too
    chosen.apply(model)
    ids = torch.tensor([[5, 9, 7, 12, 40, 3]])
    names = sorted(chosen.trainable_parameters(model))
    with torch.no_grad():
        want = model(input_ids=ids).logits  # at init every method computes the base model
        for param in chosen.trainable_parameters(model).values():
            param.add_(torch.randn_like(param) * 0.5)
    parameters = {id(p) for p in model.parameters()}
    if method == "prefix":  # as a training forward leaves the hooks, until its backward
        model.prefix_encoder.armed = True
    with torch.no_grad(), chosen.adapters_disabled(model):
        disabled = model(input_ids=ids).logits
        assert {id(p) for p in model.parameters()} <= parameters  # the base's own, nothing copied
    if method == "prefix":
        assert model.prefix_encoder.armed
        model.prefix_encoder.armed = False
    with torch.no_grad():
        torch.testing.assert_close(disabled, want, rtol=1e-5, atol=1e-5)
        after = model(input_ids=ids).logits  # the wrappers are back in place
    assert not torch.allclose(after, disabled)
    assert sorted(chosen.trainable_parameters(model)) == names


def test_full_fine_tuning_has_no_adapters_to_disable(model_dir) -> None:
    cfg = load_config(overrides=[f"model={model_dir}", "method=full"])
    model = load(model_dir)
    METHODS["full"](cfg).apply(model)
    with pytest.raises(SftlabError, match="frozen copy"), METHODS["full"](cfg).adapters_disabled(model):
        pass


def test_soft_prompt_policy_runs_with_its_virtual_tokens_and_the_reference_without(model_dir) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, "prompt")
    batch = collate_pairs([(p.chosen, p.rejected) for p in pairs], pad_id=tokenizer.pad_token_id)
    base = load(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(reference_logps(model, batch, chosen), sequence_logps(base, batch))
        prompted = sequence_logps(model, batch, chosen)
    assert not torch.allclose(prompted, sequence_logps(base, batch))


@pytest.mark.parametrize("needs_weight_grad", [False, True])
@pytest.mark.parametrize("softcap, bias, dtype", [(None, False, torch.float32), (3.0, True, torch.float32),
                                                  (None, False, torch.bfloat16)])
def test_fused_head_logprobs_equal_autograd(needs_weight_grad, softcap, bias, dtype) -> None:
    # Three chunks of 4 positions; each position's gradient weight differs, as a pair loss's does.
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=dtype, requires_grad=needs_weight_grad)
    b = torch.randn(40, dtype=dtype, requires_grad=needs_weight_grad) if bias else None
    targets = torch.randint(0, 40, (11,))
    scale = torch.randn(11)
    ours = loss_module.FusedHeadLogprobs.apply(hidden, weight, b, targets, softcap, 4)
    (ours * scale).sum().backward()
    leaves = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    logits = torch.nn.functional.linear(hidden, weight, b).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (reference * scale).sum().backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    torch.testing.assert_close(ours, reference, **tolerance)
    for mine, t in zip(got, leaves):
        assert mine.dtype == t.grad.dtype
        torch.testing.assert_close(mine, t.grad, **tolerance)


def test_log_probs_run_the_head_on_scored_positions_only(model_dir, monkeypatch) -> None:
    pairs, tokenizer = encoded_pairs(model_dir)
    model, chosen = policy(model_dir, "lora")
    batch = collate_pairs([(p.chosen, p.rejected) for p in pairs], pad_id=tokenizer.pad_token_id)
    seen = []
    real = loss_module.FusedHeadLogprobs.forward
    monkeypatch.setattr(loss_module.FusedHeadLogprobs, "forward",
                        staticmethod(lambda ctx, hidden, *rest:
                                     seen.append(hidden.shape[0]) or real(ctx, hidden, *rest)))
    sequence_logps(model, batch, chosen).sum().backward()
    scored = sum(label != IGNORE_INDEX for p in pairs for side in (p.chosen, p.rejected) for label in side.labels)
    assert seen == [scored] and scored < batch.batch.input_ids.numel() / 3
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 3)  # chunking changes nothing
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch, chosen),
                                   torch.stack([formula_logps(model, s) for s in
                                                [p.chosen for p in pairs] + [p.rejected for p in pairs]]))
