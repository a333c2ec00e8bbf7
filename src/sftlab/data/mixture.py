"""Several sources as one dataset, and the mixture: which of each source's items an epoch trains.

Each source is encoded (and cached) on its own; `MixedDataset` lays them end to end, so item i of the whole
is item i - starts[k] of source k. Without weights every usable item trains once per epoch, as with one
source. With weights, an epoch has as many items as all the sources' usable items together (N), and source
k's share is weight_k / sum(weights) of N, rounded by largest remainder so the counts add up to N exactly.
A source gives its share sampled without replacement, or, when its share is larger than the source, all of
its items as many times as fit plus a sample of the rest ("repeated" in the table). `max_samples` first
caps a source's pool to a seeded choice of its items, the same in every epoch.

The plan is a pure function of (sources, train.seed, epoch): every rank computes the same one, and a resumed
run the same as the uninterrupted one.

>>> m = Mixture(("a", "b"), (np.arange(0, 4), np.arange(4, 10)), weights=(3.0, 1.0), seed=0)
>>> m.counts()
[8, 2]
>>> sorted(m.epoch_indices(0).tolist())[:8]
[0, 0, 1, 1, 2, 2, 3, 3]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sftlab.data.dataset import DatasetStats
from sftlab.errors import DataError

EVAL_STREAM, CAP_STREAM, EPOCH_STREAM = 1 << 20, 5 << 20, 7 << 20
"""Distinct random streams of train.seed: the eval hold-out, max_samples caps, each epoch's samples."""


class MixedDataset:
    """Encoded datasets (one per source) end to end; offers what the loop reads of an EncodedDataset."""

    def __init__(self, parts: Sequence[Any], labels: Sequence[str]) -> None:
        self.parts, self.labels = list(parts), tuple(labels)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.added_tokens: list[str] = getattr(self.parts[0], "added_tokens", []) if self.parts else []
        self.directory = "+".join(str(getattr(p, "directory", "")) for p in self.parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths for p in self.parts]) if self.parts else np.zeros(0, dtype=np.int64)

    @property
    def stats(self) -> DatasetStats:
        return sum_stats([p.stats for p in self.parts])

    @property
    def max_token_id(self) -> int:
        return max((p.max_token_id for p in self.parts), default=-1)

    def _locate(self, index: int) -> tuple[Any, int]:
        part = int(part_of(self.starts, np.array([index]))[0])
        return self.parts[part], int(index - self.starts[part])

    def __getitem__(self, index: int) -> Any:
        part, local = self._locate(int(index))
        return part[local]

    def where(self, index: int) -> str:
        part, local = self._locate(int(index))
        return part.where(local)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        for part in self.parts:
            part.close()


def sum_stats(all_stats: Sequence[DatasetStats]) -> DatasetStats:
    total = DatasetStats()
    for stats in all_stats:
        for key in ("rows", "examples", "tokens", "trained_tokens", "truncated", "special_token_rows"):
            setattr(total, key, getattr(total, key) + getattr(stats, key))
        for reason, n in stats.rejected.items():
            total.rejected[reason] = total.rejected.get(reason, 0) + n
        for name, n in stats.ignored_fields.items():
            total.ignored_fields[name] = total.ignored_fields.get(name, 0) + n
    return total


@dataclass(frozen=True)
class Mixture:
    """Which items of each source an epoch trains (see the module docstring)."""
    labels: tuple[str, ...]
    pools: tuple[np.ndarray, ...]
    """Per source: the item indices (into the MixedDataset) it may train, after hold-out and max_samples."""
    weights: tuple[float, ...] | None
    seed: int

    def counts(self) -> list[int]:
        """Items per source in every epoch."""
        sizes = [len(pool) for pool in self.pools]
        if self.weights is None:
            return sizes
        total, mass = sum(sizes), sum(self.weights)
        exact = [w / mass * total for w in self.weights]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
        for k in by_remainder[:total - sum(counts)]:
            counts[k] += 1
        return counts

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The items of `epoch` (a multiset when a source repeats), grouped by source; the plan shuffles them."""
        chosen = []
        for number, (pool, count) in enumerate(zip(self.pools, self.counts())):
            if count == 0:
                continue
            repeats, rest = divmod(count, len(pool))
            rng = np.random.default_rng([self.seed, epoch, EPOCH_STREAM, number])
            chosen += [np.tile(pool, repeats), np.sort(rng.choice(pool, rest, replace=False))]
        return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)

    def table(self, all_stats: Sequence[DatasetStats], *, pairs: bool = False) -> list[dict[str, Any]]:
        """One row per source: what it read, what it gives each epoch, its share asked and got."""
        counts, sizes = self.counts(), [len(pool) for pool in self.pools]
        total = sum(counts) or 1
        mass = sum(self.weights) if self.weights else None
        rows = []
        for k, label in enumerate(self.labels):
            stats = asdict(all_stats[k])
            rows.append({"source": label, "rows": stats["rows"], "rejected": sum(stats["rejected"].values()),
                         "examples": stats["examples"] // (2 if pairs else 1), "tokens": stats["tokens"],
                         "trained_tokens": stats["trained_tokens"], "pool": sizes[k], "per_epoch": counts[k],
                         "asked": None if mass is None else self.weights[k] / mass,  # type: ignore[index]
                         "got": counts[k] / total,
                         "repeated": counts[k] / sizes[k] if sizes[k] and counts[k] > sizes[k] else None})
        return rows


def part_of(starts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The source number of each item index, sources laid end to end from `starts` (length sources + 1)."""
    return np.searchsorted(starts, np.asarray(indices), side="right") - 1


def make_mixture(starts: np.ndarray, labels: Sequence[str], train_indices: np.ndarray, *,
                 weights: Sequence[float | None], max_samples: Sequence[int | None], seed: int) -> Mixture:
    """The mixture over sources laid end to end from `starts`, drawing only on `train_indices` (eval held out)."""
    parts = part_of(starts, train_indices)
    pools = []
    for number, cap in enumerate(max_samples):
        pool = train_indices[parts == number]
        if cap is not None and len(pool) > cap:
            rng = np.random.default_rng([seed, CAP_STREAM, number])
            pool = np.sort(rng.choice(pool, cap, replace=False))
        pools.append(pool)
    given = None if all(w is None for w in weights) else tuple(float(w) for w in weights)  # type: ignore[arg-type]
    if given is not None:
        for label, pool in zip(labels, pools):
            if len(pool) == 0:
                raise DataError(f"data source {label} has a weight but no usable example (all its rows were rejected "
                                "or held out; see rejects.jsonl). Fix its rows, or remove the source.",
                                reason="empty source")
    return Mixture(tuple(labels), tuple(pools), given, seed)


def hold_out(starts: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) item indices with `fraction` of every source held out (at least one item each), so each
    source is represented in the evaluation."""
    train, held = [], []
    for number in range(len(starts) - 1):
        start, end = int(starts[number]), int(starts[number + 1])
        shuffled = start + np.random.default_rng([seed, EVAL_STREAM, number]).permutation(end - start)
        count = min(max(1, round(fraction * (end - start))), end - start) if end > start else 0
        held.append(shuffled[:count])
        train.append(shuffled[count:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(held)).astype(np.int64)


def mixture_text(table: Sequence[dict[str, Any]]) -> str:
    """The per-source table `sftlab train` and `check` print."""
    head = f"{'source':<32} {'rows':>8} {'rejected':>8} {'examples':>8} {'tokens':>11} {'trained':>11} " \
           f"{'per epoch':>9} {'asked':>6} {'got':>6}"
    lines = ["data sources:", head]
    for row in table:
        asked = "-" if row["asked"] is None else f"{100 * row['asked']:.1f}%"
        note = f"  (repeated x{row['repeated']:.2f}: smaller than its share)" if row["repeated"] else ""
        if row["pool"] < row["examples"] and not row["repeated"]:
            note += f"  (from {row['pool']} usable)"
        lines.append(f"{row['source'][-32:]:<32} {row['rows']:>8} {row['rejected']:>8} {row['examples']:>8} "
                     f"{row['tokens']:>11,} {row['trained_tokens']:>11,} {row['per_epoch']:>9} {asked:>6} "
                     f"{100 * row['got']:>5.1f}%{note}")
    return "\n".join(lines)
