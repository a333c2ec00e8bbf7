"""The forgetting probe on the demo (SmolLM2-135M-Instruct, examples/support_agent data): LoRA at the demo's
settings against full fine-tuning at a high learning rate, same data, same steps, the held-out conversations
as the eval split, an eval point every few steps so the trajectory shows; and the probe's share of the time.

    python benchmarks/bench_probe.py --only full --full-lr 5e-4      # one run (runs take CPU minutes each)
    python benchmarks/bench_probe.py --only lora [--lora-lr 5e-4]    # LoRA at the demo's lr, or another
    python benchmarks/bench_probe.py --table                         # no run: the table of the finished ones

Everything not given comes from the demo: examples/support_agent/config.yaml (method, lr, steps, batch) and
demo.py's data size. Each run writes OUT/<run>.json (its numbers) and OUT/<run>.log (its console, where the
forgetting message is read from); then the README-ready tables of every finished run in OUT are printed and
kept in benchmarks/results/bench_probe.json. Per eval point: eval loss, probe_nll, probe_kl; at the end the
sampled answers' distinct-2, repetition and length against the base's, whether (and at which steps) the run
printed the forgetting message, and the checkpoint it recommended."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "support_agent"
MODEL = ROOT / ".cache" / "fixtures" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = ROOT / "benchmarks" / "results" / "bench_probe.json"
WARNED = re.compile(r"^step (\d+): forgetting:", re.MULTILINE)
"""The progress line's forgetting message (train/forgetting.py RunProbe.at_step)."""


def demo_settings() -> dict:
    """The demo's training settings as config.yaml has them now, and demo.py's data size."""
    config = yaml.safe_load((DEMO / "config.yaml").read_text(encoding="utf-8"))
    sys.path.insert(0, str(DEMO))
    from demo import parse_args

    defaults = parse_args([])
    return {"method": config["method"], "lr": float(config["train"]["lr"]), "steps": config["train"]["max_steps"],
            "micro_batch_size": config["train"]["micro_batch_size"], "train": defaults.train,
            "heldout": defaults.heldout}


def make_data(out: Path, demo: dict) -> Path:
    """The demo's conversations (make_data.py, same seed and sizes), written once under OUT."""
    data = out / f"data-{demo['train']}"
    if not (data / "heldout.jsonl").is_file():
        subprocess.run([sys.executable, str(DEMO / "make_data.py"), "--out", str(data), "--train", str(demo["train"]),
                        "--heldout", str(demo["heldout"])], check=True)
    return data


def train(out: Path, name: str, data: Path, steps: int, every: int, overrides: list[str]) -> str:
    """One `sftlab train` of the demo's config with `overrides`; its console output (also kept in OUT/<name>.log)."""
    command = [sys.executable, "-m", "sftlab", "train", str(DEMO / "config.yaml"), f"model={MODEL}",
               f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'heldout.jsonl'}", f"output_dir={out / name}",
               f"train.max_steps={steps}", f"train.eval_every_steps={every}", "eval.probe=builtin", *overrides,
               "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    print(f"{name}: {' '.join(command[3:])}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    (out / f"{name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}); its output is in {out / name}.log:\n"
                         + done.stderr[-3000:])
    return done.stdout + done.stderr  # the console's lines (the forgetting message among them) go to stderr


def collect(run_dir: Path, console: str) -> dict:
    """The probe's numbers of a finished run: the trajectory, the end's instruction tax, the verdict."""
    summary = json.loads((run_dir / "probe.json").read_text(encoding="utf-8"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    probed = [m for m in metrics if "probe_kl" in m]
    steps = [m for m in metrics if "loss" in m]
    points = [{"step": m["step"], "eval_loss": m.get("eval_loss"), "probe_nll": m["probe_nll"],
               "probe_kl": m["probe_kl"]} for m in probed]
    end = probed[-1]
    step_seconds = sum(m["seconds"] for m in steps) / len(steps)
    return {"base": summary["base"], "points": points,
            "end": {k: end.get(k) for k in ("probe_nll", "probe_kl", "probe_distinct2", "probe_repetition",
                                            "probe_length")},
            "train_loss_end": steps[-1]["loss"], "threshold": summary["threshold"], "flagged": summary["flagged"],
            "warned_at": sorted({int(s) for s in WARNED.findall(console)}),
            "recommended_step": summary["recommended_step"], "sample": (summary.get("samples") or [None])[0],
            "probe_seconds": summary["probe_seconds"], "run_seconds": summary["run_seconds"],
            "step_seconds": step_seconds,
            # the probe's share of the run's training time, both measured in this run (same machine load)
            "overhead": summary["probe_seconds"] / (len(steps) * step_seconds)}


def bench(out: Path, name: str, method: str, lr: float, data: Path, args: argparse.Namespace, demo: dict) -> dict:
    overrides = [f"method={method}", f"train.lr={lr:g}", *args.extra]
    console = train(out, name, data, args.steps, args.every, overrides)
    result = {"run": name, "method": method, "lr": lr, "steps": args.steps, "every": args.every,
              "overrides": overrides, "demo": demo, **collect(out / name, console)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def refreshed(out: Path, result: dict) -> dict:
    """A finished run's numbers collected again from its dir and log (this script's reading may have changed)."""
    log = out / f"{result['run']}.log"
    return {**result, **collect(out / result["run"], log.read_text(encoding="utf-8"))} if log.is_file() else result


def tables(results: list[dict]) -> str:
    """The README's two tables: the trajectory (eval loss / probe_nll / probe_kl per eval point, one column group
    per run) and the end of each run (the instruction tax against the base, the flag, the recommendation)."""
    names = [r["run"] for r in results]
    lines = ["| step | " + " | ".join(f"{n}: eval loss / probe_nll / probe_kl" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    by_step = [{p["step"]: p for p in r["points"]} for r in results]
    base = " | ".join(f"— / {r['base']['probe_nll']:.3f} / 0" for r in results)
    lines.append(f"| 0 (base) | {base} |")
    for step in sorted({s for points in by_step for s in points}):
        cells = [_point(points.get(step)) for points in by_step]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| run | lr | steps | train loss (end) | probe_nll | probe_kl (end) | distinct-2 | repetition "
              "| length | forgetting message | recommended | probe s / train s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results:
        b, e = r["base"], r["end"]
        warned = f"yes, steps {', '.join(map(str, r['warned_at']))}" if r["warned_at"] else "no"
        recommended = f"step-{r['recommended_step']}" if r["recommended_step"] is not None else "none"
        lines.append(f"| {r['run']} | {r['lr']:g} | {r['steps']} | {r['train_loss_end']:.4f} | {b['probe_nll']:.3f} → "
                     f"{e['probe_nll']:.3f} | {e['probe_kl']:.3f} | {_tax(b, e, 'probe_distinct2', 3)} | "
                     f"{_tax(b, e, 'probe_repetition', 3)} | {_tax(b, e, 'probe_length', 1)} | {warned} | "
                     f"{recommended} | {r['probe_seconds']:.0f} / {r['steps'] * r['step_seconds']:.0f} |")
    return "\n".join(lines)


def _point(point: dict | None) -> str:
    if point is None:
        return "—"
    loss = "—" if point["eval_loss"] is None else f"{point['eval_loss']:.3f}"
    return f"{loss} / {point['probe_nll']:.3f} / {point['probe_kl']:.3f}"


def _tax(base: dict, end: dict, key: str, digits: int) -> str:
    if base.get(key) is None or end.get(key) is None:
        return "—"
    return f"{base[key]:.{digits}f} → {end[key]:.{digits}f}"


def main() -> None:
    demo = demo_settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-probe")
    parser.add_argument("--steps", type=int, default=demo["steps"], help=f"default the demo's ({demo['steps']})")
    parser.add_argument("--every", type=int, default=5, help="an eval point (eval loss and the probe) every N steps")
    parser.add_argument("--full-lr", type=float, default=5e-4)
    parser.add_argument("--lora-lr", type=float, default=demo["lr"], help=f"default the demo's ({demo['lr']:g})")
    parser.add_argument("--only", choices=["lora", "full"], default=None)
    parser.add_argument("--table", action="store_true", help="run nothing; print the tables of the finished runs")
    parser.add_argument("extra", nargs="*", help="config overrides for both runs, e.g. train.warmup_steps=1")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        data = make_data(args.out, demo)
        runs = {"lora": ("lora", args.lora_lr), "full": ("full", args.full_lr)}
        for key, (method, lr) in runs.items():
            if args.only in (None, key):
                result = bench(args.out, f"{method}-lr{lr:g}-{args.steps}steps", method, lr, data, args, demo)
                print(json.dumps({k: v for k, v in result.items() if k not in ("sample", "demo")}), flush=True)
    finished = [refreshed(args.out, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(args.out.glob("*.json"))]
    finished.sort(key=lambda r: (r["method"] != "lora", r["lr"], r["steps"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(finished, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(tables(finished))
    print(f"\n{len(finished)} runs; their numbers in {RESULTS}")


if __name__ == "__main__":
    main()
