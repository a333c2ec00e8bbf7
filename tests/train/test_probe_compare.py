"""The small version of benchmarks/bench_probe.py's comparison, shaped like the demo's run: held-out eval data
and an eval point every few steps, full fine-tuning at a high learning rate against gentle LoRA. Full drifts
above LoRA at every eval point, its run says so on the progress line and at the end, and LoRA's run does not
(its recommended checkpoint is its last eval point). tests/train/test_probe.py's comparison has no eval data,
so there the flag fires on the threshold alone; here it needs the eval loss to stop improving too."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from conftest import tiny_model_dir
from sftlab.config import load_config
from sftlab.runs import prepare, train

STEPS, EVERY = 12, 2
PROBE = [("Which planet is the largest?", False), ("Write a line about rain.", True), ("What is 7 times 6?", False),
         ("Describe a quiet morning.", True), ("Tell me a short story about a fox.", True),
         ("Translate 'good night' into French.", False)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Training rows, held-out rows of another pattern (their loss stops improving once full fine-tuning
    memorises the training rows), and the probe prompts."""
    root = tmp_path_factory.mktemp("data")
    train_file, eval_file, probe = root / "train.jsonl", root / "eval.jsonl", root / "probe.jsonl"

    def rows(question: str, answer: str, numbers: range) -> str:
        return "".join(json.dumps({"messages": [{"role": "user", "content": question.format(i=i)},
                                                {"role": "assistant", "content": answer.format(i=i, j=2 * i)}]})
                       + "\n" for i in numbers)

    train_file.write_text(rows("Double {i}, please.", "Sure: {j}.", range(24)), encoding="utf-8")
    eval_file.write_text(rows("Which number comes after {i}?", "The next one, {j} halved plus one.", range(8)),
                         encoding="utf-8")
    probe.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "open": o}) + "\n"
                             for q, o in PROBE), encoding="utf-8")
    return train_file, eval_file, probe


def run(model_dir: Path, files: tuple[Path, Path, Path], out: Path, *overrides: str) -> tuple[list[dict], dict, str]:
    """One run: its probe points from metrics.jsonl, probe.json, and what it printed."""
    train_file, eval_file, probe = files
    cfg = load_config(overrides=[f"model={model_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
                                 f"output_dir={out}", "data.cache=false", f"eval.probe={probe}",
                                 "eval.probe_max_new_tokens=10", f"train.max_steps={STEPS}",
                                 f"train.eval_every_steps={EVERY}", "train.micro_batch_size=8", *overrides])
    printed = io.StringIO()
    console = Console(file=printed, width=200, color_system=None)
    train(prepare(cfg, console=console), console=console)
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "probe_kl" in line]
    return points, json.loads((out / "probe.json").read_text()), printed.getvalue()


def test_full_at_a_high_lr_drifts_above_gentle_lora_and_the_run_says_so(model_dir, files, tmp_path) -> None:
    full, full_summary, full_printed = run(model_dir, files, tmp_path / "full", "method=full", "train.lr=1e-2")
    lora, lora_summary, lora_printed = run(model_dir, files, tmp_path / "lora", "method=lora", "train.lr=1e-4",
                                           "lora.rank=4")
    assert [p["step"] for p in full] == [p["step"] for p in lora] == list(range(EVERY, STEPS + 1, EVERY))
    assert all(f["probe_kl"] > 5 * g["probe_kl"] and f["probe_nll"] > g["probe_nll"] for f, g in zip(full, lora))
    assert full[-1]["probe_kl"] > 0.5 and full[-1]["probe_nll"] > full_summary["base"]["probe_nll"] + 1.0
    assert full[-1]["probe_distinct2"] < full_summary["base"]["probe_distinct2"]
    assert abs(lora[-1]["probe_nll"] - lora_summary["base"]["probe_nll"]) < 0.1
    # the run says so: on the progress line at the flagged eval point, and at the end
    assert full_summary["flagged"] and full_summary["flagged"].startswith("forgetting: probe_kl")
    assert "while the eval loss stopped improving" in full_summary["flagged"]
    flagged_at = [p["step"] for p in full if f"step {p['step']}: forgetting:" in full_printed]
    assert flagged_at and full_printed.rstrip().count("forgetting: probe_kl") >= 2
    recommended = full_summary["recommended_step"]
    assert recommended is None or recommended < flagged_at[0]
    assert lora_summary["flagged"] is None and "forgetting" not in lora_printed
    best = min(lora, key=lambda p: p["eval_loss"])["step"]
    assert lora_summary["recommended_step"] == best and f"recommended checkpoint step-{best}" in lora_printed
