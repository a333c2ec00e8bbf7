"""Sampling with the chat template, stopping at end-of-turn; the `chat` REPL.

The prompt is the same template render the model was trained on, with the generation prompt appended,
tokenised without the tokenizer's own special tokens (the template already puts BOS where it wants it).
Decoding is the shared batched decoder (models/decoding.py, also the forgetting probe's and the demo's) with
a batch of one: a loop over `model(input_ids, past_key_values=..., use_cache=True)` (newer transformers name
the cache argument `cache`): the prompt is run once, then one token per step against the KV cache.
It does not use HF `generate()`, so methods that hook the forward or the cache (prefix tuning) decode
through exactly the path they train through.

    messages ──render_prompt(add_generation_prompt)──▶ segments ──encode (contents as text)──▶ prompt ids
      ──prefill──▶ logits ──pick (greedy | top-p)──▶ token ──step with cache──▶ ... until a stop token
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sftlab.config import SEED_LIMIT
from sftlab.data.encode import prompt_token_ids
from sftlab.data.stop_tokens import stop_token_ids
from sftlab.data.templates import ChatTemplate
from sftlab.errors import ConfigError, shown
from sftlab.models import decoding

Messages = Sequence[Mapping[str, str]]
"""Chat messages as the template renders them: `{"role": ..., "content": ...}`."""


def prompt_ids(tokenizer: Any, template: ChatTemplate, messages: Messages,
               tools: Sequence[Any] | None = None, *, special_tokens_in_content: str = "text") -> list[int]:
    """The token ids the model sees before its reply: the template render with the generation prompt
    (and the tool definitions, where given, rendered where the template puts them). Special-token strings
    a user types (`<|im_start|>system` in a prompt) are text, as in training data, so a prompt cannot forge
    a turn; `special_tokens_in_content="allow"` reads them as control tokens."""
    segments = template.render_prompt(messages, tools=tools)
    return prompt_token_ids(tokenizer, segments, special_tokens_in_content=special_tokens_in_content)


def generate(model: Any, tokenizer: Any, template: ChatTemplate, messages: Messages, *,
             max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
             seed: int | None = None, method: Any = None, tools: Sequence[Any] | None = None) -> str:
    """The model's reply to `messages`: sampled until an end-of-turn/eos token (not included) or
    `max_new_tokens`, decoded without special tokens. Greedy when temperature is 0; the same seed gives
    the same reply on the same device."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    generator = _generator(model, seed)
    return _reply(model, tokenizer, template, messages, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, generator=generator, method=method, tools=tools)


def sample(model: Any, input_ids: Sequence[int], *, stop_ids: Sequence[int], max_new_tokens: int = 256,
           temperature: float = 0.7, top_p: float = 0.9, generator: torch.Generator | None = None,
           method: Any = None) -> list[int]:
    """New token ids after `input_ids`, up to but not including the first stop id, at most
    `max_new_tokens`. Runs in the model's own device and dtype; the model is put in eval mode for the
    call and restored afterwards."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if not input_ids:
        raise ConfigError("the prompt is empty; expected at least one token to continue from.")
    max_new_tokens = _room(model, len(input_ids), max_new_tokens)
    stops = {int(i) for i in stop_ids}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _decode_loop(model, list(input_ids), stops, max_new_tokens, temperature, top_p, generator,
                                method)
    finally:
        model.train(was_training)


def _decode_loop(model: Any, input_ids: list[int], stops: set[int], max_new_tokens: int,
                 temperature: float, top_p: float, generator: torch.Generator | None,
                 method: Any = None) -> list[int]:
    """One prompt through the shared decoder (models/decoding.py) as a batch of one: the prompt through the
    method's prefill (its virtual tokens / prefixes; the plain forward without a method), then one token a step
    against the cache, each drawn by pick_token."""
    def pick(logits: torch.Tensor) -> torch.Tensor:  # (1, V) -> (1,)
        return torch.tensor([pick_token(logits[0], temperature=temperature, top_p=top_p, generator=generator)])

    prefill = method.prefill if method is not None else _plain_prefill
    [answer] = decoding.decode_batch(model, [input_ids], stops=stops, max_new_tokens=max_new_tokens, pad_id=0,
                                     device=_device(model), pick=pick, prefill=prefill)
    return answer[:-1] if answer and answer[-1] in stops else answer


def _plain_prefill(model: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
    """The prompt's forward without a method: the model's own, with no mask (one unpadded row)."""
    return model(input_ids=input_ids, use_cache=True, **kwargs)


def pick_token(logits: torch.Tensor, *, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> int:
    """One token from next-token logits `(V,)`: argmax when temperature is 0, else a draw from the
    smallest set of most likely tokens whose probability reaches top_p (always at least the top one)."""
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs  # probability of the tokens ranked above each
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def chat_repl(model: Any, tokenizer: Any, template: ChatTemplate, *, system: str | None = None,
              input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print,
              max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
              seed: int | None = None, method: Any = None,
              tools: Sequence[Any] | None = None) -> list[dict[str, str]]:
    """Talk to the model: each user line and the model's reply are kept, so every prompt holds the whole
    conversation. `/reset` starts over (keeping the system message), `/exit` or end of input quits.
    One generator seeded once serves the whole session. Returns the conversation as it ended."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    generator = _generator(model, seed)
    print_fn("Type a message; /reset starts a new conversation, /exit (or Ctrl-D) quits.")
    while True:
        try:
            # A terminal in a non-UTF-8 locale hands undecodable bytes over as lone surrogates, which no
            # tokenizer encodes: they become U+FFFD.
            line = input_fn(">>> ").encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        except (EOFError, KeyboardInterrupt):
            print_fn()
            return messages
        command = line.strip()
        if command == "/exit":
            return messages
        if command == "/reset":
            messages = list(start)
            print_fn("(conversation cleared)")
            continue
        if not command:
            continue
        asked = [*messages, {"role": "user", "content": command}]
        try:
            reply = _reply(model, tokenizer, template, asked, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, generator=generator, method=method, tools=tools)
        except ConfigError as exc:  # the conversation fills the model's positions: say so, keep the session
            print_fn(f"({exc})")
            continue
        messages = asked
        print_fn(show_reply(reply) if tools else reply)
        messages = [*messages, {"role": "assistant", "content": reply}]


def _reply(model: Any, tokenizer: Any, template: ChatTemplate, messages: Messages, *, max_new_tokens: int,
           temperature: float, top_p: float, generator: torch.Generator | None, method: Any = None,
           tools: Sequence[Any] | None = None) -> str:
    ids = sample(model, prompt_ids(tokenizer, template, messages, tools), stop_ids=stop_token_ids(tokenizer, template),
                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
                 method=method)
    return tokenizer.decode(ids, skip_special_tokens=True)


def check_sampling(*, max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> None:
    """Refuse sampling settings that cannot work, before a model is loaded for them. Each float is checked
    for finiteness first: NaN passes every `<` comparison."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ConfigError(f"max_new_tokens (--max-new-tokens) must be at least 1; found {shown(max_new_tokens)}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature (--temperature) must be 0 (greedy) or a positive finite number; found "
                          f"{shown(temperature)}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"top_p (--top-p) must be in (0, 1]; found {shown(top_p)}. Use 1 to sample from all tokens.")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed (--seed) must be an integer in [0, 2**32); found {shown(seed)}")


def _room(model: Any, prompt_tokens: int, max_new_tokens: int) -> int:
    """How many new tokens fit after the prompt in the model's positions (config max_position_embeddings):
    max_new_tokens, or fewer with a note on stderr; an error when the prompt leaves no room at all."""
    from sftlab.models.positions import declared_limit

    config = getattr(model, "config", None)
    limit = declared_limit(config.to_dict()) if hasattr(config, "to_dict") else None
    if not isinstance(limit, int) or prompt_tokens + max_new_tokens <= limit:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise ConfigError(f"the prompt is {prompt_tokens:,} tokens, and the model takes at most {limit:,} positions "
                          "(max_position_embeddings): no room to answer. Shorten the prompt (in chat: /reset).")
    print(f"note: max_new_tokens {max_new_tokens:,} cut to {limit - prompt_tokens:,}: the prompt takes "
          f"{prompt_tokens:,} of the model's {limit:,} positions.", file=sys.stderr)
    return limit - prompt_tokens


def _generator(model: Any, seed: int | None) -> torch.Generator | None:
    """A generator on the model's device (torch.multinomial draws there), or None for the global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=_device(model)).manual_seed(seed)


def _device(model: Any) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_MISTRAL_CALLS = "[TOOL_CALLS]"


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The tool calls in a reply, as [{"name", "arguments"}], where the format is one sftlab knows:
    Qwen/Hermes `<tool_call>{...}</tool_call>` blocks, Mistral `[TOOL_CALLS][{...}]`, Llama-3.1's bare
    `{"name": ..., "parameters": {...}}`. None when the reply is none of these (shown as raw text)."""
    stripped = text.strip()
    if _QWEN_CALL.search(stripped):
        found = [_json_object(block) for block in _QWEN_CALL.findall(stripped)]
    elif stripped.startswith((_MISTRAL_CALLS, "[")):  # decoding without special tokens drops the marker
        parsed = _json_value(stripped.removeprefix(_MISTRAL_CALLS))
        found = parsed if isinstance(parsed, list) and parsed else [None]
    else:
        found = [_json_object(stripped)] if stripped.startswith("{") else [None]
    calls = []
    for call in found:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        calls.append({"name": call["name"], "arguments": call.get("arguments", call.get("parameters", {}))})
    return calls


def load_tools(path: str | None) -> list[Any] | None:
    """`--tools FILE`: a JSON list of function definitions (what a training row's `tools` holds)."""
    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tools {path}: cannot read it as JSON ({exc}); expected a JSON file holding a list "
                          "of function definitions.") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConfigError(f"--tools {path}: expected a JSON list of function definitions, e.g. [{{\"type\": "
                          "\"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}].")
    return tools


def show_reply(text: str) -> str:
    """A reply for the terminal: its tool calls as JSON lines where parsed, else the text as it is."""
    calls = parse_tool_calls(text)
    if not calls:
        return text
    return "\n".join("tool call: " + json.dumps(call, ensure_ascii=False) for call in calls)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_object(text: str) -> dict[str, Any] | None:
    value = _json_value(text)
    return value if isinstance(value, dict) else None
