"""Prompt tuning and P-tuning: they train through the one loop, only their own parameters get gradients, the
virtual tokens are never targets, exports load back in sftlab and in HF PEFT with the same logits, and greedy
generation behind the virtual tokens equals a greedy loop over PEFT's forward."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conftest import tiny_model_dir, tiny_tokenizer
from sftlab import export
from sftlab.config import load_config
from sftlab.data.batching import Batch, collate
from sftlab.data.encode import IGNORE_INDEX
from sftlab.data.templates import load_template
from sftlab.generate import generate, prompt_ids, sample, stop_token_ids
from sftlab.methods import METHODS, MergeError
from sftlab.methods.prompt import soft_prompt
from sftlab.models.load import load_model
from sftlab.runs import RunResult, load_for_inference, prepare, train
from sftlab.train.loss import loss_sum
from sftlab.train.setup import Setup

peft = pytest.importorskip("peft")  # a test-only dependency

CPU = torch.device("cpu")
QUIET = Console(quiet=True)
VIRTUAL = 6
QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
      ("Who wrote Hamlet?", "Shakespeare wrote it."), ("Say hi.", "Hi there!")]
CASES = {  # name -> config overrides
    "prompt-text": ["method=prompt", f"prompt.num_virtual_tokens={VIRTUAL}", "prompt.init_text=Answer briefly.",
                    "train.lr=3e-1"],
    "ptuning-mlp": ["method=ptuning", f"ptuning.num_virtual_tokens={VIRTUAL}", "ptuning.encoder=mlp",
                    "ptuning.encoder_hidden=32", "train.lr=1e-2"],
    "ptuning-lstm": ["method=ptuning", f"ptuning.num_virtual_tokens={VIRTUAL}", "ptuning.encoder=lstm",
                     "ptuning.encoder_hidden=16", "train.lr=3e-2"],
}
PROMPT_VOCAB = ["method=prompt", f"prompt.num_virtual_tokens={VIRTUAL}", "train.lr=3e-1"]  # random vocab rows
STEPS = 15


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads cost more than they save, and on a busy 2-core machine the LSTM encoder's
    thread barriers made this module ~10x slower (70 s instead of 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


def data_file(path: Path, system: bool = True) -> Path:
    head = [{"role": "system", "content": "Answer briefly."}] if system else []
    rows = [{"messages": [*head, {"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "data.cache=false",
                                  "model.dtype=float32", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
                                  "train.warmup_steps=2", *overrides])


@dataclass
class Run:
    name: str
    setup: Setup
    result: RunResult
    printed: str
    peft: torch.nn.Module
    """HF PEFT's PeftModel.from_pretrained(base, the run's adapter/), in eval mode."""


@pytest.fixture(scope="module", params=list(CASES))
def run(request, model_dir, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp(request.param)
    cfg = run_config(model_dir, data_file(root / "qa.jsonl"), root / "run", *CASES[request.param])
    buffer = io.StringIO()
    setup = prepare(cfg, console=Console(file=buffer, width=200), device=CPU)
    result = train(setup, console=QUIET)
    setup.model.eval()
    return Run(request.param, setup, result, buffer.getvalue(), peft_model(model_dir, result.export_dir))


def batch_of(setup: Setup) -> Batch:
    """Every training example in one right-padded batch (rows of different lengths)."""
    return collate([setup.train_data[i] for i in range(len(setup.train_data))], pad_id=setup.tokenizer.pad_token_id)


def peft_model(model_dir: Path, adapter: Path, *, resize_to: int | None = None):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if resize_to is not None:
        base.resize_token_embeddings(resize_to)
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


@torch.no_grad()
def sftlab_logits(model, method, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits at the batch's own positions, through the method's training forward."""
    return model.get_output_embeddings()(method.hidden_states(model, batch)).float()


@torch.no_grad()
def peft_logits(model, batch: Batch) -> torch.Tensor:
    """(B, T, V): PEFT's forward over the same batch, its P virtual positions cut off."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, VIRTUAL:].float()


def test_trains_and_loss_goes_down(run: Run) -> None:
    losses = [json.loads(line)["loss"] for line in (run.result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert run.result.steps == STEPS and len(losses) == STEPS
    assert losses[-1] < 0.85 * losses[0] and losses[-1] == min(losses), losses
    method = run.setup.config.method
    assert f"method {method}: trainable" in run.printed
    adapter = run.result.export_dir
    assert adapter == run.result.output_dir / "adapter"
    peft_type = json.loads((adapter / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}[method]


@pytest.mark.parametrize("case", ["prompt-vocab", "ptuning-lstm"])
def test_only_the_method_parameters_receive_gradients(model_dir, tmp_path, case) -> None:
    overrides = CASES.get(case, PROMPT_VOCAB)
    setup = prepare(run_config(model_dir, data_file(tmp_path / "qa.jsonl"), tmp_path / "run", *overrides),
                    console=QUIET, device=CPU)
    model, method = setup.model, setup.method
    trainable = method.trainable_parameters(model)
    assert trainable and all(name.startswith("soft_prompt.") for name in trainable)
    if case.startswith("ptuning"):
        assert any(".encoder." in name for name in trainable)
    loss_sum(model, batch_of(setup), method).backward()
    ours = {id(p) for p in trainable.values()}
    for name, param in model.named_parameters():
        if id(param) in ours:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_virtual_tokens_are_never_targets(run: Run) -> None:
    # The loss by hand: PEFT's forward on the exported adapter, its virtual positions cut off, labels shifted
    # once; every supervised position is a real token.
    model, method = run.setup.model, run.setup.method
    batch = batch_of(run.setup)
    hidden = method.hidden_states(model, batch)
    assert hidden.shape[:2] == batch.input_ids.shape
    logits = peft_logits(run.peft, batch)
    targets = batch.labels[:, 1:]
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        ours = loss_sum(model, batch, method)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-4)


def test_peft_loads_the_export_with_the_same_logits(run: Run, model_dir) -> None:
    model, method = run.setup.model, run.setup.method
    batch = batch_of(run.setup)
    real = batch.attention_mask.bool()
    ours = sftlab_logits(model, method, batch)
    theirs = peft_logits(run.peft, batch)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (base[real] - ours[real]).abs().max() > 1e-2  # the virtual tokens do change the output


def test_export_has_the_fields_peft_itself_writes(run: Run, model_dir, tmp_path) -> None:
    cfg = run.setup.config
    if cfg.method == "prompt":
        peft_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
    else:
        peft_config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL,
                                               encoder_hidden_size=cfg.ptuning.encoder_hidden,
                                               encoder_reparameterization_type=cfg.ptuning.encoder.upper())
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft.get_peft_model(base, peft_config).save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = json.loads((run.result.export_dir / "adapter_config.json").read_text())
    optional = {"peft_version", "auto_mapping", "tokenizer_kwargs"}  # PEFT fills these in itself
    assert set(ours) == set(theirs) - optional
    for field in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                  "num_attention_heads", "num_layers", "inference_mode", "encoder_reparameterization_type",
                  "encoder_hidden_size", "encoder_num_layers"):
        assert ours.get(field) == theirs.get(field), field
    from safetensors.torch import load_file

    assert set(load_file(run.result.export_dir / "adapter_model.safetensors")) == {"prompt_embeddings"}


def test_save_load_round_trip_gives_identical_logits(run: Run) -> None:
    model, method = run.setup.model, run.setup.method
    batch = batch_of(run.setup)
    expected = sftlab_logits(model, method, batch)
    # load_for_inference(run dir): base + config.yaml's method + the adapter
    loaded, _, _, loaded_method = load_for_inference(str(run.result.output_dir), device=CPU)
    assert loaded_method.name == method.name
    torch.testing.assert_close(sftlab_logits(loaded, loaded_method, batch), expected, atol=0, rtol=0)
    # export.load_trained into a freshly applied method
    fresh = load_model(run.setup.config.model, device=CPU).eval()
    fresh_method = METHODS[run.setup.config.method](run.setup.config)
    fresh_method.apply(fresh)
    export.load_trained(fresh, fresh_method, run.result.export_dir)
    torch.testing.assert_close(sftlab_logits(fresh, fresh_method, batch), expected, atol=0, rtol=0)
    if method.name == "ptuning":
        assert soft_prompt(fresh).encoder is None  # folded: the exported virtual tokens, as a plain table


def test_greedy_generation_equals_a_greedy_loop_over_peft_forward(run: Run) -> None:
    # Not PEFT's generate(): with prompt tuning it drifts from PEFT's own forward (peft 0.21).
    tokenizer, template = run.setup.tokenizer, load_template("auto", run.setup.tokenizer)
    stops = set(stop_token_ids(tokenizer, template))
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QA[0][0]}]
    ids = prompt_ids(tokenizer, template, messages)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(8):  # PEFT's forward over the whole sequence each step: no cache involved
            new.append(int(run.peft(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
    # No stop ids: all 8 tokens, 7 of them from cached single-token steps after the prefill.
    assert sample(run.setup.model, ids, stop_ids=[], max_new_tokens=8, temperature=0, method=run.setup.method) == new
    replied = new[:next((i for i, token in enumerate(new) if token in stops), len(new))]
    reply = generate(run.setup.model, tokenizer, template, messages, temperature=0, max_new_tokens=8,
                     method=run.setup.method)
    assert reply == tokenizer.decode(replied, skip_special_tokens=True)


def test_merge_is_refused_with_the_reason(run: Run) -> None:
    with pytest.raises(MergeError, match="not a change of any weight"):
        run.setup.method.merge(run.setup.model)


def test_peft_made_adapter_loads_into_sftlab(model_dir, tmp_path) -> None:
    # PEFT's own LSTM P-tuning adapter (encoder output saved) and a TEXT-initialised prompt-tuning adapter.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer.encode("What is the capital of France?")])
    batch = collate_ids(ids)
    for name, peft_config in [
            ("ptuning", peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL,
                                                 encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
            ("prompt", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL,
                                               prompt_tuning_init="TEXT", prompt_tuning_init_text="Be brief.",
                                               tokenizer_name_or_path=str(model_dir)))]:
        torch.manual_seed(3)
        made = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), peft_config)
        made.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)  # load_for_inference reads the tokenizer from the adapter dir
        model, _, _, method = load_for_inference(str(tmp_path / name), device=CPU)
        assert method.name == name
        torch.testing.assert_close(sftlab_logits(model, method, batch), peft_logits(made.eval(), batch),
                                   atol=1e-5, rtol=0)


def collate_ids(ids: torch.Tensor) -> Batch:
    labels = torch.full_like(ids, IGNORE_INDEX)
    return Batch(ids, labels, torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids),
                 torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def test_added_tokens_train_and_export_in_peft_format(tmp_path) -> None:
    # ChatML on a base tokenizer: its two tokens are added, their rows train beside the virtual tokens, and the
    # export holds the resized embedding and head as PEFT saves them.
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = run_config(base, data_file(tmp_path / "qa.jsonl", system=False), tmp_path / "run", *PROMPT_VOCAB,
                     "data.template=chatml", "data.add_special_tokens=true", "train.max_steps=3")
    setup = prepare(cfg, console=QUIET, device=CPU)
    initial = {k: v.clone() for k, v in setup.method.state_dict(setup.model).items()}
    result = train(setup, console=QUIET)
    setup.model.eval()
    trainable = setup.method.trainable_parameters(setup.model)
    assert {"model.embed_tokens.rows", "lm_head.rows", "soft_prompt.table"} == set(trainable)
    assert all(not torch.equal(trainable[k].detach(), initial[k]) for k in trainable)
    pad_id = setup.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = collate([setup.train_data[i] for i in range(len(setup.train_data))], pad_id=pad_id)
    real = batch.attention_mask.bool()
    expected = sftlab_logits(setup.model, setup.method, batch)

    loaded, _, _, method = load_for_inference(str(result.output_dir), device=CPU)
    assert list(method.trainable_token_ids) == list(setup.method.trainable_token_ids)
    torch.testing.assert_close(sftlab_logits(loaded, method, batch), expected, atol=0, rtol=0)
    reference = peft_model(base, result.export_dir, resize_to=len(setup.tokenizer))
    torch.testing.assert_close(peft_logits(reference, batch)[real], expected[real], atol=1e-5, rtol=0)
    assert "resize_token_embeddings" in (result.export_dir / "README.md").read_text()
