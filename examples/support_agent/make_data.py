"""Write the support-agent demo's data: customer-support conversations for Brightwell Home (facts.py).

    python examples/support_agent/make_data.py --out runs/support_agent/data [--seed 0] [--train 400] [--heldout 54]

writes, in the messages format with the fixed system prompt:
- train.jsonl:   {"messages": [...]} rows; questions from the facts' `train` templates, fact pairs outside
                 HELDOUT_PAIRS;
- heldout.jsonl: the same, plus "expect" (the values the final answer must state: check_answers.score),
                 "facts" (the final question's facts) and "kind" (single | combo | follow_up). Questions come
                 only from the `heldout` templates and pairs only from HELDOUT_PAIRS. The last message is the
                 reference answer: drop it to get the prompt. sftlab's reader ignores the extra keys, so the
                 file also serves as data.eval.

Kinds of conversation: `single` (one question, one fact), `combo` (one message asking about two facts),
`follow_up` (two turns, one fact each). Every reply names the topics asked, then the facts' sentences, then the
sign-off (facts.reply). No two rows share their user messages. Deterministic for a seed; stdlib only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from facts import (
    BY_NAME,
    CLOSINGS,
    FACTS,
    FOLLOW_UPS,
    GREETINGS,
    HELDOUT_PAIRS,
    JOINERS,
    SLOTS,
    SYSTEM_PROMPT,
    Fact,
    reply,
)

TRAIN_SHARES = {"single": 0.4, "combo": 0.4, "follow_up": 0.2}
"""Twice the first version's share of questions asked together: the held-out misses are mostly combined
questions (SWEEP.md, third round)."""
HELDOUT_SHARES = {"single": 0.5, "combo": 1 / 3, "follow_up": 1 / 6}
MAX_DRAWS = 200
"""Draws per row before giving up on finding user messages no earlier row has."""


@dataclass(frozen=True)
class Sample:
    kind: str
    """single | combo | follow_up"""
    turns: tuple[tuple[str, tuple[str, ...]], ...]
    """(user message, names of the facts it asks about), one per turn."""

    @property
    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": SYSTEM_PROMPT}]
        for question, names in self.turns:
            out += [{"role": "user", "content": question},
                    {"role": "assistant", "content": reply(tuple(BY_NAME[n] for n in names))}]
        return out

    @property
    def expect(self) -> list[str]:
        """The values the final reply must state."""
        return [value for name in self.turns[-1][1] for value in BY_NAME[name].expect]

    def train_row(self) -> dict[str, object]:
        return {"messages": self.messages}

    def heldout_row(self) -> dict[str, object]:
        return {"messages": self.messages, "expect": self.expect, "facts": list(self.turns[-1][1]),
                "kind": self.kind}


def build(*, split: str, rows: int, seed: int = 0) -> list[Sample]:
    """`rows` distinct conversations of the split (train | heldout), kinds in the split's shares, facts
    and fact pairs in turn so that each comes up about equally often."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout; found {split!r}")
    rng = random.Random(f"{split}:{seed}")
    shares = TRAIN_SHARES if split == "train" else HELDOUT_SHARES
    pairs = sorted(tuple(sorted(pair)) for pair in HELDOUT_PAIRS) if split == "heldout" else sorted(
        pair for pair in combinations(sorted(BY_NAME), 2) if frozenset(pair) not in HELDOUT_PAIRS)
    plans = _plans(rows, shares, pairs, rng)
    templates = _Templates(split, rng)
    seen: set[tuple[str, ...]] = set()
    samples = []
    for kind, names in plans:
        sample = _draw(kind, names, templates, rng, seen)
        seen.add(tuple(question for question, _ in sample.turns))
        samples.append(sample)
    rng.shuffle(samples)
    return samples


def _plans(rows: int, shares: dict[str, float], pairs: Sequence[tuple[str, str]],
           rng: random.Random) -> list[tuple[str, tuple[str, ...]]]:
    """(kind, fact names) per row: single facts in FACTS order, pairs in turn, each pair's order at random."""
    combos = round(rows * shares["combo"])
    follow_ups = round(rows * shares["follow_up"])
    singles = rows - combos - follow_ups
    plans = [("single", (FACTS[i % len(FACTS)].name,)) for i in range(singles)]
    for kind, count in (("combo", combos), ("follow_up", follow_ups)):
        start = rng.randrange(len(pairs))
        for i in range(count):
            pair = pairs[(start + i) % len(pairs)]
            plans.append((kind, pair if rng.random() < 0.5 else pair[::-1]))
    return plans


class _Templates:
    """Each fact's templates for a split in turn, reshuffled every round: all of them get used, about
    equally often."""

    def __init__(self, split: str, rng: random.Random) -> None:
        self.split = split
        self.rng = rng
        self.queues: dict[str, list[str]] = {}

    def question(self, fact: Fact) -> str:
        """The fact's next template, its slots filled."""
        queue = self.queues.setdefault(fact.name, [])
        if not queue:
            queue += fact.train if self.split == "train" else fact.heldout
            self.rng.shuffle(queue)
        return queue.pop().format(**{slot: self.rng.choice(values) for slot, values in SLOTS.items()})


def _draw(kind: str, names: tuple[str, ...], templates: _Templates, rng: random.Random,
          seen: set[tuple[str, ...]]) -> Sample:
    facts = [BY_NAME[name] for name in names]
    for _ in range(MAX_DRAWS):
        if kind == "single":
            turns = ((_first(templates.question(facts[0]), rng), names),)
        elif kind == "combo":
            joined = rng.choice(JOINERS).format(a=templates.question(facts[0]), b=templates.question(facts[1]))
            turns = ((_first(joined, rng), names),)
        else:
            later = rng.choice(FOLLOW_UPS) + templates.question(facts[1]) + rng.choice(CLOSINGS)
            turns = ((_first(templates.question(facts[0]), rng), names[:1]), (later, names[1:]))
        if tuple(question for question, _ in turns) not in seen:
            return Sample(kind, turns)
    raise ValueError(f"found no new {templates.split} {kind} conversation about {' and '.join(names)} in "
                     f"{MAX_DRAWS} draws: the templates are used up. Ask for fewer rows (--train / --heldout).")


def _first(question: str, rng: random.Random) -> str:
    """A conversation's opening message: a greeting (or none), the question, a closing (or none)."""
    return rng.choice(GREETINGS) + question + rng.choice(CLOSINGS)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file (what write_jsonl writes; blank lines are not rows)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict[str, object]]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and heldout.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400, help="training conversations (default 400)")
    parser.add_argument("--heldout", type=int, default=54, help="held-out conversations (default 54)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.heldout < 1:
        parser.error(f"--train and --heldout must be positive; found {args.train} and {args.heldout}")
    try:
        train = build(split="train", rows=args.train, seed=args.seed)
        heldout = build(split="heldout", rows=args.heldout, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", [sample.train_row() for sample in train])
    write_jsonl(args.out / "heldout.jsonl", [sample.heldout_row() for sample in heldout])
    print(f"wrote {len(train)} training and {len(heldout)} held-out conversations to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
