"""generate.py on a tiny random Llama (CPU, fp32): the cached loop equals a no-cache reference and HF
generate, stops at end-of-turn, seeds reproduce, top-p works, and the chat REPL keeps the conversation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_tokenizer
from sftlab.data.encode import Encoder
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError
from sftlab.generate import chat_repl, generate, pick_token, prompt_ids, sample, stop_token_ids

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture()
def chat():
    """The tiny tokenizer with ChatML's special tokens added, and the ChatML template."""
    tok = tiny_tokenizer()
    template = load_template("chatml", tok)
    Encoder(tok, template, add_special_tokens=True)
    return SimpleNamespace(tok=tok, template=template, im_end=tok.convert_tokens_to_ids("<|im_end|>"))


def tiny_llama(vocab_size: int, *, initializer_range: float = 0.02, seed: int = 0) -> nn.Module:
    """A 2-layer random Llama; a large initializer_range gives peaked logits (no near-ties for argmax),
    the default a nearly flat next-token distribution (for sampling)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=initializer_range, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def reference_greedy(model: nn.Module, ids: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """Independent greedy decoding: the full forward recomputed every step, no cache."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            ids.append(token)
    return new


def force_token_at_step(model: nn.Module, token: int, step: int) -> list[int]:
    """Make `token` the certain argmax of the `step`-th lm_head call (0 = the prompt's), by a forward hook
    on lm_head; returns the list of call counts so a test can see how many steps ran."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == step + 1:
            output = output.clone()
            output[..., -1, token] = output[..., -1, :].max() + 100.0
        return output

    model.lm_head.register_forward_hook(hook)
    return calls


class ScriptedLM(nn.Module):
    """A stand-in causal LM whose argmax follows a script, one entry per forward call; records the input
    of every call and the cache it was handed."""

    def __init__(self, vocab_size: int, script: list[int]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the loop a device and dtype
        self.vocab_size, self.script = vocab_size, script
        self.inputs: list[list[int]] = []
        self.caches: list[object] = []

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        self.inputs.append(input_ids[0].tolist())
        self.caches.append(past_key_values)
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1, self.script[len(self.inputs) - 1]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=f"cache after call {len(self.inputs)}")


# --- stop ids and prompt ---------------------------------------------------------------------------------

def test_stop_ids_are_single_token_markers_plus_eos(chat):
    assert stop_token_ids(chat.tok, chat.template) == [chat.im_end, chat.tok.eos_token_id]


def test_a_marker_the_tokenizer_splits_is_not_a_stop_id():
    tok = tiny_tokenizer()  # no <|eot_id|> token: the llama3 marker encodes to several pieces
    assert len(tok.encode("<|eot_id|>", add_special_tokens=False)) > 1
    assert stop_token_ids(tok, load_template("llama3", tok)) == [tok.eos_token_id]


def test_prompt_is_the_training_encoding_up_to_the_reply(chat):
    """The inference prompt is exactly the prefix the model saw in training before the assistant's reply."""
    conversation = Conversation((Message("user", "What is 2+2?"), Message("assistant", "It is 4.")))
    trained = Encoder(chat.tok, chat.template).encode(conversation)
    prompt = prompt_ids(chat.tok, chat.template, MESSAGES)
    assert trained.input_ids[: len(prompt)] == prompt
    assert chat.tok.decode(prompt).endswith("<|im_start|>assistant\n")
    first_trained = next(i for i, label in enumerate(trained.labels) if label != -100)
    assert first_trained == len(prompt)


# --- greedy --------------------------------------------------------------------------------------------

def test_greedy_equals_no_cache_reference_and_hf_generate(chat):
    model = tiny_llama(len(chat.tok), initializer_range=0.5)
    stops = stop_token_ids(chat.tok, chat.template)
    prompt = prompt_ids(chat.tok, chat.template, MESSAGES)
    ours = sample(model, prompt, stop_ids=stops, max_new_tokens=24, temperature=0)
    assert ours == reference_greedy(model, prompt, stops, 24)
    assert len(ours) > 0

    hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=stops,
                        pad_token_id=chat.tok.eos_token_id, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    hf_new = hf[0, len(prompt):].tolist()
    if hf_new and hf_new[-1] in stops:  # HF keeps the stop token; we drop it
        hf_new = hf_new[:-1]
    assert ours == hf_new
    assert generate(model, chat.tok, chat.template, MESSAGES, max_new_tokens=24, temperature=0) == \
        chat.tok.decode(ours, skip_special_tokens=True)


def test_greedy_stops_at_end_of_turn_on_a_real_model(chat):
    model = tiny_llama(len(chat.tok), initializer_range=0.5)
    stops = stop_token_ids(chat.tok, chat.template)
    prompt = prompt_ids(chat.tok, chat.template, MESSAGES)
    unforced = reference_greedy(model, prompt, stops, 10)
    assert len(unforced) == 10 and chat.im_end not in unforced

    calls = force_token_at_step(model, chat.im_end, step=4)
    ours = sample(model, prompt, stop_ids=stops, max_new_tokens=50, temperature=0)
    assert ours == unforced[:4]  # the 4 tokens before <|im_end|>, which is not returned
    assert calls[0] == 5  # prefill + 4 steps: halted at the stop token
    calls[0] = 0
    text = generate(model, chat.tok, chat.template, MESSAGES, max_new_tokens=50, temperature=0)
    assert text == chat.tok.decode(unforced[:4])
    assert "<|im_end|>" not in text and "im_end" not in text


def test_loop_feeds_one_token_per_step_with_the_cache_and_halts_at_stop(chat):
    a, b, c, d = chat.tok.encode("Paris is", add_special_tokens=False)[:2] + [5, 6]
    model = ScriptedLM(len(chat.tok), [a, b, c, chat.im_end, d])
    prompt = prompt_ids(chat.tok, chat.template, MESSAGES)
    assert sample(model, prompt, stop_ids=[chat.im_end], max_new_tokens=50, temperature=0) == [a, b, c]
    assert model.inputs == [prompt, [a], [b], [c]]  # prefill once, then one new token per call
    assert model.caches == [None, "cache after call 1", "cache after call 2", "cache after call 3"]


def test_eos_also_stops_and_max_new_tokens_caps(chat):
    eos = chat.tok.eos_token_id
    model = ScriptedLM(len(chat.tok), [7, eos, 8])
    assert sample(model, [1, 2], stop_ids=stop_token_ids(chat.tok, chat.template), temperature=0) == [7]
    model = ScriptedLM(len(chat.tok), [7, 8, 9, 10, 11])
    assert sample(model, [1, 2], stop_ids=[eos], max_new_tokens=3, temperature=0) == [7, 8, 9]
    assert len(model.inputs) == 3  # no forward after the last allowed token


def test_model_mode_is_restored(chat):
    model = tiny_llama(len(chat.tok)).train()
    generate(model, chat.tok, chat.template, MESSAGES, max_new_tokens=2, temperature=0)
    assert model.training


# --- sampling ------------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_seeds_differ(chat):
    model = tiny_llama(len(chat.tok))  # near-flat distribution
    kwargs = {"max_new_tokens": 20, "temperature": 1.0, "top_p": 1.0}
    first = generate(model, chat.tok, chat.template, MESSAGES, seed=1, **kwargs)
    assert generate(model, chat.tok, chat.template, MESSAGES, seed=1, **kwargs) == first
    assert generate(model, chat.tok, chat.template, MESSAGES, seed=2, **kwargs) != first
    torch.manual_seed(0)  # a seed must not depend on, or disturb, the global RNG
    assert generate(model, chat.tok, chat.template, MESSAGES, seed=1, **kwargs) == first


def test_tiny_top_p_is_greedy(chat):
    model = tiny_llama(len(chat.tok))
    greedy = generate(model, chat.tok, chat.template, MESSAGES, max_new_tokens=16, temperature=0)
    for seed in range(3):
        assert generate(model, chat.tok, chat.template, MESSAGES, max_new_tokens=16, temperature=1.5,
                        top_p=1e-6, seed=seed) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    drawn = {pick_token(logits, temperature=1.0, top_p=0.7, generator=generator) for _ in range(400)}
    assert drawn == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    drawn = {pick_token(logits, temperature=1.0, top_p=0.81, generator=generator) for _ in range(400)}
    assert drawn == {0, 1, 2}  # 0.5 + 0.3 < 0.81
    drawn = {pick_token(logits, temperature=1.0, top_p=1.0, generator=generator) for _ in range(2000)}
    assert drawn == {0, 1, 2, 3}
    assert pick_token(logits, temperature=0, top_p=0.9) == 0


def test_bf16_model_generates(chat):
    model = tiny_llama(len(chat.tok), initializer_range=0.5).to(torch.bfloat16)
    text = generate(model, chat.tok, chat.template, MESSAGES, max_new_tokens=8, temperature=0.7, seed=0)
    assert isinstance(text, str) and text


@pytest.mark.parametrize("bad, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_sampling_options_are_config_errors(chat, bad, message):
    model = ScriptedLM(len(chat.tok), [1])
    with pytest.raises(ConfigError, match=message):
        generate(model, chat.tok, chat.template, MESSAGES, **bad)


# --- chat REPL -----------------------------------------------------------------------------------------

def scripted(lines: list[str]):
    feed = iter(lines)

    def input_fn(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None
    return input_fn


def spy_renders(template) -> list[list[dict]]:
    """The messages of each prompt the template renders (render_prompt: the generation prompt)."""
    renders: list[list[dict]] = []
    real = template.render_prompt

    def render_prompt(messages, **kwargs):
        renders.append([dict(m) for m in messages])
        return real(messages, **kwargs)
    template.render_prompt = render_prompt
    return renders


def test_chat_keeps_the_conversation_across_turns(chat):
    model = tiny_llama(len(chat.tok), initializer_range=0.5)
    renders = spy_renders(chat.template)
    printed: list[str] = []
    final = chat_repl(model, chat.tok, chat.template, system="Be brief.", temperature=0, max_new_tokens=6,
                      input_fn=scripted(["What is 2+2?", "And 3+3?", "/exit", "never read"]),
                      print_fn=lambda *a: printed.append(" ".join(map(str, a))))
    assert len(renders) == 2
    first_reply = generate(model, chat.tok, chat.template, [{"role": "system", "content": "Be brief."}, *MESSAGES],
                           temperature=0, max_new_tokens=6)
    assert first_reply and first_reply in printed
    assert renders[1] == [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "What is 2+2?"},
                          {"role": "assistant", "content": first_reply},
                          {"role": "user", "content": "And 3+3?"}]
    assert final == renders[1] + [{"role": "assistant", "content": printed[-1]}]


def test_chat_reset_clears_all_but_the_system_message(chat):
    model = tiny_llama(len(chat.tok), initializer_range=0.5)
    renders = spy_renders(chat.template)
    final = chat_repl(model, chat.tok, chat.template, system="Be brief.", temperature=0, max_new_tokens=4,
                      input_fn=scripted(["Hello!", "/reset", "", "Again", "/exit"]), print_fn=lambda *a: None)
    assert [len(r) for r in renders] == [2, 2]  # blank line ignored; no history after /reset
    assert renders[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Again"}]
    assert [m["role"] for m in final] == ["system", "user", "assistant"]


def test_chat_quits_on_end_of_input(chat):
    model = ScriptedLM(len(chat.tok), [7, chat.im_end])
    final = chat_repl(model, chat.tok, chat.template, temperature=0, input_fn=scripted(["Hi"]),
                      print_fn=lambda *a: None)
    assert final == [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": chat.tok.decode([7])}]
