"""The output dir of a run: who may use it, whether it is finished, and what starting there again means.

- One run at a time (train/lock.py); a dir that holds files but no sftlab run is refused, so a typo in
  output_dir never mixes a run into someone's folder.
- A finished run (FINISHED, written last) is never trained over: the same config again has nothing to
  do, anything else needs `--overwrite`, which deletes the run's own files (and nothing else) first.
- An unfinished run resumes (train.resume=auto) only under the config that wrote its checkpoints, up to
  the settings that do not change what is trained (logging, checkpoint period, output paths);
  train.resume=never starts over and removes the old checkpoints, so they can never be mistaken for the
  new run's.
- What interrupted writes left behind (scratch dirs of checkpoints and exports) is removed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from sftlab.config import Config, ConfigError, load_config, to_dict
from sftlab.errors import SftlabError
from sftlab.export.model_dir import ADAPTER_CONFIG
from sftlab.files import remove_scratch, write_text_atomic
from sftlab.train import lock
from sftlab.train.checkpoint import checkpoint_dir, latest_checkpoint

FINISHED = "finished.json"
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints", "adapter", "model", "report.html",
             "report.json", "rejects.jsonl", "eval_rejects.jsonl", "tensorboard", "base", FINISHED)
"""What a run writes in its output dir (besides the lock): all that --overwrite removes."""
FREE_TO_CHANGE = ("output_dir", "data.cache", "data.cache_dir", "train.log_every_steps", "train.tensorboard",
                  "train.profile", "train.save_every_steps", "train.keep_checkpoints", "train.resume",
                  "train.on_nonfinite", "train.fused_ops", "train.compile", "train.resume_on_new_data")
"""Settings a resumed run may change: they do not change what is trained."""


class RunFinishedError(SftlabError):
    """The output dir holds a finished run and --overwrite was not given."""

    def __init__(self, out: Path, summary: str, *, same_config: bool) -> None:
        super().__init__(f"{out} holds a finished run ({summary}); a finished run is never trained over. Set "
                         "another output_dir, or pass --overwrite (sftlab train) to delete its files and train again.")
        self.same_config = same_config
        """True when the config is the one the finished run was trained with: nothing is left to do."""
        self.nothing_to_do = f"{out} already holds this run, finished ({summary}); --overwrite trains it again."


def claim(cfg: Config, *, overwrite: bool = False, console: Console | None = None) -> Path:
    """Take the run's output dir for this process (lock), after the checks above; returns it."""
    console = console or Console(stderr=True)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; set output_dir to a directory (new or a run's).")
    if out.is_dir() and not overwrite:
        _refuse_foreign(out)
    lock.acquire(out)
    try:
        _prepare(out, cfg, overwrite, console)
    except BaseException:
        lock.release(out)
        raise
    return out


def finish(out: Path, *, steps: int, export: Path | None, final_loss: float | None) -> None:
    """Mark the run finished (the last file a run writes)."""
    record = {"steps": steps, "export": export.name if export else None, "final_loss": final_loss,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(out / FINISHED, json.dumps(record, indent=1) + "\n")


def finished(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out) / FINISHED).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def clear(out: Path) -> list[str]:
    """Remove the run's own files from `out` (never anything else); returns their names."""
    removed = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed + remove_scratch(out)


def _prepare(out: Path, cfg: Config, overwrite: bool, console: Console) -> None:
    done = finished(out)
    if overwrite:
        if clear(out):
            console.print(f"--overwrite: removed the previous run's files from {out}")
        return
    if done is not None:
        summary = f"{done.get('steps', '?')} steps, wrote {done.get('export') or 'nothing'}, on " \
                  f"{done.get('finished', '?')}"
        raise RunFinishedError(out, summary, same_config=cfg.train.resume == "auto" and not _differences(out, cfg))
    remove_scratch(out)
    remove_scratch(checkpoint_dir(out))
    latest = latest_checkpoint(out)
    if latest is None:
        return
    if cfg.train.resume == "never":
        clear(out)
        console.print(f"train.resume=never: removed the unfinished run in {out} (checkpoints up to {latest.name})")
        return
    changed = _differences(out, cfg)
    if changed:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:6])
        raise ConfigError(f"{out} holds checkpoints (up to {latest.name}) of a run with another config ({listed}). "
                          "Resuming needs the config that wrote them: restore those settings, or start over with "
                          "--no-resume (train.resume=never), or set another output_dir.")
    _check_data(latest, cfg, console)


def _differences(out: Path, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each setting that differs from the run's saved config.yaml,
    except FREE_TO_CHANGE; a missing or unreadable config.yaml differs in `config.yaml` itself."""
    saved_path = out / "config.yaml"
    try:
        saved = load_config(saved_path)
    except SftlabError:
        return [("config.yaml", "unreadable" if saved_path.exists() else "missing", "this config")]
    old, new = _flat(to_dict(saved)), _flat(to_dict(as_saved(cfg)))
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if key not in FREE_TO_CHANGE and old.get(key) != new.get(key)]


def as_saved(cfg: Config) -> Config:
    """The config as the run saves it: stage dpo with dpo.init_from names the model it really starts from —
    the merged SFT model OUTPUT/base (dpo.init=merge; train/setup.py writes it) or, for full fine-tuning, the
    SFT run's model/ — and clears init_from, so that generate/chat load the right model and resuming with
    the user's own command compares equal. An SFT adapter that trains on (dpo.init=continue) stays named."""
    if cfg.stage != "dpo" or not cfg.dpo.init_from:
        return cfg
    if cfg.method == "full":
        start = init_dir(cfg, "model")
    elif cfg.dpo.init == "merge":
        start = Path(cfg.output_dir) / "base"
    else:
        return cfg
    return replace(cfg, model=replace(cfg.model, path=str(start)), dpo=replace(cfg.dpo, init_from=None))


def init_dir(cfg: Config, kind: str) -> Path:
    """dpo.init_from's `adapter` or `model` dir: the SFT run dir's adapter/ or model/, or the dir itself."""
    root = Path(cfg.dpo.init_from).expanduser()
    marker = ADAPTER_CONFIG if kind == "adapter" else "config.json"
    for candidate in (root / kind, root):
        if (candidate / marker).is_file():
            return candidate
    raise ConfigError(f"dpo.init_from={cfg.dpo.init_from}: no {kind} there (no {root / kind / marker} nor "
                      f"{root / marker}); point it at an SFT run dir trained with method={cfg.method}.")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "role_map":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def _refuse_foreign(out: Path) -> None:
    entries = [child.name for child in out.iterdir()]
    ours = set(RUN_FILES) | {lock.LOCK_NAME}
    if entries and not any(name in ours for name in entries):
        shown = ", ".join(sorted(entries)[:5]) + (", …" if len(entries) > 5 else "")
        raise ConfigError(f"output_dir {out} already holds files that are not an sftlab run ({shown}); a run "
                          "writes its files there. Set output_dir to a new or empty directory (or pass "
                          "--overwrite to write there anyway; only the run's own files are ever removed).")


DATA_KEYS = ("train", "eval")
"""The data settings whose files a checkpoint records (TrainState.extra["data"]) and a resume compares."""


def data_fingerprints(cfg: Config) -> dict[str, dict[str, Any]]:
    """data.train / data.eval -> their content's fingerprint (data/cache.py), as a checkpoint records it."""
    from sftlab.data.cache import fingerprint

    return {key: fingerprint(value) for key in DATA_KEYS if (value := getattr(cfg.data, key))}


def _check_data(latest: Path, cfg: Config, console: Console) -> None:
    """Refuse to resume `latest` on data files whose content changed since it was written (the run would go
    on in its old data order over other rows), unless train.resume_on_new_data. A checkpoint that recorded
    no fingerprint (written before sftlab recorded them) has nothing to compare."""
    try:
        recorded = json.loads((latest / "state.json").read_text(encoding="utf-8"))["state"]["extra"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = data_fingerprints(cfg)
    changed = [(key, recorded[key], now[key]) for key in DATA_KEYS
               if isinstance(recorded.get(key), dict) and key in now
               and recorded[key].get("blake2b") != now[key].get("blake2b")]
    if not changed:
        return
    listed = "; ".join(f"data.{key} {new['path']}: {_described(old)} then, {_described(new)} now"
                       for key, old, new in changed)
    if cfg.train.resume_on_new_data:
        console.print(f"train.resume_on_new_data: resuming {latest} on changed data ({listed})", markup=False)
        return
    raise ConfigError(f"the data changed since {latest} was written: {listed}. Resuming would continue the run's "
                      "data order over other rows. Restore the data file, or set train.resume_on_new_data=true to "
                      "continue on the new data, or start over with --no-resume (train.resume=never).")


def _described(print_: dict[str, Any]) -> str:
    if "blake2b" not in print_:
        return "not a file"
    return f"{print_['bytes']:,} bytes, modified {print_['modified']}, blake2b {print_['blake2b'][:12]}"
