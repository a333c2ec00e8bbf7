"""Three checks of why held-out questions are missed (SWEEP.md, eleventh and thirteenth rounds).

    python examples/support_agent/diagnose.py pairs RUN [--step N]   # unseen pairings against trained ones
    python examples/support_agent/diagnose.py topics MODEL           # the base model's own choice of topic names
    python examples/support_agent/diagnose.py topics RUN --heldout FILE       # a run's, for each held-out question
    python examples/support_agent/diagnose.py soup RUN RUN ... --heldout FILE   # the mean of several runs' weights

`pairs`: every ordered pair of facts asked in one message, each fact in a held-out wording, `--per-pair` messages a
pair, answered greedily by the run (its final adapter, or checkpoint step-N), as the demo answers. It prints how
often the first, the second and both facts are stated, for the pairs never asked together in training
(facts.HELDOUT_PAIRS) and for the others. If the model had learned which topic may follow which, the unseen
pairings would score lower.

`topics`: before any training, the model's log-probability of each fact's topic name (facts.Fact.topic) right
after `About` in its reply to each TRAINING question (the held-out wordings take no part). It prints how often
the right name ranks first, by the sum and by the mean over the name's tokens; `--names FILE` compares other
sets of names (one set a line: `label|name 1|…|name 9`, in FACTS order). About 4 minutes a set (one thread).
`--heldout FILE` ranks the names for the single questions of a held-out file instead, and prints each question's
rank of the right name and its log-probability margin to the chosen one; MODEL may then be a run (its final adapter).

`soup`: a uniform model soup (Wortsman et al. 2022) of adapter runs of one base model, e.g. one recipe trained at
several seeds: each run's last checkpoint (or step-N) folded into the base weights, the mean of those weights, and
each run's and the soup's accuracy on the held-out file (a make_data.py heldout.jsonl), with the soup's misses. If the
misses of single runs were their seeds' noise, the mean would answer more; the wordings every run misses stay missed.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from check_answers import score  # noqa: E402
from facts import BY_NAME, FACTS, HELDOUT_PAIRS, JOINERS, SLOTS  # noqa: E402
from make_data import Sample, read_jsonl  # noqa: E402


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
    if args.heldout:  # the single questions of a held-out file, each reported with its ranking
        index = {fact.name: i for i, fact in enumerate(FACTS)}
        asked = [(index[row["facts"][0]], row["messages"][:-1]) for row in read_jsonl(args.heldout)
                 if row["kind"] == "single"]
    else:
        asked = [(i, Sample("single", ((template.format(**{slot: values[0] for slot, values in SLOTS.items()}),
                                        (fact.name,)),)).messages[:-1])
                 for i, fact in enumerate(FACTS) for template in fact.train]
    # (the right name's index, the conversation without its reply, then the reply's first word)
    prompts = [(i, prompt_ids(tokenizer, answerer.template, messages) + about) for i, messages in asked]
    with torch.no_grad():
        for label, names in sets.items():
            candidates = [tokenizer.encode(f" {name}:", add_special_tokens=False) for name in names]
            by_sum = by_mean = 0
            for (right, prompt), (_, messages) in zip(prompts, asked):
                rows = [prompt + c for c in candidates]
                width = max(map(len, rows))
                ids = torch.tensor([row + [answerer.pad] * (width - len(row)) for row in rows])
                keep = width - len(prompt) + 1  # the output head only where a name's tokens are predicted
                logp = model(input_ids=ids, logits_to_keep=keep).logits.float().log_softmax(-1)
                sums = [sum(logp[k, j, token].item() for j, token in enumerate(c)) for k, c in enumerate(candidates)]
                by_sum += max(range(len(sums)), key=sums.__getitem__) == right
                means = [total / len(c) for total, c in zip(sums, candidates)]
                by_mean += max(range(len(means)), key=means.__getitem__) == right
                if args.heldout and label == "facts.py":
                    order = sorted(range(len(sums)), key=sums.__getitem__, reverse=True)
                    print(f"rank {order.index(right) + 1}  margin {sums[right] - sums[order[0]]:6.2f}  "
                          f"{FACTS[right].name:15s} chosen {FACTS[order[0]].name:15s} "
                          f"{messages[-1]['content'][:70]}")
            print(f"{label:12s} right name first: {by_sum}/{len(prompts)} by sum, {by_mean}/{len(prompts)} by mean")


def soup(args: argparse.Namespace) -> None:
    from demo import one_line

    heldout = read_jsonl(args.heldout)
    mean, each = soup_of(args.runs, heldout, args.step)
    for run, answers in zip(args.runs, each):
        print(f"{run}: {_right(heldout, answers)}")
    answers = mean.answers(heldout)
    print(f"soup of {len(args.runs)}: {_right(heldout, answers)}")
    for row, answer in zip(heldout, answers):
        if not score(answer, row["expect"]):
            print(f"  missed: {one_line(row['messages'][-2]['content'], 90)} -> {one_line(answer, 100)}")


def soup_of(runs: list[str], rows: list[dict], step: int | None) -> tuple[object, list[list[str]]]:
    """An Answerer whose model is the mean of the runs' folded weights (each run's last checkpoint, or step-N), and
    each run's own answers to `rows` (folded, one at a time: two models in memory besides the sum). The runs must
    share the base model and the method."""
    import yaml
    from demo import Answerer
    from sweep import load_checkpoint

    configs = [yaml.safe_load((Path(run) / "config.yaml").read_text(encoding="utf-8")) for run in runs]
    for run, config in zip(runs[1:], configs[1:]):
        for key in ("model", "method"):
            if config.get(key) != configs[0].get(key):
                raise SystemExit(f"{run}: its {key} is {config.get(key)!r}, not {configs[0].get(key)!r} as in "
                                 f"{runs[0]}: a soup averages runs of one base model and method")
    answerer = Answerer(runs[0])
    if answerer.method is None:
        raise SystemExit(f"{runs[0]}: not an adapter run; a soup here averages adapter runs folded into their base")
    total, each, single = None, [], copy.copy(answerer)
    for run in runs:
        load_checkpoint(answerer, _checkpoint(Path(run), step))
        single.model, single.method = answerer.method.merge(copy.deepcopy(answerer.model)), None
        weights = single.model.state_dict()
        total = {k: v.detach().clone() for k, v in weights.items()} if total is None else {
            k: total[k] + weights[k] for k in total}
        each.append(single.answers(rows))
    single.model.load_state_dict({k: v / len(runs) for k, v in total.items()})
    return single, each


def _checkpoint(run: Path, step: int | None) -> Path:
    from sftlab.train.checkpoint import checkpoint_dir, latest_checkpoint

    found = checkpoint_dir(run) / f"step-{step}" if step is not None else latest_checkpoint(run)
    if found is None:
        raise SystemExit(f"{run}: no checkpoints/step-N (train with train.save_every_steps)")
    return found


def _right(rows: list[dict], answers: list[str]) -> str:
    right = sum(score(answer, row["expect"]) for row, answer in zip(rows, answers))
    return f"{right}/{len(rows)} ({right / len(rows):.0%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("pairs", help="unseen pairings against trained ones")
    p.add_argument("run", help="a run dir of the demo or of sweep.py")
    p.add_argument("--step", type=int, help="score checkpoint step-N instead of the final adapter")
    p.add_argument("--per-pair", type=int, default=2, help="messages per ordered pair (default 2)")
    t = sub.add_parser("topics", help="the base model's ranking of the topic names")
    t.add_argument("model", help="the base model: dir, hub id or .gguf (or a run dir, with its adapter)")
    t.add_argument("--heldout", help="rank the names for the single questions of this held-out file instead, each "
                                     "question reported (a make_data.py heldout.jsonl)")
    t.add_argument("--names", help="a file of other name sets, one a line: label|name 1|...|name 9")
    s = sub.add_parser("soup", help="the mean of several adapter runs' weights, scored on held-out questions")
    s.add_argument("runs", nargs="+", help="run dirs of the demo or of sweep.py (one base model and method)")
    s.add_argument("--heldout", required=True, help="the questions: a make_data.py heldout.jsonl")
    s.add_argument("--step", type=int, help="every run's checkpoint step-N instead of its last")
    args = parser.parse_args(argv)
    {"pairs": pairs, "topics": topics, "soup": soup}[args.check](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
