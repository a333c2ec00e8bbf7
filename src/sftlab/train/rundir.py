"""The output dir of a run: what in it is the run's, who may use it, whether it is finished, and what
starting there again means.

- A run owns only what it wrote: OUTPUT/.sftlab-manifest.json (files.py) names its entries, each recorded
  before it is written. Anything else there is the user's and is never written, replaced or removed, and
  no write follows a symlink; a run that would have to (a user's `config.yaml` or `model/` where the run
  writes its own) is refused before it writes anything, naming them.
- A dir is a run's only when its manifest says so. A non-empty dir without one is refused (a typo in
  output_dir never mixes a run into someone's folder); `--overwrite` writes there beside the user's files
  and removes none of them.
- Run dirs of sftlab versions before the manifest (finished.json or checkpoints/step-N, no manifest) are
  adopted conservatively: only RUN_FILES entries that are plainly the run's (real files and dirs, not
  symlinks, holding no input of the run — the base model, data files, dpo.init_from — and `model/`,
  `adapter/`, `base/` only where the saved config says the run wrote them) are recorded as its; every
  other entry stays the user's. A wrong guess can only keep a file, never remove one.
- Inputs and the output may not overlap where a write could land on an input: output_dir equal to the
  model dir, the data file or the model dir inside output_dir under a name the run writes, are refused.
- One run at a time (train/lock.py).
- A finished run (FINISHED, written last) is never trained over: the same config again has nothing to
  do, anything else needs `--overwrite`, which deletes the manifest's files (and nothing else) first.
- An unfinished run resumes (train.resume=auto) only under the config that wrote its checkpoints, up to
  the settings that do not change what is trained (logging, checkpoint period, output paths);
  train.resume=never starts over and removes the old checkpoints, so they can never be mistaken for the
  new run's.
- What interrupted writes of the run's own files left behind (scratch dirs of checkpoints and exports) is
  removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from sftlab import files
from sftlab.config import Config, ConfigError, load_config, sources_of, to_dict
from sftlab.errors import SftlabError
from sftlab.export.model_dir import ADAPTER_CONFIG
from sftlab.files import CONTROL_NAMES, ForeignPathError, remove_scratch, write_text_atomic
from sftlab.methods import method_class
from sftlab.models.portable import portable
from sftlab.train import lock, trackers
from sftlab.train.checkpoint import checkpoint_dir, latest_checkpoint

FINISHED = "finished.json"
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints", "adapter", "model", "report.html",
             "report.json", "rejects.jsonl", "eval_rejects.jsonl", "tensorboard", "wandb", "mlruns", "base", FINISHED)
"""What a run may write in its output dir (besides the lock and the manifest); what it did write, its
manifest names, and only that is ever removed."""
FREE_TO_CHANGE = ("output_dir", "model.gguf_dir", "data.cache", "data.cache_dir", "train.log_every_steps",
                  "train.tensorboard", "train.report_to",
                  "train.profile", "train.save_every_steps", "train.keep_checkpoints", "train.resume",
                  "train.on_nonfinite", "train.fused_ops", "train.compile", "train.resume_on_new_data",
                  "train.gradient_checkpointing")
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
    refuse_overlap(cfg)
    names = files.manifest(out) if out.is_dir() else []
    if names is None:
        names = _legacy_run(out, cfg)
    if names is None and not overwrite:
        _refuse_foreign(out)
    _refuse_collisions(out, cfg, names or [])
    lock.acquire(out)
    try:
        if names is None or files.manifest(out) is None:
            files.write_manifest(out, names or [])  # before the first file: the dir is a run's from now on
            if names:
                console.print(f"{out}: a run of an earlier sftlab without a manifest; its own files are taken "
                              f"to be {', '.join(sorted(names))} (anything else there is left alone)", markup=False)
        _prepare(out, cfg, overwrite, console)
    except BaseException:
        lock.release(out)
        raise
    return out


def finish(out: Path, *, steps: int, export: Path | None, final_loss: float | None) -> None:
    """Mark the run finished (the last file a run writes)."""
    record = {"steps": steps, "export": export.name if export else None, "final_loss": final_loss,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(files.owned(out, FINISHED), json.dumps(record, indent=1) + "\n")


def finished(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out) / FINISHED).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def clear(out: Path) -> list[str]:
    """Remove the run's own files — the ones its manifest names — from `out`, never anything else (a dir
    without a manifest loses nothing); returns their names."""
    names = files.manifest(out)
    if names is None:
        return []
    removed = []
    for name in names:
        path = out / name
        if path.is_symlink():
            raise ForeignPathError(f"{path} is a symlink (to {path.readlink()}); sftlab never removes through a "
                                   "symlink in a run dir. Remove the link yourself, or set another output_dir.")
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    scratch = remove_scratch(out, names)
    files.write_manifest(out, [])
    return removed + scratch


def _prepare(out: Path, cfg: Config, overwrite: bool, console: Console) -> None:
    done = finished(out)
    if overwrite:
        if clear(out):
            console.print(f"--overwrite: removed the previous run's files from {out}", markup=False)
        return
    if done is not None:
        summary = f"{done.get('steps', '?')} steps, wrote {done.get('export') or 'nothing'}, on " \
                  f"{done.get('finished', '?')}"
        raise RunFinishedError(out, summary, same_config=cfg.train.resume == "auto" and not _differences(out, cfg))
    names = files.manifest(out) or []
    remove_scratch(out, names)
    if "checkpoints" in names:
        remove_scratch(checkpoint_dir(out))
    latest = latest_checkpoint(out) if "checkpoints" in names else None
    if latest is None:
        return
    if cfg.train.resume == "never":
        clear(out)
        console.print(f"train.resume=never: removed the unfinished run in {out} (checkpoints up to {latest.name})",
                      markup=False)
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
    old, new = _flat(to_dict(portable(saved))), _flat(to_dict(portable(as_saved(cfg))))
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if key not in FREE_TO_CHANGE and old.get(key) != new.get(key)]


def as_saved(cfg: Config) -> Config:
    """The config as the run saves it: stage dpo with dpo.init_from names the model it really starts from —
    the merged SFT model OUTPUT/base (dpo.init=merge; train/setup.py writes it) or, for full fine-tuning, the
    SFT run's model/ — and clears init_from, so that generate/chat load the right model and resuming with
    the user's own command compares equal. An SFT adapter that trains on (dpo.init=continue) stays named."""
    if cfg.stage != "dpo" or not cfg.dpo.init_from:
        return cfg
    if method_class(cfg.method).whole_model:
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
    """A non-empty dir without a manifest is not a run's: refused unless --overwrite says to write there."""
    if not out.is_dir():
        return
    entries = [child.name for child in out.iterdir() if child.name not in CONTROL_NAMES]
    if entries:
        shown = ", ".join(sorted(entries)[:5]) + (", …" if len(entries) > 5 else "")
        raise ConfigError(f"output_dir {out} already holds files that are not an sftlab run ({shown}): it has no "
                          f"{files.MANIFEST}. Set output_dir to a new or empty directory, or pass --overwrite to "
                          "write the run there beside them (none of them is ever changed or removed).")


def planned(cfg: Config) -> list[str]:
    """The entries this config's run writes in its output dir."""
    names = ["config.yaml", "metrics.jsonl", "loss.png", "checkpoints", method_class(cfg.method).export_dir(),
             "report.html", "report.json", "rejects.jsonl", FINISHED]
    if cfg.data.eval:
        names.append("eval_rejects.jsonl")
    if cfg.eval.probe != "none":
        names += ["probe_reference.safetensors", "probe.json"]  # train/forgetting.py
    names += trackers.run_entries(cfg)
    if (cfg.stage == "dpo" and cfg.dpo.init_from and cfg.dpo.init == "merge"
            and not method_class(cfg.method).whole_model):
        names.append("base")
    return names


def _refuse_collisions(out: Path, cfg: Config, names: list[str]) -> None:
    """Refuse, before anything is written, a run that would have to replace or write through the user's."""
    if not out.is_dir():
        return
    links = [name for name in {*planned(cfg), *names, *CONTROL_NAMES} if (out / name).is_symlink()]
    if links:
        shown = ", ".join(f"{name} -> {(out / name).readlink()}" for name in sorted(links))
        raise ConfigError(f"output_dir {out} holds symlinks where the run writes ({shown}); sftlab never writes "
                          "through a symlink in a run dir. Remove them, or set another output_dir.")
    theirs = sorted(name for name in planned(cfg) if (out / name).exists() and name not in names)
    if theirs:
        raise ConfigError(f"output_dir {out} holds {', '.join(theirs)}, which the run writes but did not write "
                          f"(its {files.MANIFEST} does not name them): they are never replaced or removed. Move "
                          "them away, or set output_dir to a new directory.")


def inputs(cfg: Config) -> list[tuple[str, Path]]:
    """(key, path) of each local file or dir the run reads: the data files, the model, dpo.init_from."""
    found = [(f"data.{key}", spec.path) for key in ("train", "eval") for spec in sources_of(getattr(cfg.data, key))]
    found += [("model", cfg.model.path), ("dpo.init_from", cfg.dpo.init_from)]
    return [(key, Path(value).expanduser()) for key, value in found
            if value and Path(value).expanduser().exists()]


def refuse_overlap(cfg: Config) -> None:
    """Refuse an output_dir that is an input, or that holds an input where the run writes (the run would
    overwrite it, or --overwrite remove it). An input elsewhere inside output_dir is fine."""
    out = Path(cfg.output_dir).expanduser().resolve()
    for key, path in inputs(cfg):
        where = path.resolve()
        if key == "model" and where == out / "base" and "base" in (_manifest_or_none(out) or []):
            continue  # dpo.init=merge: the run's own merged SFT model, which its saved config names (as_saved)
        if where == out:
            raise ConfigError(f"output_dir {cfg.output_dir} is {key} {path} itself: the run would write its files "
                              "among the input's. Set output_dir to a new directory, e.g. "
                              f"{out.parent / (out.name + '-run')}.")
        if out in where.parents:
            top = where.relative_to(out).parts[0]
            if top in {*RUN_FILES, *CONTROL_NAMES}:
                raise ConfigError(f"{key} {path} lies inside output_dir {cfg.output_dir} at {top}, where the run "
                                  f"writes its own {top}: it would be overwritten. Set output_dir to a new "
                                  f"directory (e.g. {out.parent / (out.name + '-run')}), or move {key} out of it.")


def _manifest_or_none(out: Path) -> list[str] | None:
    return files.manifest(out) if out.is_dir() else None


def _legacy_run(out: Path, cfg: Config) -> list[str] | None:
    """The entries a run of an sftlab before manifests wrote in `out` (see the module doc), or None when `out`
    holds no such run. Conservative by design: an entry is the run's only when nothing suggests otherwise."""
    if not out.is_dir():
        return []
    done = finished(out)
    has_checkpoints = latest_checkpoint(out) is not None
    if not (isinstance(done, dict) and "steps" in done) and not has_checkpoints:
        return None
    try:
        saved = load_config(out / "config.yaml")
    except SftlabError:
        saved = None
    reads = [path.resolve() for key, path in inputs(cfg) + (inputs(saved) if saved else [])]
    wrote = {"model": saved is not None and method_class(saved.method).whole_model,
             "adapter": (out / "adapter" / ADAPTER_CONFIG).is_file(),
             "base": saved is not None and saved.stage == "dpo" and saved.dpo.init == "merge",
             "checkpoints": has_checkpoints, "config.yaml": saved is not None}
    names = []
    for name in RUN_FILES:
        path = out / name
        if path.is_symlink() or not path.exists() or not wrote.get(name, True):
            continue
        where = path.resolve()
        if any(read == where or where in read.parents for read in reads):
            continue  # an input of the run: the user's
        names.append(name)
    return names


DATA_KEYS = ("train", "eval")
"""The data settings whose files a checkpoint records (TrainState.extra["data"]) and a resume compares."""


def data_fingerprints(cfg: Config) -> dict[str, dict[str, Any]]:
    """data.train / data.eval -> their content's fingerprint (data/cache.py), as a checkpoint records it; several
    sources give one fingerprint covering them all (any one changed changes it)."""
    found = {}
    for key in DATA_KEYS:
        prints = [_source_print(spec) for spec in sources_of(getattr(cfg.data, key))]
        if len(prints) == 1:
            found[key] = prints[0]
        elif prints:
            digest = hashlib.blake2b(digest_size=20)
            for one in prints:
                digest.update(f"{one['path']}\0{one.get('blake2b', '')}\0".encode())
            found[key] = {"path": ", ".join(p["path"] for p in prints), "sources": len(prints),
                          "blake2b": digest.hexdigest()}
    return found


def _source_print(spec: Any) -> dict[str, Any]:
    """A file or directory as data/cache.py prints it; a glob or hub dataset by what it resolves to (the files'
    bytes, the hub commit)."""
    from sftlab.data.cache import fingerprint
    from sftlab.data.sources import resolve

    if Path(spec.path).expanduser().exists():
        return fingerprint(Path(spec.path).expanduser())
    try:
        return {"path": spec.path, "blake2b": resolve(spec).fingerprint()}
    except SftlabError:  # unreachable now: setup names the problem; nothing to compare
        return {"path": spec.path}


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
    if "bytes" not in print_:  # several sources, a glob or a hub dataset: the digest only
        return f"blake2b {print_['blake2b'][:12]}"
    return f"{print_['bytes']:,} bytes, modified {print_['modified']}, blake2b {print_['blake2b'][:12]}"
