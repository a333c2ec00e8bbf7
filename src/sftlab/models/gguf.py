"""A .gguf file becomes a plain Hugging Face model dir once, in the cache, and every later run reads that.

transformers reads GGUF (with the `gguf` package): it dequantises the weights and rebuilds the tokenizer
with its chat template. Left to itself it parses the file three times (`parsed_once` makes that once: SmolLM2-135M
Q4_1 converts in ~9.5 CPU-s instead of ~26.5, half of the rest imports). sftlab does that once per file and saves the
result (fp32 weights as safetensors, tokenizer files, chat template) under
`$SFTLAB_CACHE/models/<name>-<key>/` (default ~/.cache/sftlab), keyed by the file's path, size and
modification time. The conversion is written to a scratch dir and renamed into place, so a killed
conversion leaves nothing half-made behind.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftlab.data.cache import cache_root
from sftlab.errors import ConfigError


def is_gguf(path: str) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def model_dir_for(path: str, *, trust_remote_code: bool = False) -> str:
    """The cached HF model dir of the .gguf file `path`, converting it on first use."""
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise ConfigError(f"model {path!r}: no such .gguf file")
    target = converted_dir(source)
    if (target / "config.json").is_file():
        return str(target)
    _convert(source, target, trust_remote_code=trust_remote_code)
    return str(target)


def converted_dir(path: str | Path) -> Path:
    """Where the existing .gguf file `path` is (or will be) converted: the cache dir named by the file's
    stem and its cache key (path, size, modification time). Nothing is converted here."""
    source = Path(path).expanduser().resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return (cache_root(None) / "models" / f"{source.stem}-{key}").resolve()


def _convert(source: Path, target: Path, *, trust_remote_code: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.models.quant import TORCHAO_LOGGERS, quiet_loggers

    try:
        import gguf  # noqa: F401  (transformers needs it; say so here rather than deep inside)
    except ImportError:
        raise ConfigError(f"{source} is a GGUF file: reading it needs the `gguf` package "
                          "(pip install gguf, or pip install 'sftlab[gguf]').") from None
    print(f"converting {source.name} to a Hugging Face model dir (once; cached in {target.parent})", flush=True)
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with parsed_once(), quiet_loggers(*TORCHAO_LOGGERS):  # torchao's CUDA-kernel notes on a CPU
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name,
                                                      trust_remote_code=trust_remote_code)
            loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                          dtype=torch.float32, trust_remote_code=trust_remote_code)
        # transformers marks a GGUF-loaded model as quantised and will not save it; its weights are
        # dequantised already, so they go into a plain model of the same config, built on the meta device
        # (no random initialisation of 135M+ weights that are replaced at once) and given the loaded tensors.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
        plain.load_state_dict(loaded.state_dict(), assign=True)
        plain.tie_weights()
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


@contextmanager
def parsed_once() -> Iterator[None]:
    """transformers' GGUF reader (modeling_gguf_pytorch_utils) parses the whole file with gguf.GGUFReader once for
    the config, once for the tokenizer's config and once for the weights, every metadata string each time (the
    vocabulary and merges: ~100k of them, each read through numpy.memmap's slow slicing); and it builds gguf's
    tensor-name map once per submodule (~400 times for a 30-layer model). That was about half of a conversion's CPU
    seconds. Inside this block transformers gets, through the gguf module it imports them from at each call,
    a reader that parses each file once (from a plain array view of the memory map: the same bytes, without
    memmap's per-slice cost) and a name map built once per architecture and depth. Callers only read both, so
    the conversion is the same, byte for byte (tests/test_gguf.py); the gguf module is restored on exit. (The
    reader stands in as a function, not a class: nothing in transformers' GGUF path checks isinstance against it.)"""
    import gguf
    import numpy as np

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    class ArrayReader(reader_class):  # type: ignore[misc,valid-type]
        @property
        def data(self) -> np.ndarray:
            return self._array

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._array = value.view(np.ndarray)  # slices are plain arrays on the same mapped bytes

    readers: dict[tuple[str, str], object] = {}

    def reader(path: os.PathLike[str] | str, mode: str = "r") -> object:
        key = (os.fspath(path), mode)
        if mode != "r":  # a writable map: not shared
            return reader_class(path, mode)
        if key not in readers:
            readers[key] = ArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
