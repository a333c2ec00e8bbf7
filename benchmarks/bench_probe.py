"""The forgetting probe on the demo (SmolLM2-135M-Instruct, examples/support_agent data): LoRA at the demo's
settings against full fine-tuning at a high learning rate, and the probe's share of the run's time.

    python benchmarks/bench_probe.py --out runs/bench-probe [--steps 24] [--full-lr 1e-3]

Prints one line per run: the probe's base values and final values, the flag, and probe seconds / run seconds
(both measured inside the same run, so a shared machine's load affects both alike)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "support_agent"
MODEL = ROOT / ".cache" / "fixtures" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(out: Path, name: str, data: Path, steps: int, *overrides: str) -> dict:
    target = out / name
    command = [sys.executable, "-m", "sftlab", "train", str(DEMO / "config.yaml"), f"model={MODEL}",
               f"data.train={data}", f"output_dir={target}", f"train.max_steps={steps}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads((target / "probe.json").read_text())
    last = summary["history"][-1]
    metrics = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "probe_nll" in m][-1]
    step_seconds = [m["seconds"] for m in metrics if "loss" in m]
    per_step = sum(step_seconds) / len(step_seconds)
    return {"run": name, "steps": steps, "base": summary["base"], "final": final, "flagged": summary["flagged"],
            "probe_seconds": summary["probe_seconds"], "run_seconds": summary["run_seconds"], "last": last,
            "step_seconds": per_step,
            # the probe's share of the run's training time, both measured in this run (same machine load)
            "overhead": summary["probe_seconds"] / (steps * per_step)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-probe")
    parser.add_argument("--steps", type=int, default=24)  # the demo's
    parser.add_argument("--full-lr", default="1e-3")
    parser.add_argument("--only", choices=["lora", "full"], default=None)
    parser.add_argument("extra", nargs="*", help="config overrides for both runs, e.g. train.warmup_steps=1")
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(DEMO / "make_data.py"), "--out", str(data), "--train", "240"], check=True)
    runs = {"lora": tuple(args.extra), "full": ("method=full", f"train.lr={args.full_lr}", *args.extra)}
    for name, overrides in runs.items():
        if args.only in (None, name):
            print(json.dumps(run(args.out, name, data / "train.jsonl", args.steps, *overrides)), flush=True)


if __name__ == "__main__":
    main()
