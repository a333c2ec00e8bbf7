"""Run under torchrun by test_distributed.py: `sftlab`'s own prepare + train, plus what the tests inspect.

    torchrun --nproc-per-node 2 tests/train/dist_driver.py OUT_JSON [--kill-at N] [--step-sleep S] key=value ...
    torchrun --nproc-per-node 2 tests/train/dist_driver.py OUT_JSON key=value ... --next OUT_JSON2 key=value ...

Runs given with --next train one after another in the same launch (the same processes and process group):
each launch pays seconds of process start and imports, so the tests that only read finished runs share one.

Each rank records the source rows of each micro-batch it trained on (`seen-RANK.json` next to
OUT_JSON); after training, every rank takes part in a forward of fixed token ids and rank 0 writes the
logits (taken after the last step, before train() exports) and the trainable weights (whole) to
OUT_JSON's directory.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

import sftlab.train.loop as loop
from sftlab import runs
from sftlab.config import load_config
from sftlab.data.batching import collate_packed
from sftlab.data.encode import Example
from sftlab.runs import prepare


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    kill_at, step_sleep = None, 0.0
    while args and args[0] in ("--kill-at", "--step-sleep"):
        if args[0] == "--kill-at":
            kill_at = int(args[1])
        else:
            step_sleep = float(args[1])
        args = args[2:]
    torch.set_num_threads(1)
    while "--next" in args:  # this run's settings, then the next run's OUT_JSON and settings
        at = args.index("--next")
        run_one(out, args[:at], kill_at, step_sleep)
        out, args = Path(args[at + 1]), args[at + 2:]
    run_one(out, args, kill_at, step_sleep)


def run_one(out: Path, args: list[str], kill_at: int | None, step_sleep: float) -> None:
    real, real_wrap = loop.make_batch, loop.distributed.wrap
    try:
        train_and_record(out, args, kill_at, step_sleep)
    finally:
        loop.make_batch, loop.distributed.wrap = real, real_wrap


def train_and_record(out: Path, args: list[str], kill_at: int | None, step_sleep: float) -> None:
    setup = prepare(load_config(overrides=args), console=Console(quiet=True))
    seen: list[list[str]] = []
    real = loop.make_batch

    def spy(setup_, dataset, chosen, pad_id):
        batch = real(setup_, dataset, chosen, pad_id)
        if dataset is setup.train_data:
            seen.append(list(batch.where))
        return batch

    loop.make_batch = spy

    engines = []
    real_wrap = loop.distributed.wrap
    loop.distributed.wrap = lambda *a, **k: engines.append(real_wrap(*a, **k)) or engines[-1]
    ids = torch.arange(3, 40).reshape(1, -1) % setup.model.config.vocab_size
    logits = []
    last = loop.total_steps(setup)

    def on_step(step: int) -> None:
        if step == kill_at:
            raise SystemExit(3)
        time.sleep(step_sleep)
        if step == last:  # the distributed model's logits, before train() exports
            for module in engines[0].modules():  # FSDP: every rank gathers every group's parameters
                if hasattr(module, "unshard") and hasattr(module, "reshard"):
                    module.unshard()
            # One sequence, with its boundaries: inside a packed run, attention wants them.
            inputs = collate_packed([Example(ids[0].tolist(), ids[0].tolist())]).to(setup.device).model_inputs()
            with torch.no_grad():
                logits.append(setup.model(**inputs).logits.float().cpu())

    runs.train(setup, console=Console(quiet=True), on_step=on_step)
    rank = setup.dist.rank
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"seen-{rank}.json").write_text(json.dumps(seen))
    # Rank 0's weights are whole after train() (it gathered FSDP's shards for the export).
    weights = {k: v.detach().float().cpu().clone() for k, v in setup.method.state_dict(setup.model).items()} \
        if rank == 0 else {}
    if rank == 0:
        save_file({"logits": logits[0].contiguous(), **{f"w.{k}": v for k, v in weights.items()}},
                  str(out.parent / "result.safetensors"))
        out.write_text(json.dumps({"mode": setup.dist.mode, "world": setup.dist.world}))


if __name__ == "__main__":
    main()
