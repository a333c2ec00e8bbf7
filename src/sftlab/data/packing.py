"""Which examples go into which micro-batch: the epoch plan, a pure function of (data, seed, epoch).

Two plans, both replayable on resume from (epoch, micro-batches done):

- packed (`data.packing: true`): the epoch's examples are packed best-fit-decreasing into rows of
  `capacity` (= data.max_seq_len) tokens; a micro-batch is `micro_batch_size` rows, run as one padding-free
  sequence in which every example keeps its own positions and attention (see models/attention.py). An
  example is never split across rows.
- length-grouped (`data.packing: false`): shuffled examples are sorted by length inside windows of many
  steps and cut into steps, so each micro-batch holds examples of similar length and pads little.

Either way the order of rows / steps is shuffled with the (seed, epoch) generator, and the number of
micro-batches per epoch does not depend on the epoch, so a run's step count is known before it starts.

>>> best_fit_decreasing(np.array([5, 3, 4, 2, 6]), capacity=8, order=np.arange(5))
[[4, 3], [0, 1], [2]]
"""

from __future__ import annotations

import bisect

import numpy as np

GROUP_WINDOW_STEPS = 64
"""Length grouping sorts within windows of this many optimizer steps: little padding, order still random."""


def best_fit_decreasing(lengths: np.ndarray, *, capacity: int, order: np.ndarray) -> list[list[int]]:
    """Pack the examples `order` (indices into `lengths`) into bins of at most `capacity` tokens.

    Longest first, each into the fullest bin it still fits (a new bin when none does). Ties keep their
    order in `order`, so a shuffled `order` varies which equal-length examples share a bin while the
    bins' lengths — and so their number — stay the same for every order.
    """
    sizes = lengths[order]
    if len(sizes) and int(sizes.max()) > capacity:
        longest = int(order[int(np.argmax(sizes))])
        raise ValueError(f"example {longest} has {int(sizes.max())} tokens, more than a row's {capacity}")
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with exactly that much room
    spaces: list[int] = []               # the keys of by_space, sorted
    for position in np.argsort(-sizes, kind="stable"):
        size = int(sizes[position])
        at = bisect.bisect_left(spaces, size)
        if at < len(spaces):  # the tightest bin with room
            space = spaces[at]
            holders = by_space[space]
            target = holders.pop()
            if not holders:
                del by_space[space]
                spaces.pop(at)
        else:
            space, target = capacity, len(bins)
            bins.append([])
        bins[target].append(int(order[position]))
        left = space - size
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(target)
    return bins


def packed_plan(lengths: np.ndarray, indices: np.ndarray, *, capacity: int, rows_per_batch: int,
                seed: int | None, epoch: int) -> list[np.ndarray]:
    """Micro-batches of `rows_per_batch` packed rows (flattened to example indices, row by row).
    `seed=None` keeps the given order and the packing's row order (evaluation)."""
    if seed is None:
        rows = best_fit_decreasing(lengths, capacity=capacity, order=indices)
    else:
        rng = np.random.default_rng([seed, epoch])
        rows = best_fit_decreasing(lengths, capacity=capacity, order=indices[rng.permutation(len(indices))])
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return [np.array([i for row in rows[start:start + rows_per_batch] for i in row], dtype=np.int64)
            for start in range(0, len(rows), rows_per_batch)]


def grouped_plan(lengths: np.ndarray, indices: np.ndarray, *, micro_batch_size: int, grad_accum_steps: int,
                 seed: int, epoch: int) -> list[np.ndarray]:
    """Micro-batches of `micro_batch_size` examples of similar length.

    Grouping works on whole optimizer steps (micro_batch_size × grad_accum_steps examples), so which examples
    share a step depends on that product only: 4 × 1 and 2 × 2 see the same examples in the same steps.
    """
    rng = np.random.default_rng([seed, epoch])
    shuffled = indices[rng.permutation(len(indices))]
    per_step = micro_batch_size * grad_accum_steps
    window = per_step * GROUP_WINDOW_STEPS
    steps: list[np.ndarray] = []
    for start in range(0, len(shuffled), window):
        chunk = shuffled[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        steps += [chunk[i:i + per_step] for i in range(0, len(chunk), per_step)]
    # A short last step stays last: in the middle it would shift every later step's boundary.
    short = [steps.pop()] if steps and len(steps[-1]) < per_step else []
    steps = [steps[i] for i in rng.permutation(len(steps))] + short
    return [step[i:i + micro_batch_size] for step in steps for i in range(0, len(step), micro_batch_size)]


def plan_length(lengths: np.ndarray, indices: np.ndarray, *, packing: bool, capacity: int | None,
                micro_batch_size: int) -> int:
    """Micro-batches per epoch, without building a plan's index arrays (the same for every epoch).

    Grouped: ceil(n / micro_batch_size) per window, summed — every step but a window's last is full."""
    if packing:
        rows = len(best_fit_decreasing(lengths, capacity=capacity or 0, order=indices))
        return -(-rows // micro_batch_size)
    return -(-len(indices) // micro_batch_size)

