"""The model's position limit, read from its config.json before any weight loads, and data.max_seq_len
resolved against it.

A model is trained for a fixed number of positions (`max_position_embeddings`; GPT-2 style configs call it
`n_positions`, some others `max_sequence_length`, `seq_length` or `n_ctx`; multimodal ones keep it in
`text_config`). An example longer than that trains positions the model never learnt, or crashes while the
attention mask is built, so:

- data.max_seq_len: null (the default) means the model's limit;
- a data.max_seq_len beyond the limit is refused, naming both numbers;
- a model that declares no limit (none of those keys) gets FALLBACK_MAX_SEQ_LEN for null, said in a note,
  and an explicit data.max_seq_len as given: memory stays bounded by a number either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlab.config import Config
from sftlab.errors import ConfigError
from sftlab.models.gguf import is_gguf, model_dir_for
from sftlab.models.load import local_dir

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""config.json keys that declare the most positions a model takes, in the order they are looked for."""
FALLBACK_MAX_SEQ_LEN = 2048
"""data.max_seq_len=null on a model that declares no position limit."""


if TYPE_CHECKING:
    from rich.console import Console


def with_max_seq_len(cfg: Config, console: Console | None = None) -> Config:
    """cfg with data.max_seq_len checked against the model's position limit and null replaced by it; the
    number chosen for null is printed to `console`."""
    limit = position_limit(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    length, note = resolve_max_seq_len(cfg.data.max_seq_len, limit, model=cfg.model.path)
    if note and console is not None:
        console.print(note, markup=False, highlight=False)
    return replace(cfg, data=replace(cfg.data, max_seq_len=length))


def position_limit(name_or_path: str, *, trust_remote_code: bool = False) -> int | None:
    """The most positions the model (a local dir, a .gguf file, a hub id) declares, or None when its config
    declares none or cannot be read here (a tokenizer-only dir, a hub id not in the local cache): the model's
    own checks report a broken or missing config.json."""
    if is_gguf(name_or_path):
        directory: Path | None = Path(model_dir_for(name_or_path, trust_remote_code=trust_remote_code))
    else:
        directory = local_dir(name_or_path)
    if directory is None:
        config = _hub_config(name_or_path, trust_remote_code=trust_remote_code)
    else:
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return declared_limit(config) if isinstance(config, Mapping) else None


def declared_limit(config: Mapping[str, Any]) -> int | None:
    """The first positive integer among POSITION_KEYS, at the top level of a config or in its text_config.

    >>> declared_limit({"n_positions": 1024}), declared_limit({"text_config": {"max_position_embeddings": 8192}})
    (1024, 8192)
    """
    for section in (config, config.get("text_config")):
        if not isinstance(section, Mapping):
            continue
        for key in POSITION_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _hub_config(name: str, *, trust_remote_code: bool) -> Mapping[str, Any] | None:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).to_dict()
    except Exception:  # broad on purpose: unreachable, unknown or remote-code: loading the model says why
        return None


def resolve_max_seq_len(requested: int | None, limit: int | None, *, model: str) -> tuple[int, str | None]:
    """(the max_seq_len to use, a note for the user or None): `requested` checked against the model's
    `limit`, null meaning the limit (FALLBACK_MAX_SEQ_LEN for a model that declares none)."""
    if limit is None:
        if requested is None:
            return FALLBACK_MAX_SEQ_LEN, (
                f"data.max_seq_len: {FALLBACK_MAX_SEQ_LEN} (model {model} declares no position limit, no "
                f"{' / '.join(POSITION_KEYS[:2])} in its config.json; set data.max_seq_len to change it)")
        return requested, None
    if requested is None:
        return limit, f"data.max_seq_len: {limit} (the model's limit, from its config.json)"
    if requested > limit:
        raise ConfigError(f"data.max_seq_len={requested} is more than the {limit} positions model {model} takes "
                          "(max_position_embeddings in its config.json): longer examples would train positions "
                          f"it never learnt, or fail. Set data.max_seq_len to {limit} or less, or to null (the "
                          "model's limit).")
    return requested, None
