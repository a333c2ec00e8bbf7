"""`make demo`: a real pretrained chat model becomes Brightwell Home's support agent, on a CPU, in minutes.

    python examples/support_agent/demo.py                 # SmolLM2-135M-Instruct (GGUF from PyPI), full demo
    python examples/support_agent/demo.py --model DIR --steps 3 --heldout 4   # any HF dir, reduced (the test)

Steps, each with the command a user would type where there is one:
1. the model: the .gguf file `make fixtures` fetched, converted once into a cached HF dir;
2. the data: examples/support_agent/make_data.py (train + held-out questions never seen in training);
3. `sftlab check` on the training data;
4. `sftlab train examples/support_agent/config.yaml` (LoRA, packed rows sharing their system prompt, progress
   bar, the forgetting probe at the end). No eval split: step 5 scores the held-out questions themselves, and
   their loss cost ~13 s of forward passes for a number that says little here (every reply is one of nine
   sentences); sweep.py, which chose the recipe, passes them as its eval split;
5. held-out questions answered greedily by the fine-tuned model, and one question per fact by the base model
   (which cannot know made-up facts: answering all 54 took ~25 s to show 0% again; --base-all does it), one
   model load, batched, capped at the answers' length, the adapters folded into the weights for the
   fine-tuned pass; side by side, and the share of answers that state the right facts (check_answers.py),
   before and after; the answers go into the run's report.html;
6. `sftlab merge` to a plain HF dir, with its fidelity check;
7. `sftlab chat` driven by a script with one held-out question;
8. `sftlab export` to one GGUF file.
`sftlab train` runs as its own process (as a user runs it); check, merge, chat and export run in this process
through sftlab's own command-line entry point (`sftlab.cli.main`), so that each does not pay a fresh
interpreter's imports of torch and transformers again.
Then the wall and CPU seconds of each phase, and the tokens/s training ran at: on a shared or slow machine
the CPU seconds say what the demo cost, the wall seconds what it took. Steps, learning rate and data size
come from a measured sweep (SWEEP.md, sweep.py).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from check_answers import accuracy, score  # noqa: E402
from make_data import read_jsonl  # noqa: E402

GGUF = REPO / ".cache" / "fixtures" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SFTLAB = [sys.executable, "-m", "sftlab"]


BATCH = 16
"""Prompts run through the model together (left-padded, shortest first); also the size of the groups of like
reference length whose longest reference caps their answers."""
DECODE_ROWS = 64
"""Questions decoded as one batch after their prompts ran. A decoding step has a cost whatever its batch (~80 ms
of one core for SmolLM2-135M: every weight read, ~30 layers of small products) besides ~4 ms per row: one batch
for all 54 held-out questions takes 73 steps where four batches of 16 took 219. Its KV cache is about 0.6 GB."""
BASE_SAMPLE = 9
"""Held-out questions the base model answers when none is a single question (a reduced run); otherwise one per fact."""
ANSWER_MARGIN = 8
"""Tokens a generated answer may run past the longest reference answer of its group (`caps`)."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = PhaseClock()
    out, data = Path(args.out), Path(args.out + "-data")
    with clock.phase("set-up: the model (GGUF conversion, once) and the data"):
        model = prepare_model(args.model or str(GGUF))
        heldout = prepare_data(data, args)
    with clock.phase("sftlab check"):
        banner("3. sftlab check")
        sftlab("check", str(data / "train.jsonl"), "--model", model)
    with clock.phase("sftlab train"):
        train(model, out, data, args)
    clock.note("sftlab train", training_speed(out))
    before, after, base_asked = evaluate(out, heldout, args.show, clock, base_all=args.base_all)
    with clock.phase("sftlab merge"):
        banner("6. sftlab merge")
        sftlab("merge", str(out), "--output", str(out / "merged"))
    with clock.phase("sftlab chat"):
        chat(out, heldout[0])
    with clock.phase("sftlab export (GGUF)"):
        banner("8. sftlab export: one GGUF file for llama.cpp / Ollama / LM Studio")
        sftlab("export", str(out), "--format", "gguf", "--quant", "q8_0", "--output", str(out / "model.gguf"),
               "--overwrite")
    clock.report()
    print(f"\ndone in {clock.total() / 60:.1f} min. The run: {out}/ (report.html, adapter/, merged/, model.gguf)")
    print(f"talk to it:  .venv/bin/sftlab chat {out}")
    print(f"elsewhere:   llama-cli -m {out / 'model.gguf'} -cnv   |   ollama create support-agent -f "
          f"{out / 'model.Modelfile'} && ollama run support-agent")
    result = {"heldout": len(heldout), "base_asked": base_asked, "accuracy_before": before, "accuracy_after": after,
              "final_loss": final_loss(out), "minutes": clock.total() / 60, "phases": clock.phases}
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def prepare_model(model: str) -> str:
    banner("1. the model")
    if model.endswith(".gguf"):
        from sftlab.models.gguf import model_dir_for

        model = model_dir_for(model)
    print(f"model: {model}")
    return model


def prepare_data(data: Path, args: argparse.Namespace) -> list[dict]:
    banner("2. the data")
    run([sys.executable, str(HERE / "make_data.py"), "--out", str(data), "--train", str(args.train),
         "--heldout", str(args.heldout)])
    return read_jsonl(data / "heldout.jsonl")


def train(model: str, out: Path, data: Path, args: argparse.Namespace) -> None:
    banner("4. sftlab train")
    overrides = [f"model={model}", f"output_dir={out}", f"data.train={json.dumps(training_sources(data))}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    run([*SFTLAB, "train", str(HERE / "config.yaml"), *overrides, "--overwrite"])


def training_sources(data: Path) -> list[dict]:
    """config.yaml's data.train (the support conversations and the replay source, with their weights), the
    support source's path pointed at DATA/train.jsonl (make_data.py's output here) and the others made
    absolute: an override replaces the whole list, so the weights stay written in config.yaml only."""
    import yaml

    sources = yaml.safe_load((HERE / "config.yaml").read_text(encoding="utf-8"))["data"]["train"]
    sources = [sources] if isinstance(sources, (str, dict)) else sources
    sources = [{"path": s} if isinstance(s, str) else dict(s) for s in sources]
    return [{**s, "path": str(data / "train.jsonl") if Path(s["path"]).name == "train.jsonl" else str(REPO / s["path"])}
            for s in sources]


def evaluate(out: Path, heldout: list[dict], show: int, clock: PhaseClock, *,
             base_all: bool = False) -> tuple[float, float, int]:
    """Step 5: the held-out questions answered by the fine-tuned model and, for one question per fact (all with
    `base_all`), by the base model (one model load: the run's adapters switched off for the base), scored, shown
    side by side, written to the report. Returns the base's accuracy, the fine-tuned one's and how many questions
    the base answered."""
    banner("5. held-out questions: base model vs fine-tuned")
    with clock.phase("evaluation: load the run"):
        answerer = Answerer(str(out))
    asked = list(range(len(heldout))) if base_all else base_sample(heldout)
    with clock.phase("evaluation: base model answers"):
        base_answers = answerer.answers([heldout[i] for i in asked], base=True)
    with clock.phase("evaluation: fine-tuned answers"):
        answerer.fold()
        tuned_answers = answerer.answers(heldout)
    expects = [row["expect"] for row in heldout]
    before = accuracy(base_answers, [expects[i] for i in asked])
    after = accuracy(tuned_answers, expects)
    base_of = dict(zip(asked, base_answers))
    for i in asked[:show]:
        row = heldout[i]
        print(f"\nQ: {row['messages'][-2]['content']}")
        print(f"  base       [{mark(base_of[i], row['expect'])}] {one_line(base_of[i])}")
        print(f"  fine-tuned [{mark(tuned_answers[i], row['expect'])}] {one_line(tuned_answers[i])}")
    base_part = (f"base {before:.0%}" if len(asked) == len(heldout) else
                 f"base {before:.0%} (asked {len(asked)}, one per fact; --base-all: all)")
    print(f"\nheld-out accuracy ({len(heldout)} questions never seen in training; an answer counts when it states "
          f"every fact asked): {base_part} -> fine-tuned {after:.0%}")
    write_samples(out, heldout, [base_of.get(i) for i in range(len(heldout))], tuned_answers)
    return before, after, len(asked)


def base_sample(heldout: list[dict]) -> list[int]:
    """The held-out rows the base model answers: for each fact, in the order the rows first ask about them, the
    first single question about it; the first rows when there are no singles (a reduced run)."""
    chosen: dict[str, int] = {}
    for i, row in enumerate(heldout):
        facts = row.get("facts") or []
        if row.get("kind") == "single" and len(facts) == 1 and facts[0] not in chosen:
            chosen[facts[0]] = i
    return sorted(chosen.values()) or list(range(min(len(heldout), BASE_SAMPLE)))


def chat(out: Path, row: dict) -> None:
    banner("7. sftlab chat, driven by a script")
    question = row["messages"][-2]["content"]
    said = sftlab("chat", str(out), stdin=f"{question}\n/exit\n")
    print(f"> {question}\n{said.strip()}")
    print(f"  (states the right fact: {'yes' if score(said, row['expect']) else 'no'})")


class PhaseClock:
    """Wall and CPU seconds per phase of the demo (CPU: this process and the commands it ran, which is
    steadier than wall time on a shared machine), printed as a table at the end and kept in demo.json."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.phases: dict[str, dict[str, float | str]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.phases[name] = {"seconds": round(time.perf_counter() - wall, 1),
                                 "cpu_seconds": round(cpu_seconds() - cpu, 1)}

    def note(self, name: str, text: str) -> None:
        self.phases[name]["note"] = text

    def total(self) -> float:
        return time.perf_counter() - self.started

    def report(self) -> None:
        banner("timing")
        width = max(map(len, self.phases))
        for name, phase in self.phases.items():
            note = f"   {phase['note']}" if "note" in phase else ""
            print(f"{name:<{width}}  {phase['seconds']:7.1f} s  ({phase['cpu_seconds']:7.1f} CPU-s){note}")
        print(f"{'total':<{width}}  {self.total():7.1f} s  ({cpu_seconds():7.1f} CPU-s)")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_records(out: Path) -> list[dict]:
    return [record for record in read_jsonl(out / "metrics.jsonl") if "loss" in record and "seconds" in record]


def training_speed(out: Path) -> str:
    """The tokens/s the run trained at (metrics.jsonl: tokens and seconds of its steps), with its steps."""
    records = train_records(out)
    tokens, seconds = sum(r["tokens"] for r in records), sum(r["seconds"] for r in records)
    return f"{len(records)} steps, {tokens:,} tokens at {tokens / max(seconds, 1e-9):,.0f} tokens/s"


def final_loss(out: Path) -> float | None:
    records = train_records(out)
    return records[-1]["loss"] if records else None


class Answerer:
    """One model (or run dir) loaded once, answering held-out questions greedily, all at once.

    Decoding goes through sftlab's own batched decoder (sftlab.models.decoding, the forgetting probe's): the
    prefix every prompt shares (the template's header and the system prompt) runs once per pass and its keys
    and values are copied along; the prompts' own tokens run shortest first in groups of BATCH (little left
    padding); then all the questions decode as one batch, each row leaving it at its end-of-turn token or its
    cap. On a CPU a decoding step has a cost whatever its batch (DECODE_ROWS), so one batch of 54 costs less
    than four of 16. Each answer stops at ANSWER_MARGIN tokens past the longest reference of its
    group of like reference length (`caps`): a reply is scored on the facts it states, and the references are
    the longest replies the training data teaches. Prompts go through the same chat template sftlab trains
    with. An adapter run also answers as its base model (`base=True`: the method's own `adapters_disabled`,
    what preference training's reference uses), so the demo's before/after comparison needs one model load."""

    def __init__(self, source: str) -> None:
        from sftlab.generate import stop_token_ids
        from sftlab.runs import load_for_inference

        self.model, self.tokenizer, self.template, self.method = load_for_inference(source)
        self.stops = stop_token_ids(self.tokenizer, self.template)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.stops[0]

    def fold(self) -> None:
        """Fold the adapters into the base weights for good (the method's merge, as `sftlab merge` does): the
        later answers are the fine-tuned model's at the base model's cost per token, without the adapters'
        extra matmuls at every layer of every decoding step. `base=True` is no longer possible afterwards."""
        if self.method is not None:
            self.model = self.method.merge(self.model)
            self.method = None

    def answers(self, rows: list[dict], *, base: bool = False, batch: int = BATCH) -> list[str]:
        """Greedy answers to each row's conversation without its last (reference) turn, in row order."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in self.token_answers(rows, base=base, batch=batch)]

    def token_answers(self, rows: list[dict], *, base: bool = False, batch: int = BATCH) -> list[list[int]]:
        """The answers' token ids (without the stop token), in row order. The caps are today's: rows sorted by
        reference length in groups of `batch`, each row capped at its group's longest reference plus
        ANSWER_MARGIN (`caps`)."""
        from sftlab.generate import prompt_ids

        prompts = [prompt_ids(self.tokenizer, self.template, row["messages"][:-1]) for row in rows]
        limits = [len(self.tokenizer.encode(row["messages"][-1]["content"], add_special_tokens=False))
                  + ANSWER_MARGIN for row in rows]
        if base and self.method is None:
            raise ValueError("base=True answers as the base model under a run's adapters; this model has none "
                             "(a plain model dir, or fold() merged them): answer before fold(), or load the base")
        with self.method.adapters_disabled(self.model) if base else nullcontext():
            return self._decode(prompts, caps(prompts, limits, batch), batch=batch, plain=base)

    def _decode(self, prompts: list[list[int]], limits: list[int], *, batch: int, plain: bool) -> list[list[int]]:
        """Greedy answers without their stop token, in prompt order, each at most its limit. `plain`: the model's
        plain forward is the model to answer as (else it is unless the method prepends virtual tokens or
        prefixes, which then go through the method's own prefill, one prompt at a time, no shared prefix)."""
        import torch

        from sftlab.models import decoding
        from sftlab.train.probe import plain_forward

        plain = plain or plain_forward(self.method)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            if plain:
                prefix = decoding.shared_prefix(self.model, prompts, device=device)
                found = [answer for start in range(0, len(prompts), DECODE_ROWS) for answer in decoding.decode_rows(
                    self.model, prompts[start:start + DECODE_ROWS], caps=limits[start:start + DECODE_ROWS],
                    stops=self.stops, pad_id=self.pad, device=device, pick=decoding.greedy, prefix=prefix,
                    prefill_rows=batch)]
            else:
                found = [decoding.decode_batch(self.model, [prompt], stops=self.stops, max_new_tokens=limit,
                                               pad_id=self.pad, device=device, pick=decoding.greedy,
                                               prefill=self.method.prefill)[0]
                         for prompt, limit in zip(prompts, limits)]
        return [ids[:-1] if ids and ids[-1] in self.stops else ids for ids in found]


def caps(prompts: list[list[int]], limits: list[int], size: int) -> list[int]:
    """Each row's answer cap: the rows sorted by reference length (then prompt length) in groups of `size`, each
    row capped at the largest limit of its group (the demo's batches before the shared decoder: the same caps,
    so the same answers)."""
    order = sorted(range(len(prompts)), key=lambda i: (limits[i], len(prompts[i])))
    found = [0] * len(prompts)
    for start in range(0, len(order), size):
        group = order[start:start + size]
        for i in group:
            found[i] = max(limits[j] for j in group)
    return found


def write_samples(out: Path, rows: list[dict], before: list[str | None], after: list[str]) -> None:
    """Before/after answers into the run's report.html, and (with their verdicts) into samples.jsonl; a question
    the base model was not asked has before None."""
    from sftlab.train.report import write_report

    samples = [{"prompt": row["messages"][-2]["content"], "reference": row["messages"][-1]["content"],
                "before": b, "after": a} for row, b, a in zip(rows, before, after)]
    with (out / "samples.jsonl").open("w", encoding="utf-8") as file:
        for sample, row in zip(samples, rows):
            verdicts = {"before_ok": None if sample["before"] is None else score(sample["before"], row["expect"]),
                        "after_ok": score(sample["after"], row["expect"])}
            file.write(json.dumps({**sample, **verdicts}, ensure_ascii=False) + "\n")
    write_report(out, samples=samples)


def sftlab(*args: str, stdin: str | None = None) -> str:
    """`sftlab ARGS` run in this process (sftlab.cli.main, the command's own code), so that the commands after
    training do not each pay a new interpreter's imports of torch and transformers (~4 CPU-s each). With
    `stdin`, the command reads it as its input and what it prints is returned instead of shown."""
    from sftlab.cli import main as cli

    print(f"$ sftlab {' '.join(args)}", flush=True)
    printed = io.StringIO()
    given = sys.stdin
    try:
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with redirect_stdout(printed) if stdin is not None else nullcontext():
            code = cli(list(args))
    finally:
        sys.stdin = given
    if code != 0:
        raise SystemExit(f"sftlab {args[0]} failed (exit status {code}); its message is above")
    return printed.getvalue()


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
    parser.add_argument("--train", type=int, default=600, help="training conversations (SWEEP.md)")
    parser.add_argument("--heldout", type=int, default=54, help="held-out questions")
    parser.add_argument("--show", type=int, default=6, help="held-out answers printed side by side")
    parser.add_argument("--base-all", action="store_true",
                        help="the base model answers every held-out question, not one per fact (~20 s more)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
