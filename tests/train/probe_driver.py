"""Run under torchrun by test_probe.py: sftlab's own prepare + train with the probe on, counting on each rank the
probe's forwards (decoding and scoring calls) into probe-calls-RANK.json beside OUT_JSON.

    torchrun --nproc-per-node 2 tests/train/probe_driver.py OUT_JSON key=value ...
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

from sftlab import runs
from sftlab.config import load_config
from sftlab.train.probe import Prober


def count(calls: Counter, name: str) -> None:
    """Prober.<name>, each call counted (the real method runs)."""
    real = getattr(Prober, name)

    def spy(self, *args, **kwargs):
        calls[name] += 1
        return real(self, *args, **kwargs)

    setattr(Prober, name, spy)


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    calls: Counter = Counter()
    for name in ("decode", "score"):
        count(calls, name)
    setup = runs.prepare(load_config(overrides=overrides), console=Console())
    runs.train(setup, console=Console())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe-calls-{setup.dist.rank}.json").write_text(json.dumps({"world": setup.dist.world, **calls}))


if __name__ == "__main__":
    main()
