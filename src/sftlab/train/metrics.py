"""Progress bar, metrics.jsonl (one line per logged step, plus eval lines), loss.png; each line also goes to the
run's experiment trackers (train/trackers.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sftlab import files
from sftlab.files import write_text_atomic

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    """With train.profile: seconds of each step spent per phase (data / forward / backward / optimizer),
    logged as time_<phase>. On a GPU each mark waits for the queued kernels, so the split is true (and the
    step a little slower); without profile it does nothing."""

    def __init__(self, *, enabled: bool, device: Any) -> None:
        self.enabled = enabled
        self._cuda = enabled and getattr(device, "type", str(device)) == "cuda"
        self._spent: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._spent = dict.fromkeys(PHASES, 0.0)
            self._last = self._now()

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in `phase`."""
        if self.enabled:
            now = self._now()
            self._spent[phase] += now - self._last
            self._last = now

    def seconds(self) -> dict[str, float]:
        return {f"time_{phase}": spent for phase, spent in self._spent.items()} if self.enabled else {}

    def _now(self) -> float:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


class MetricsLog:
    """Writes metrics.jsonl and drives the progress bar. On resume from step N it keeps the lines of steps
    up to N and drops the rest (steps the interrupted run logged after its last checkpoint, which the
    resumed run does again, and a line a kill cut short)."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, console: Console,
                 trackers: list[Any] | None = None) -> None:
        self.path = files.owned(run_dir, "metrics.jsonl")  # recorded as the run's before it is written
        _keep_until(self.path, start_step)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                                  TimeRemainingColumn(), console=console, transient=False)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
        self._progress.start()
        self._trackers = list(trackers or [])

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._trackers:
            from sftlab.train.trackers import scalars

            for tracker in self._trackers:
                tracker.log(record["step"], scalars(record))
        if "loss" in record:
            tokens_per_s = record["tokens"] / max(record["seconds"], 1e-9)
            status = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {tokens_per_s:,.0f} tok/s"
            if "accuracy" in record:  # stage dpo
                status += f"  accuracy {record['accuracy']:.2f}"
            self._progress.update(self._task, completed=record["step"], status=status)
        elif "eval_loss" in record:
            # sft: perplexity; dpo: preference accuracy and reward margin of the held-out pairs
            extra = (f"perplexity {record['eval_perplexity']:.2f}" if "eval_perplexity" in record else
                     f"accuracy {record.get('eval_accuracy', 0):.3f}, margin {record.get('eval_margin', 0):.3f}")
            if "probe_kl" in record:  # the forgetting probe (train/forgetting.py)
                extra += f", probe_nll {record['probe_nll']:.3f}, probe_kl {record['probe_kl']:.3f}"
            self._progress.console.print(f"step {record['step']}: eval loss {record['eval_loss']:.4f}, {extra}")
        elif "probe_kl" in record:  # the probe at the end of a run without eval data
            self._progress.console.print(f"step {record['step']}: probe_nll {record['probe_nll']:.3f}, "
                                         f"probe_kl {record['probe_kl']:.3f}")

    def close(self) -> None:
        self._progress.stop()
        self._file.close()
        for tracker in self._trackers:
            tracker.close()


def _keep_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """loss.png: training loss per step and, where present, eval loss. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
