"""Checkpoints: trainable weights (safetensors), optimizer + scheduler, step, data cursor, RNG states.

Written into a temporary directory and renamed into place, so a kill at any moment leaves the previous
checkpoint intact (a failed write, e.g. a full disk, removes its partial directory and says so); the newest
`keep` are kept, older ones renamed aside before they are deleted. Nothing is unpickled on load: weights come from
safetensors, optimizer state and RNG tensors through `torch.load(weights_only=True)`, the rest is JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sftlab.errors import SftlabError
from sftlab.files import WRITE_ERRORS, WriteError, describe, sync_path, sync_tree
from sftlab.train.distributed import SINGLE, Dist

_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    position: int = 0
    """Data cursor: micro-batches of epoch `epoch`'s plan already consumed (train/loop.py epoch_plan)."""
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient (train.on_nonfinite=skip)."""
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = []
    directory = checkpoint_dir(run_dir)
    if directory.is_dir():
        for child in directory.iterdir():
            match = _STEP_DIR.fullmatch(child.name)
            if match and (child / "state.json").is_file():
                found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def save_checkpoint(run_dir: Path, state: TrainState, *, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, keep: int, ctx: Dist = SINGLE,
                    model: nn.Module | None = None) -> Path:
    """Write checkpoints/step-N atomically. With several ranks all of them call it: under FSDP each writes
    its shards (torch.distributed.checkpoint, `sharded/`), otherwise rank 0 writes the weights; every rank
    writes its RNG state; rank 0 renames the finished directory into place."""
    directory = checkpoint_dir(run_dir)
    final = directory / f"step-{state.step}"
    tmp = directory / f".tmp-step-{state.step}-{os.getpid() if not ctx.enabled else 'ranks'}"
    if ctx.main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()
    try:
        if ctx.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dcp.save({"trainable": trainable, "optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=tmp / "sharded")
        elif ctx.main:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_tensors(), tmp / _rng_file(ctx.rank))
        ctx.barrier()
        if ctx.main:
            record = {"state": asdict(state), "scheduler": scheduler.state_dict(),
                      "python_rng": _python_rng_to_json(random.getstate()), "world_size": ctx.world}
            (tmp / "state.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
            sync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            sync_path(directory)
    except WRITE_ERRORS as exc:
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = (f"the last complete checkpoint, {previous.name}, is kept" if previous
                else "there is no earlier checkpoint")
        raise WriteError(f"writing checkpoint step-{state.step} into {directory} failed: {describe(exc)}. The "
                         f"partial write was removed and {kept}.") from None
    except BaseException:
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.main:
        _prune(directory, keep, protect=state.extra.get("keep_steps", ()))
    ctx.barrier()
    return final


def load_checkpoint(path: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any, method: Any,
                    model: nn.Module, ctx: Dist = SINGLE) -> TrainState:
    """Restore the trainable weights, optimizer, scheduler and this rank's RNG states in place; return the
    TrainState. A checkpoint resumes under the world size that wrote it."""
    try:
        record = json.loads((path / "state.json").read_text(encoding="utf-8"))
        written_by = record.get("world_size", 1)
        if written_by != ctx.world:
            raise SftlabError(f"checkpoint {path} was written by {written_by} processes and this run has {ctx.world}; "
                              f"resume with the same number of processes, or set train.resume=never.")
        if (path / "sharded").is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            if not ctx.sharded:
                raise SftlabError(f"checkpoint {path} holds FSDP shards; resume it with train.distributed=fsdp.")
            state_dict = {"trainable": method.state_dict(model),
                          "optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state_dict, checkpoint_id=path / "sharded")  # into the (sharded) parameters in place
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state_dict["optimizer"])
        else:
            method.load_state_dict(model, load_file(path / "trainable.safetensors"))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        rng = torch.load(path / _rng_file(ctx.rank), weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
        # UnpicklingError: torch.load(weights_only=True) refused something that is not plain tensors.
        reason = str(exc).split("\n")[0] if isinstance(exc, pickle.UnpicklingError) else exc
        raise SftlabError(f"checkpoint {path} cannot be read ({reason}); delete it to resume from the one "
                          "before, or set train.resume=never to start over.") from None
    scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    random.setstate(_python_rng_from_json(record["python_rng"]))
    return TrainState(**record["state"])


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def _rng_tensors() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _prune(directory: Path, keep: int, protect: Any = ()) -> None:
    """Remove all but the `keep` newest checkpoints, and never the steps in `protect` (the probe's recommended
    checkpoint, train/forgetting.py)."""
    steps = sorted((int(m.group(1)), child) for child in directory.iterdir()
                   if (m := _STEP_DIR.fullmatch(child.name)))
    for step, child in steps[:-keep]:
        if step in protect:
            continue
        # Renamed aside first: a kill during the delete leaves scratch (removed at the next start), never
        # a half-deleted step-N that looks like a checkpoint.
        trash = child.with_name(f".{child.name}.trash-{os.getpid()}")
        os.rename(child, trash)
        shutil.rmtree(trash, ignore_errors=True)
