"""A run's base model, recorded so that the run loads from any working directory, and found again.

What the user typed is relative to the directory they typed it in; a run dir outlives that. So the run's
config.yaml records (`portable`):
- a hub id as it is;
- a local model dir or .gguf file as an absolute path, and output_dir absolute too, so that the base's
  place relative to the run dir is known: when the tree that holds both moves (a copy to another machine,
  a renamed project dir), the base is found there (`locate`);
- for a .gguf file, also `model.gguf_dir`: the cached Hugging Face dir it converts to (its name holds the
  cache key). That dir, not the .gguf file, is what other tools load as the base (PEFT's
  `base_model_name_or_path`), and the run still loads from it when the .gguf file is gone.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from sftlab.config import Config, ModelConfig
from sftlab.errors import ConfigError
from sftlab.models.gguf import converted_dir, is_gguf


def portable(cfg: Config) -> Config:
    """`cfg` with its local model path and output_dir absolute, and a .gguf base's converted dir named."""
    model = cfg.model
    path = model.path
    if path and Path(path).expanduser().exists():
        path = _absolute(path)
    gguf_dir = model.gguf_dir
    if path and is_gguf(path) and Path(path).is_file():
        gguf_dir = str(converted_dir(path))
    output_dir = _absolute(cfg.output_dir) if cfg.output_dir else cfg.output_dir
    return replace(cfg, output_dir=output_dir, model=replace(model, path=path, gguf_dir=gguf_dir))


def locate(cfg: Config, run_dir: str | Path) -> Config:
    """The saved config of the run in `run_dir`, its base model found from here: the path as recorded, else
    the same place relative to the run dir (where the run's saved output_dir was), else, for a .gguf base,
    its converted dir. A hub id stays as it is; a base found nowhere is an error naming the places tried."""
    path = cfg.model.path
    if not path or _exists(path) or not _looks_local(path):
        return cfg
    tried = [path]
    moved = _moved_with_run(path, cfg.output_dir, Path(run_dir))
    if moved is not None:
        tried.append(str(moved))
        if moved.exists():
            return replace(cfg, model=replace(cfg.model, path=str(moved)))
    if is_gguf(path) and cfg.model.gguf_dir:
        tried.append(cfg.model.gguf_dir)
        if (Path(cfg.model.gguf_dir) / "config.json").is_file():
            return replace(cfg, model=replace(cfg.model, path=cfg.model.gguf_dir))
    raise ConfigError(f"the base model of the run in {run_dir} is not where its config.yaml says: tried "
                      f"{', '.join(tried)}. Pass --base PATH (the base model dir, hub id or .gguf file), or put "
                      "the base back there.")


def loadable_base(model: ModelConfig) -> str | None:
    """The base as another tool loads it (PEFT's `base_model_name_or_path`): a local dir absolute, a .gguf
    file's converted Hugging Face dir (transformers cannot use a .gguf file as a base), a hub id as it is."""
    path = model.path
    if path and is_gguf(path):
        if model.gguf_dir:
            return model.gguf_dir
        return str(converted_dir(path)) if Path(path).expanduser().is_file() else path
    if path and Path(path).expanduser().is_dir():
        return str(Path(path).expanduser().resolve())
    return path


def _moved_with_run(path: str, saved_output_dir: str | None, run_dir: Path) -> Path | None:
    """Where `path` is now if it moved together with the run dir (their relative place kept)."""
    if not saved_output_dir or not Path(path).is_absolute() or not Path(saved_output_dir).is_absolute():
        return None
    relative = os.path.relpath(path, saved_output_dir)
    return (run_dir.expanduser().resolve() / relative).resolve()


def _absolute(path: str) -> str:
    """`path` made absolute without resolving symlinks: a link the user points elsewhere is followed later."""
    return os.path.abspath(Path(path).expanduser())


def _exists(path: str) -> bool:
    return Path(path).expanduser().exists()


def _looks_local(path: str) -> bool:
    """Absolute, home-relative, dotted or .gguf: a path, never a hub id."""
    return Path(path).is_absolute() or path.startswith(("~", ".")) or is_gguf(path) or path.count("/") > 1
