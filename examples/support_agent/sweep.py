"""Held-out accuracy against training steps, from ONE training run: how the demo's steps were chosen.

    python examples/support_agent/sweep.py --out runs/sweep --every 3 train.max_steps=30 [more overrides]

Writes the data (make_data.py, --train/--heldout), trains examples/support_agent/config.yaml (or --config) with a
checkpoint every --every steps (all kept) and the held-out conversations as its eval split (eval loss at the end:
an evaluation per checkpoint would cost about two training steps each on a CPU), then loads the run's model once
and scores every checkpoint (its adapter, or every weight of a full fine-tuning run) on the held-out questions
(check_answers.py). Prints a markdown table: step, tokens seen, training loss (the step's and the mean of the last
--every steps), eval loss, accuracy, overall and by kind (single | combo | follow_up), and the missed questions of
the best and last checkpoints. The table and the misses also go to OUT/sweep.json. SWEEP.md holds the measured tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from check_answers import score  # noqa: E402
from demo import GGUF, SFTLAB, Answerer, one_line, prepare_model, run, training_sources  # noqa: E402
from make_data import read_jsonl  # noqa: E402

KINDS = ("single", "combo", "follow_up")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, data = Path(args.out), Path(args.out + "-data")
    model = prepare_model(args.model or str(GGUF))
    run([sys.executable, str(HERE / "make_data.py"), "--out", str(data), "--train", str(args.train),
         "--heldout", str(args.heldout), "--seed", str(args.seed)])
    heldout = read_jsonl(data / "heldout.jsonl")
    if not args.score_only:
        run([*SFTLAB, "train", str(args.config), f"model={model}", f"output_dir={out}",
             f"data.train={json.dumps(training_sources(data))}", f"data.eval={data / 'heldout.jsonl'}",
             f"train.save_every_steps={args.every}", "train.keep_checkpoints=1000", *args.overrides, "--overwrite"])
    rows, misses = score_checkpoints(out, heldout, base=args.base)
    print(table(rows, metrics(out), args.every))
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "misses": misses}, indent=1) + "\n", encoding="utf-8")
    return 0


def score_checkpoints(out: Path, heldout: list[dict], *, base: bool) -> tuple[list[dict], dict[int, list[str]]]:
    """Accuracy (overall and by kind) of each checkpoint (and with `base`, of the base model as step 0),
    and its misses."""
    answerer = Answerer(str(out))
    checkpoints = sorted((int(p.name.split("-")[-1]), p) for p in (out / "checkpoints").iterdir()
                         if (p / "trainable.safetensors").is_file())
    rows, misses = [], {}
    for step, path in [(0, None)] * base + checkpoints:
        if path is not None:
            load_checkpoint(answerer, path)
        answers = answerer.answers(heldout, base=path is None)
        right = [score(answer, row["expect"]) for answer, row in zip(answers, heldout)]
        row = {"step": step, "accuracy": sum(right) / len(right)}
        for kind in KINDS:
            of_kind = [ok for ok, q in zip(right, heldout) if q["kind"] == kind]
            row[kind] = f"{sum(of_kind)}/{len(of_kind)}"
        rows.append(row)
        misses[step] = [f"[{q['kind']}] {one_line(q['messages'][-2]['content'], 90)} -> {one_line(a, 120)}"
                        for ok, q, a in zip(right, heldout, answers) if not ok]
        print(f"step {step}: {row}", flush=True)
    best = max(rows, key=lambda r: (r["accuracy"], -r["step"]))["step"]
    for step in dict.fromkeys((best, rows[-1]["step"])):
        print(f"\nmissed at step {step}:\n  " + "\n  ".join(misses[step] or ["(none)"]))
    return rows, misses


def metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def load_checkpoint(answerer: Answerer, path: Path) -> None:
    """Put checkpoint `path` (RUN/checkpoints/step-N) into the loaded run's model, as `sftlab eval --checkpoint`
    does: through the run's method, which for full fine-tuning is built from the run's config (so a frozen or tied
    embedding is the one weight the checkpoint lacks, and anything else that does not fit is refused)."""
    from sftlab.eval import load_checkpoint as load_weights

    answerer.method = load_weights(path.parent.parent, path / "trainable.safetensors", answerer.model, answerer.method)


def table(rows: list[dict], records: list[dict], every: int) -> str:
    """The sweep as a markdown table: one row per scored step."""
    train = {r["step"]: r for r in records if "loss" in r and "tokens" in r}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    lines = ["| step | tokens seen | train loss (step) | train loss (mean of last steps) | eval loss | held-out "
             "accuracy | single | combo | follow-up |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        step = row["step"]
        seen = sum(r["tokens"] for s, r in train.items() if s <= step)
        recent = [train[s]["loss"] for s in range(step - every + 1, step + 1) if s in train]
        loss = f"{train[step]['loss']:.3f}" if step in train else "—"
        mean = f"{sum(recent) / len(recent):.3f}" if recent else "—"
        ev = f"{evals[step]:.3f}" if step in evals else "—"
        lines.append(f"| {step} | {seen:,} | {loss} | {mean} | {ev} | {row['accuracy']:.0%} | {row['single']} | "
                     f"{row['combo']} | {row['follow_up']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for the run, e.g. train.max_steps=30")
    parser.add_argument("--model", help="model dir, hub id or .gguf (default: SmolLM2-135M-Instruct from the fixtures)")
    parser.add_argument("--config", default=str(HERE / "config.yaml"),
                        help="the config to train (default: the demo's; e.g. a copy with method: full)")
    parser.add_argument("--out", default="runs/sweep", help="the run dir (data goes to OUT-data)")
    parser.add_argument("--every", type=int, default=3, help="steps between checkpoints (each is scored)")
    parser.add_argument("--train", type=int, default=600, help="training conversations")
    parser.add_argument("--heldout", type=int, default=54, help="held-out questions")
    parser.add_argument("--seed", type=int, default=0, help="make_data.py's seed")
    parser.add_argument("--base", action="store_true", help="score the base model too (step 0)")
    parser.add_argument("--score-only", action="store_true", help="score the checkpoints of an existing run")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
