"""Load a tokenizer (and, in the engine, a model) from a local Hugging Face dir or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sftlab.errors import ConfigError


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """A transformers tokenizer from a local model/tokenizer dir or a hub id; errors say what to fix."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise ConfigError(f"model {name_or_path!r} is a file; expected a Hugging Face model or tokenizer "
                          "directory (with tokenizer.json / tokenizer_config.json) or a hub id.")
    if local.is_dir() and not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                   "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{local} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                          "tokenizer.model or vocab.json); point --model/model at the model's directory.")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path,
                                             trust_remote_code=trust_remote_code)
    except OSError as exc:
        offline = " (the Hugging Face Hub is not reachable from here)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}{offline}: {exc}") from None
