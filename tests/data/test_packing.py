"""Epoch plans: best-fit-decreasing packing and length-grouped batches — coverage, bounds, replayability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sftlab.data.batching import collate, collate_packed
from sftlab.data.encode import IGNORE_INDEX, Example
from sftlab.data.packing import best_fit_decreasing, grouped_plan, packed_plan, plan_length
from sftlab.train.loss import supervised_positions

lengths_strategy = st.lists(st.integers(1, 64), min_size=1, max_size=200)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(64, 200), seed=st.integers(0, 2**16))
def test_bfd_places_each_example_once_within_capacity_and_the_bin_count_ignores_order(lengths, capacity, seed) -> None:
    lengths = np.array(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    bins = best_fit_decreasing(lengths, capacity=capacity, order=order)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(0 < sum(lengths[b]) <= capacity for b in bins)
    assert len(bins) >= -(-lengths.sum() // capacity)  # no fewer rows than the tokens need
    # Best fit never leaves two rows that would fit in one: each row was opened for an example that fit
    # no earlier row.
    loads = sorted(sum(lengths[b]) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity
    again = best_fit_decreasing(lengths, capacity=capacity, order=np.arange(len(lengths)))
    assert len(again) == len(bins)
    assert sorted(sorted(lengths[b].tolist()) for b in again) == sorted(sorted(lengths[b].tolist()) for b in bins)


def test_bfd_picks_the_tightest_bin() -> None:
    # After 7 and 6 (bins with 3 and 4 free), a 3 goes to the 7's bin, where it fits exactly.
    assert best_fit_decreasing(np.array([7, 6, 3]), capacity=10, order=np.arange(3)) == [[0, 2], [1]]


def test_an_example_longer_than_a_row_is_refused() -> None:
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than a row's 8"):
        best_fit_decreasing(np.array([3, 9]), capacity=8, order=np.arange(2))


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_strategy, rows=st.integers(1, 4), seed=st.integers(0, 100), epoch=st.integers(0, 3))
def test_packed_plan_covers_the_epoch_and_replays(lengths, rows, seed, epoch) -> None:
    lengths = np.array(lengths)
    indices = np.arange(len(lengths))
    plan = packed_plan(lengths, indices, capacity=96, rows_per_batch=rows, seed=seed, epoch=epoch)
    assert sorted(np.concatenate(plan).tolist()) == indices.tolist()
    assert all(lengths[batch].sum() <= 96 * rows for batch in plan)
    assert len(plan) == plan_length(lengths, indices, packing=True, capacity=96, micro_batch_size=rows)
    replay = packed_plan(lengths, indices, capacity=96, rows_per_batch=rows, seed=seed, epoch=epoch)
    assert all(np.array_equal(a, b) for a, b in zip(plan, replay))


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_strategy, size=st.integers(1, 5), accum=st.integers(1, 3), seed=st.integers(0, 100))
def test_grouped_plan_covers_the_epoch_and_keeps_steps_whole(lengths, size, accum, seed) -> None:
    lengths = np.array(lengths)
    indices = np.arange(len(lengths))
    plan = grouped_plan(lengths, indices, micro_batch_size=size, grad_accum_steps=accum, seed=seed, epoch=0)
    assert sorted(np.concatenate(plan).tolist()) == indices.tolist()
    assert len(plan) == plan_length(lengths, indices, packing=False, capacity=None, micro_batch_size=size)
    # Every micro-batch is full but the very last: steps never straddle a short batch.
    assert all(len(batch) == size for batch in plan[:-1])
    # Which examples share a step depends only on size x accum.
    merged = grouped_plan(lengths, indices, micro_batch_size=size * accum, grad_accum_steps=1, seed=seed, epoch=0)
    steps = [np.concatenate(plan[i:i + accum]) for i in range(0, len(plan), accum)]
    assert [sorted(s.tolist()) for s in steps] == [sorted(m.tolist()) for m in merged]


def test_grouped_batches_pad_less_than_random_ones() -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=4096)
    indices = np.arange(len(lengths))
    plan = grouped_plan(lengths, indices, micro_batch_size=8, grad_accum_steps=1, seed=0, epoch=0)
    shuffled = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [shuffled[i:i + 8] for i in range(0, len(shuffled), 8)]

    def padding(batches) -> int:
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    assert padding(plan) < 0.1 * padding(random_batches)
    assert not np.array_equal(np.concatenate(plan), np.sort(np.concatenate(plan)))  # still shuffled


X = IGNORE_INDEX  # X: a label that does not train
EXAMPLES = [Example([1, 5, 6, 7], [X, 5, 6, 7], "a:1"), Example([8, 9, 10], [8, 9, 10], "a:2"),
            Example([11, 12], [11, X], "a:3")]


def test_packed_row_restarts_positions_and_never_targets_a_first_token() -> None:
    batch = collate_packed(EXAMPLES)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch.cu_seqlens.tolist() == [0, 4, 7, 9] and batch.max_seqlen == 4
    assert batch.attention_mask is None and batch.num_tokens == 9 and batch.where == ("a:1", "a:2", "a:3")
    # Example 2's first token (8) is trained in its own labels, but only as an unpacked first token is:
    # never. Position 3 (example 1's last) predicts nothing; the supervised targets are those of the
    # examples run one by one.
    assert batch.labels[0, [0, 4, 7]].tolist() == [X, X, X]
    assert 3 not in batch.loss_index.tolist() and 6 not in batch.loss_index.tolist()
    one_by_one = [supervised_positions(collate([e], pad_id=0).labels)[1] for e in EXAMPLES]
    assert batch.loss_targets.tolist() == torch.cat(one_by_one).tolist()
