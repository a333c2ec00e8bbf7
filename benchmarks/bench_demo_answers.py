"""The demo's held-out answers: HF generate() (the demo's old path) against sftlab's batched decoder (its new one).

    python benchmarks/bench_demo_answers.py [--data DIR] [--run RUN_DIR] [--threads 1] [--repeat 1]

The model is the demo's (SmolLM2-135M-Instruct, the fixture GGUF converted once), the questions its held-out
split (make_data.py --train 600 --heldout 54, written to --data when missing). Both paths answer the same
questions greedily in one process, each batch capped at its longest reference + ANSWER_MARGIN:

- old: HF `model.generate` in batches of 16 sorted by answer cap, every prompt run whole, left-padded to its
  batch's longest;
- new: demo.Answerer (sftlab.models.decoding.decode_rows): the prefix every prompt shares run once, the
  prompts' own tokens shortest first in groups of 16, then all 54 decoded as one batch, each row leaving it at
  its stop token or its cap (the same caps as the old batches gave).

Timed in CPU seconds of this process (all its threads; steadier than wall seconds on a shared machine), with
the wall seconds beside. Prints one JSON line per pass: the seconds of each path, and how many of the answers
are token-identical (float rounding can flip a rare argmax between two orders of the same sums; many differences
would be a bug). With --run (a run dir of the demo's config): the base pass under the run's adapters disabled,
then the fine-tuned pass with them folded, as the demo does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "support_agent"
sys.path.insert(0, str(DEMO))

import demo  # noqa: E402


def old_answers(answerer: demo.Answerer, rows: list[dict], *, base: bool, batch: int = demo.BATCH) -> list[list[int]]:
    """The demo's answers as they were made before the shared decoder: HF generate, batches of like caps."""
    import torch

    from sftlab.generate import prompt_ids

    prompts = [prompt_ids(answerer.tokenizer, answerer.template, row["messages"][:-1]) for row in rows]
    limits = [len(answerer.tokenizer.encode(row["messages"][-1]["content"], add_special_tokens=False))
              + demo.ANSWER_MARGIN for row in rows]
    order = sorted(range(len(rows)), key=lambda i: (limits[i], len(prompts[i])))
    answers: list[list[int]] = [[] for _ in rows]
    with answerer.method.adapters_disabled(answerer.model) if base else nullcontext(), torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[answerer.pad] * (width - len(prompts[i])) + prompts[i] for i in chunk])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
            out = answerer.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=max(limits[i] for i in chunk),
                                          eos_token_id=answerer.stops, pad_token_id=answerer.pad)
            for i, row in zip(chunk, out[:, width:].tolist()):
                answers[i] = row[:next((k for k, t in enumerate(row) if t in answerer.stops), len(row))]
    return answers


def timed(call: Callable[[], list[list[int]]], repeat: int) -> tuple[list[list[int]], float, float]:
    """The call's result and its least CPU and wall seconds over `repeat` calls."""
    cpu, wall, result = [], [], []
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        result = call()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return result, min(cpu), min(wall)


def compare(name: str, answerer: demo.Answerer, rows: list[dict], *, base: bool, repeat: int) -> dict:
    old, old_cpu, old_wall = timed(lambda: old_answers(answerer, rows, base=base), repeat)
    new, new_cpu, new_wall = timed(lambda: answerer.token_answers(rows, base=base), repeat)
    same = sum(a == b for a, b in zip(old, new))
    differ = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    first = [next((k for k, (x, y) in enumerate(zip(old[i], new[i])) if x != y), min(len(old[i]), len(new[i])))
             for i in differ]
    return {"pass": name, "questions": len(rows), "old_cpu_s": round(old_cpu, 2), "new_cpu_s": round(new_cpu, 2),
            "cpu_ratio": round(new_cpu / old_cpu, 3), "old_wall_s": round(old_wall, 2),
            "new_wall_s": round(new_wall, 2), "identical": same, "differ_at_token": first,
            "answer_tokens_old": sum(map(len, old)), "answer_tokens_new": sum(map(len, new))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/bench-demo-answers-data", help="held-out data dir (made if missing)")
    parser.add_argument("--run", help="a run dir of the demo's config: also the base (adapters off) and folded passes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the ratio free of a busy core)")
    parser.add_argument("--repeat", type=int, default=1, help="calls per path (the least CPU seconds counts)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "heldout.jsonl").is_file():
        subprocess.run([sys.executable, str(DEMO / "make_data.py"), "--out", str(data), "--train", "600",
                        "--heldout", "54"], check=True)
    rows = [json.loads(line) for line in (data / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    answerer = demo.Answerer(args.run or demo.prepare_model(str(demo.GGUF)))
    answerer.token_answers(rows[:2], base=bool(args.run))  # warm-up: first-call costs out of both timings
    old_answers(answerer, rows[:2], base=bool(args.run))
    print(json.dumps(compare("base", answerer, rows, base=bool(args.run), repeat=args.repeat)), flush=True)
    if args.run:
        answerer.fold()
        print(json.dumps(compare("fine-tuned (folded)", answerer, rows, base=False, repeat=args.repeat)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
