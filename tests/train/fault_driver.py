"""`sftlab train` in a subprocess with a fault injected at an exact point (tests/train/test_faults.py).

    python fault_driver.py [--kill POINT] [--step-sleep S] [--fsize BYTES] -- CONFIG [key=value ...]

POINT is where the process SIGKILLs itself (a real SIGKILL: no handler, no cleanup runs):
  step:K              after step K (and its checkpoint, if one is due) finished
  checkpoint-weights:K  while writing step K's checkpoint, its weights written, its optimizer and state not
  checkpoint-rename:K   step K's checkpoint complete in its scratch dir, before it is renamed into place
  prune:K             while deleting the checkpoint that step K's checkpoint pushes out (renamed aside)
  export              in the middle of writing the export (the adapter's files partly written)
--step-sleep makes each step last at least S seconds (so that a signal from the test lands mid-run);
--fsize sets RLIMIT_FSIZE: a write past BYTES fails with EFBIG, a real write fault.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
import types


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--fsize", type=int)
    args, rest = parser.parse_known_args()
    rest = [item for item in rest if item != "--"]
    if args.fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    from sftlab import export, runs
    from sftlab.cli import main as cli
    from sftlab.train import checkpoint

    point, _, at = (args.kill or "").partition(":")
    at = int(at) if at else None
    current: dict[str, int | None] = {"step": 0, "saving": None}

    def on_step(step: int) -> None:
        current["step"] = step
        if point == "step" and step == at:
            die()
        time.sleep(args.step_sleep)

    real_fit = runs.fit
    runs.fit = lambda setup, **kwargs: real_fit(setup, **{**kwargs, "on_step": on_step})

    real_save_checkpoint = checkpoint.save_checkpoint

    def save_checkpoint(run_dir, state, **kwargs):
        current["saving"] = state.step
        try:
            return real_save_checkpoint(run_dir, state, **kwargs)
        finally:
            current["saving"] = None
    checkpoint.save_checkpoint = save_checkpoint

    def saving_step() -> int | None:  # the step whose checkpoint is being written
        return current.get("saving")

    if point == "checkpoint-weights":
        real_save_file = checkpoint.save_file

        def save_file(tensors, path, *a, **k):
            real_save_file(tensors, path, *a, **k)
            if saving_step() == at:
                die()
        checkpoint.save_file = save_file
    elif point == "checkpoint-rename":
        real_sync = checkpoint.sync_tree

        def sync_tree(path):
            if saving_step() == at:
                die()
            real_sync(path)
        checkpoint.sync_tree = sync_tree
    elif point == "prune":
        real_rmtree = checkpoint.shutil.rmtree

        def rmtree(path, *a, **k):
            if ".trash-" in str(path) and saving_step() == at:
                die()
            real_rmtree(path, *a, **k)
        checkpoint.shutil = types.SimpleNamespace(rmtree=rmtree)
    elif point == "export":
        real_save_trained = export.save_trained

        def save_trained(*a, into=None, **k):
            real_save_trained(*a, into=into, **k)
            victim = next(p for p in sorted(into.iterdir()) if p.suffix == ".safetensors")
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # half written
            die()
        export.save_trained = save_trained
    return cli(["train", *rest])


if __name__ == "__main__":
    sys.exit(main())
