"""Two checks of why held-out questions are missed (SWEEP.md, eleventh round).

    python examples/support_agent/diagnose.py pairs RUN [--step N]   # unseen pairings against trained ones
    python examples/support_agent/diagnose.py topics MODEL           # the base model's own choice of topic names

`pairs`: every ordered pair of facts asked in one message, each fact in a held-out wording, `--per-pair` messages a
pair, answered greedily by the run (its final adapter, or checkpoint step-N), as the demo answers. It prints how
often the first, the second and both facts are stated, for the pairs never asked together in training
(facts.HELDOUT_PAIRS) and for the others. If the model had learned which topic may follow which, the unseen
pairings would score lower.

`topics`: before any training, the model's log-probability of each fact's topic name (facts.Fact.topic) right
after `About` in its reply to each TRAINING question (the held-out wordings take no part). It prints how often
the right name ranks first, by the sum and by the mean over the name's tokens; `--names FILE` compares other
sets of names (one set a line: `label|name 1|…|name 9`, in FACTS order). About 4 minutes a set (one thread).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from check_answers import score  # noqa: E402
from facts import BY_NAME, FACTS, HELDOUT_PAIRS, JOINERS, SLOTS  # noqa: E402
from make_data import Sample  # noqa: E402


def pair_rows(per_pair: int = 2, seed: int = 0) -> list[dict]:
    """`per_pair` messages for every ordered pair of facts, each fact asked in one of its held-out wordings; each
    row carries its facts (`x`, `y`) and whether the pair is one the training data never asks together."""
    rng = random.Random(seed)

    def ask(fact):
        return rng.choice(fact.heldout).format(**{slot: rng.choice(values) for slot, values in SLOTS.items()})

    rows = []
    for x in FACTS:
        for y in FACTS:
            for _ in range(per_pair if x is not y else 0):
                message = rng.choice(JOINERS).format(a=ask(x), b=ask(y))
                rows.append({"messages": Sample("combo", ((message, (x.name, y.name)),)).messages,
                             "x": x.name, "y": y.name, "unseen": frozenset((x.name, y.name)) in HELDOUT_PAIRS})
    return rows


def pair_table(rows: list[dict], answers: list[str]) -> dict[bool, dict[str, float]]:
    """Share of answers stating the first fact, the second and both, for unseen (True) and trained (False) pairs."""
    found: dict[bool, dict[str, float]] = {}
    for unseen in (True, False):
        picked = [(row, answer) for row, answer in zip(rows, answers) if row["unseen"] is unseen]
        first = [score(answer, BY_NAME[row["x"]].expect) for row, answer in picked]
        second = [score(answer, BY_NAME[row["y"]].expect) for row, answer in picked]
        n = len(picked)
        found[unseen] = {"n": n, "first": sum(first) / n, "second": sum(second) / n,
                         "both": sum(a and b for a, b in zip(first, second)) / n}
    return found


def pairs(args: argparse.Namespace) -> None:
    from demo import Answerer
    from sweep import load_checkpoint

    answerer = Answerer(args.run)
    if args.step is not None:
        load_checkpoint(answerer, Path(args.run) / "checkpoints" / f"step-{args.step}")
    rows = pair_rows(args.per_pair)
    for unseen, shares in pair_table(rows, answerer.answers(rows)).items():
        print(f"{'pairs never trained together' if unseen else 'pairs trained together':29s} n={shares['n']:3d}  "
              f"first {shares['first']:.0%}  second {shares['second']:.0%}  both {shares['both']:.0%}")


def topics(args: argparse.Namespace) -> None:
    import torch
    from demo import Answerer

    from sftlab.generate import prompt_ids

    sets = {"facts.py": [fact.topic for fact in FACTS]}
    if args.names:
        for line in Path(args.names).read_text(encoding="utf-8").splitlines():
            label, *names = line.split("|")
            if len(names) != len(FACTS):
                raise SystemExit(f"{args.names}: the set {label!r} has {len(names)} names; expected {len(FACTS)}")
            sets[label] = names
    answerer = Answerer(args.model)
    tokenizer, model = answerer.tokenizer, answerer.model
    about = tokenizer.encode("About", add_special_tokens=False)
    prompts = []  # (the right name's index, the conversation without its reply, then the reply's first word)
    for i, fact in enumerate(FACTS):
        for template in fact.train:
            question = template.format(**{slot: values[0] for slot, values in SLOTS.items()})
            messages = Sample("single", ((question, (fact.name,)),)).messages[:-1]
            prompts.append((i, prompt_ids(tokenizer, answerer.template, messages) + about))
    with torch.no_grad():
        for label, names in sets.items():
            candidates = [tokenizer.encode(f" {name}:", add_special_tokens=False) for name in names]
            by_sum = by_mean = 0
            for right, prompt in prompts:
                rows = [prompt + c for c in candidates]
                width = max(map(len, rows))
                ids = torch.tensor([row + [answerer.pad] * (width - len(row)) for row in rows])
                keep = width - len(prompt) + 1  # the output head only where a name's tokens are predicted
                logp = model(input_ids=ids, logits_to_keep=keep).logits.float().log_softmax(-1)
                sums = [sum(logp[k, j, token].item() for j, token in enumerate(c)) for k, c in enumerate(candidates)]
                by_sum += max(range(len(sums)), key=sums.__getitem__) == right
                means = [total / len(c) for total, c in zip(sums, candidates)]
                by_mean += max(range(len(means)), key=means.__getitem__) == right
            print(f"{label:12s} right name first: {by_sum}/{len(prompts)} by sum, {by_mean}/{len(prompts)} by mean")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("pairs", help="unseen pairings against trained ones")
    p.add_argument("run", help="a run dir of the demo or of sweep.py")
    p.add_argument("--step", type=int, help="score checkpoint step-N instead of the final adapter")
    p.add_argument("--per-pair", type=int, default=2, help="messages per ordered pair (default 2)")
    t = sub.add_parser("topics", help="the base model's ranking of the topic names")
    t.add_argument("model", help="the base model: dir, hub id or .gguf")
    t.add_argument("--names", help="a file of other name sets, one a line: label|name 1|...|name 9")
    args = parser.parse_args(argv)
    (pairs if args.check == "pairs" else topics)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
