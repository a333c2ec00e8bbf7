"""`make demo`: a real pretrained chat model becomes Brightwell Home's support agent, on a CPU, in minutes.

    python examples/support_agent/demo.py                 # SmolLM2-135M-Instruct (GGUF from PyPI), full demo
    python examples/support_agent/demo.py --model DIR --steps 3 --heldout 4   # any HF dir, reduced (the test)

Steps, each with the command a user would type where there is one:
1. the model: the .gguf file `make fixtures` fetched, converted once into a cached HF dir;
2. the data: examples/support_agent/make_data.py (train + held-out questions never seen in training);
3. `sftlab check` on the training data;
4. `sftlab train examples/support_agent/config.yaml` (LoRA, packed rows, progress bar);
5. held-out questions answered greedily by the base model and by the fine-tuned one, side by side, and the
   share of answers that state the right facts (check_answers.py), before and after;
6. `sftlab merge` to a plain HF dir, with its fidelity check;
7. `sftlab chat` driven by a script with one held-out question; the answers go into the run's report.html.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from check_answers import accuracy, score  # noqa: E402

GGUF = REPO / ".cache" / "fixtures" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SFTLAB = [sys.executable, "-m", "sftlab"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out, data = Path(args.out), Path(args.out + "-data")
    model = args.model or str(GGUF)

    banner("1. the model")
    if model.endswith(".gguf"):
        from sftlab.models.gguf import model_dir_for

        model = model_dir_for(model)
    print(f"model: {model}")

    banner("2. the data")
    run([sys.executable, str(HERE / "make_data.py"), "--out", str(data), "--train", str(args.train),
         "--heldout", str(args.heldout)])
    heldout = [json.loads(line) for line in (data / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]

    banner("3. sftlab check")
    run([*SFTLAB, "check", str(data / "train.jsonl"), "--model", model])

    banner("4. sftlab train")
    overrides = [f"model={model}", f"output_dir={out}", f"data.train={data / 'train.jsonl'}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    run([*SFTLAB, "train", str(HERE / "config.yaml"), *overrides, "--overwrite"])

    banner("5. held-out questions: base model vs fine-tuned")
    base_answers = answer_all(model, heldout)
    tuned_answers = answer_all(str(out), heldout)
    expects = [row["expect"] for row in heldout]
    before, after = accuracy(base_answers, expects), accuracy(tuned_answers, expects)
    for row, base, tuned in list(zip(heldout, base_answers, tuned_answers))[:args.show]:
        print(f"\nQ: {row['messages'][-2]['content']}")
        print(f"  base       [{mark(base, row['expect'])}] {one_line(base)}")
        print(f"  fine-tuned [{mark(tuned, row['expect'])}] {one_line(tuned)}")
    print(f"\nheld-out accuracy ({len(heldout)} questions never seen in training; an answer counts when it states "
          f"every fact asked): base {before:.0%} -> fine-tuned {after:.0%}")
    write_samples(out, heldout, base_answers, tuned_answers)

    banner("6. sftlab merge")
    run([*SFTLAB, "merge", str(out), "--output", str(out / "merged")])

    banner("7. sftlab chat, driven by a script")
    question = heldout[0]["messages"][-2]["content"]
    chat = subprocess.run([*SFTLAB, "chat", str(out)], input=f"{question}\n/exit\n", capture_output=True, text=True,
                          timeout=300)
    print(f"> {question}\n{chat.stdout.strip()}")
    print(f"  (states the right fact: {'yes' if score(chat.stdout, heldout[0]['expect']) else 'no'})")

    banner("8. sftlab export: one GGUF file for llama.cpp / Ollama / LM Studio")
    run([*SFTLAB, "export", str(out), "--format", "gguf", "--quant", "q8_0", "--output", str(out / "model.gguf"),
         "--overwrite"])

    print(f"\ndone in {(time.perf_counter() - started) / 60:.1f} min. The run: {out}/ (report.html, adapter/, merged/, "
          "model.gguf)")
    print(f"talk to it:  .venv/bin/sftlab chat {out}")
    print(f"elsewhere:   llama-cli -m {out / 'model.gguf'} -cnv   |   ollama create support-agent -f "
          f"{out / 'model.Modelfile'} && ollama run support-agent")
    result = {"heldout": len(heldout), "accuracy_before": before, "accuracy_after": after,
              "minutes": (time.perf_counter() - started) / 60}
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def answer_all(source: str, rows: list[dict], *, batch: int = 32) -> list[str]:
    """Greedy answers of the model (or run dir) `source` to each row's conversation without its last turn.

    Batched (left-padded, through transformers' generate): decoding on a CPU is bound by reading the
    weights, so 32 questions at a time cost about what one does. Prompts go through the same chat template
    sftlab trains with, and stop at its end-of-turn token."""
    import torch

    from sftlab.generate import prompt_ids, stop_token_ids
    from sftlab.runs import load_for_inference

    model, tokenizer, template, method = load_for_inference(source)
    if method is not None and method.name in ("prompt", "ptuning", "prefix"):
        raise SystemExit("the demo's batched evaluation is for LoRA runs")
    stops = stop_token_ids(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers = []
    for start in range(0, len(rows), batch):
        prompts = [prompt_ids(tokenizer, template, row["messages"][:-1]) for row in rows[start:start + batch]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                 eos_token_id=stops, pad_token_id=pad)
        for row in out[:, width:].tolist():
            row = row[:next((i for i, t in enumerate(row) if t in stops), len(row))]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def write_samples(out: Path, rows: list[dict], before: list[str], after: list[str]) -> None:
    """Before/after answers into the run's report.html, and (with their verdicts) into samples.jsonl."""
    from sftlab.train.report import write_report

    samples = [{"prompt": row["messages"][-2]["content"], "reference": row["messages"][-1]["content"],
                "before": b, "after": a} for row, b, a in zip(rows, before, after)]
    with (out / "samples.jsonl").open("w", encoding="utf-8") as file:
        for sample, row in zip(samples, rows):
            verdicts = {"before_ok": score(sample["before"], row["expect"]), "after_ok": score(sample["after"], row["expect"])}
            file.write(json.dumps({**sample, **verdicts}, ensure_ascii=False) + "\n")
    write_report(out, samples=samples)


def run(cmd: list[str]) -> None:
    shown = " ".join(["sftlab", *cmd[3:]] if cmd[:3] == SFTLAB else [Path(cmd[1]).name, *cmd[2:]])
    print(f"$ {shown}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def banner(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def mark(answer: str, expect: list[str]) -> str:
    return "right" if score(answer, expect) else "wrong"


def one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model dir, hub id or .gguf (default: SmolLM2-135M-Instruct from the fixtures)")
    parser.add_argument("--out", default="runs/support-agent", help="the run dir (data goes to OUT-data)")
    parser.add_argument("--steps", type=int, help="override the config's train.max_steps (a reduced run)")
    parser.add_argument("--train", type=int, default=600, help="training conversations")
    parser.add_argument("--heldout", type=int, default=54, help="held-out questions")
    parser.add_argument("--show", type=int, default=6, help="held-out answers printed side by side")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
