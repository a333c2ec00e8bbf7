"""The shared batched decoder (sftlab.models.decoding): its greedy answers are those of the plainest loop there is,
one whole forward per token with no cache, for ragged prompts in one batch, with and without a shared prefix run
once, rows stopping at their own stop tokens and the batch at max_new_tokens. The model runs in float64, so that
float rounding cannot flip an argmax between the two (the padded, cached batch sums in another order)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_model_dir
from sftlab.models import decoding

PREFIX = [5, 9, 14, 3, 27, 11, 8, 40, 6, 19]
"""The tokens every prompt of the shared-prefix case starts with (a template's header and system prompt)."""
OWN = [[31, 7, 22], [33, 4, 18, 25, 9, 12, 44, 2], [35], [37, 21, 16, 5, 28]]
"""Each prompt's own tokens after it: ragged, and different from their first token on."""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", init_range=0.2)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()


def plain_greedy(model: torch.nn.Module, prompt: list[int], *, stops: set[int], max_new_tokens: int) -> list[int]:
    """Greedy answer ids (ending with the stop token when one came): the whole sequence through the model at
    every step, no cache, no padding, one row."""
    ids = list(prompt)
    answer: list[int] = []
    with torch.no_grad():
        while len(answer) < max_new_tokens:
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            answer.append(token)
            ids.append(token)
            if token in stops:
                break
    return answer


def batched(model: torch.nn.Module, prompts: list[list[int]], *, stops: set[int], max_new_tokens: int,
            share: bool) -> tuple[list[list[int]], int]:
    """The shared decoder's greedy answers to `prompts` in one batch, and the prefix length it shared."""
    with torch.no_grad():
        prefix = decoding.shared_prefix(model, prompts, device=torch.device("cpu")) if share else decoding.NO_PREFIX
        found = decoding.decode_batch(model, prompts, stops=stops, max_new_tokens=max_new_tokens, pad_id=0,
                                      device=torch.device("cpu"), pick=decoding.greedy, prefix=prefix)
    return found, prefix.length


def stops_for(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> set[int]:
    """Stop tokens that end two of the prompts' answers early and at different steps: tokens their plain answers
    (without stops) say at steps 2 and 5 that they had not said before."""
    free = [plain_greedy(model, p, stops=set(), max_new_tokens=max_new_tokens) for p in prompts]
    first, second = free[0][2], free[1][5]
    assert first not in free[0][:2] and second not in free[1][:5], "pick other rows or steps for the stops"
    return {first, second}


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefix", "whole-rows"])
def test_batched_greedy_answers_equal_a_plain_loop_without_a_cache(model, share) -> None:
    prompts = [PREFIX + own for own in OWN]
    max_new_tokens = 12
    stops = stops_for(model, prompts, max_new_tokens)
    expected = [plain_greedy(model, p, stops=stops, max_new_tokens=max_new_tokens) for p in prompts]
    found, shared = batched(model, prompts, stops=stops, max_new_tokens=max_new_tokens, share=share)
    assert found == expected
    assert shared == (len(PREFIX) if share else 0)
    stopped = [a for a in expected if a[-1] in stops]
    assert len(stopped) >= 2 and len({len(a) for a in stopped}) >= 2  # rows stop at their own steps
    assert any(len(a) == max_new_tokens and a[-1] not in stops for a in expected)  # and one runs to the cap


@pytest.mark.parametrize("join", [True, False], ids=["one-decoding-batch", "group-by-group"])
@pytest.mark.parametrize("share", [True, False], ids=["shared-prefix", "whole-rows"])
def test_many_rows_with_their_own_caps_equal_a_plain_loop(model, monkeypatch, share, join) -> None:
    """decode_rows: prompts prefilled in groups (shortest first), their caches joined into one decoding batch
    (or, where they cannot be joined, decoded group by group), every row to its own cap or stop token."""
    prompts = [PREFIX + own for own in OWN] + [PREFIX + [36, 2], PREFIX + [38, 13, 13, 29, 1, 17, 23]]
    caps = [12, 3, 9, 6, 1, 12]
    stops = stops_for(model, prompts, 12)
    expected = [plain_greedy(model, p, stops=stops, max_new_tokens=cap) for p, cap in zip(prompts, caps)]
    if not join:
        monkeypatch.setattr(decoding, "_joined", lambda groups: None)
    with torch.no_grad():
        prefix = decoding.shared_prefix(model, prompts, device=torch.device("cpu")) if share else decoding.NO_PREFIX
        found = decoding.decode_rows(model, prompts, caps=caps, stops=stops, pad_id=0, device=torch.device("cpu"),
                                     pick=decoding.greedy, prefix=prefix, prefill_rows=2)
    assert found == expected
    assert all(len(a) == cap for a, cap in zip(expected, caps) if a[-1] not in stops)  # the rest ran to their cap
    assert any(a[-1] in stops for a in expected) and any(a[-1] not in stops and len(a) > 1 for a in expected)


def plain_logps(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The log-probs (len(answer), V) of each answer token's position, from one whole forward of prompt + answer."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) + len(answer) - 1], dim=-1)


@pytest.mark.parametrize("rows", ["decode_rows", "decode_batch"])
def test_forced_answers_are_watched_step_by_step_as_they_were_picked(model, rows) -> None:
    """`forced` + `watch`: a decode of given answers sees, at every answer token, the logits a greedy decode saw
    when it picked them — bit for bit (same rows, batches and steps) — and those are a whole forward's (float64,
    independent reference); rows leave where their answers end, a stop token inside one included."""
    prompts = [PREFIX + own for own in OWN] + [PREFIX + [36, 2]]
    caps = [7, 3, 5, 6, 1]
    stops = stops_for(model, prompts, 12)

    def run(forced: list[list[int]] | None) -> tuple[list[list[int]], dict[tuple[int, int], torch.Tensor]]:
        seen: dict[tuple[int, int], torch.Tensor] = {}

        def watch(indices: list[int], positions: list[int], logits: torch.Tensor, tokens: torch.Tensor) -> None:
            assert logits.shape[0] == len(indices) == len(positions) == tokens.shape[0]
            for i, at, row, token in zip(indices, positions, logits, tokens.tolist()):
                assert (i, at) not in seen
                seen[(i, at)] = torch.log_softmax(row, dim=-1)
                assert forced is None or token == forced[i][at]

        with torch.no_grad():
            prefix = decoding.shared_prefix(model, prompts, device=torch.device("cpu"))
            if rows == "decode_rows":
                found = decoding.decode_rows(model, prompts, caps=caps, stops=stops, pad_id=0, prefill_rows=2,
                                             device=torch.device("cpu"), pick=decoding.greedy, prefix=prefix,
                                             forced=forced, watch=watch)
            else:
                found = decoding.decode_batch(model, prompts, stops=stops, max_new_tokens=max(caps), pad_id=0,
                                              device=torch.device("cpu"), pick=decoding.greedy, prefix=prefix,
                                              forced=forced, watch=watch)
        return found, seen

    picked, at_pick = run(None)
    forced, at_force = run(picked)
    assert forced == picked and set(at_force) == set(at_pick) == {(i, at) for i, a in enumerate(picked)
                                                                   for at in range(len(a))}
    assert all(torch.equal(at_force[key], at_pick[key]) for key in at_pick)
    for i, (prompt, answer) in enumerate(zip(prompts, picked)):
        expected = plain_logps(model, prompt, answer)
        torch.testing.assert_close(torch.stack([at_pick[(i, at)] for at in range(len(answer))]), expected)
    # an answer that is not the model's own is followed to its end, through a stop token in its middle
    other = [[next(iter(stops)), 3, 4], [5], [6, 7], [8], [9, 10, 11, 12]]
    followed, at_other = run(other)
    assert followed == other and len(at_other) == sum(len(a) for a in other)
    torch.testing.assert_close(torch.stack([at_other[(0, at)] for at in range(3)]), plain_logps(model, prompts[0],
                                                                                                 other[0]))


def test_the_cache_written_in_place_and_rows_leaving_late_keep_the_plain_loops_answers(model, monkeypatch) -> None:
    """A step writes its keys and values into room made after the prefill (no concatenation of the whole cache),
    falling back to concatenation once out of room; finished rows stay in the batch until they are an eighth of
    it (dropping rows copies the cache). Neither changes an answer: 18 rows, caps 1-9, room for only 3 steps."""
    prompts = [PREFIX + [20 + i, 3 + i % 5] + [7] * (i % 4) for i in range(18)]
    caps = [1 + i % 9 for i in range(18)]
    expected = [plain_greedy(model, p, stops=set(), max_new_tokens=cap) for p, cap in zip(prompts, caps)]
    made, pruned = [], []
    real_room, real_selected = decoding._make_room, decoding._selected
    monkeypatch.setattr(decoding, "_make_room", lambda cache, steps: made.append(steps) or real_room(cache, 3))
    monkeypatch.setattr(decoding, "_selected", lambda rows, live, device: pruned.append((len(rows.rows), len(live)))
                        or real_selected(rows, live, device))
    with torch.no_grad():
        found = decoding.decode_rows(model, prompts, caps=caps, stops=set(), pad_id=0, device=torch.device("cpu"),
                                     pick=decoding.greedy, prefill_rows=5)
    assert found == expected and made == [9]
    assert pruned and all((batch - live) * decoding.PRUNE_SHARE >= batch for batch, live in pruned)
    assert len(pruned) < 8  # fewer cache copies than the 8 steps at which rows finish before the last


@pytest.mark.parametrize("forced", [False, True], ids=["picked", "forced"])
def test_forks_answer_their_prompts_again_in_the_same_batch(model, forced) -> None:
    """decode_rows' forks: prompts answered a second time from their own prefill (its cache rows copied), with
    their own pick and cap, in the batch of the others: the forks' answers are the plain loop's for their pick
    (greedy here, so checkable), the prompts' own answers unchanged, `watch` sees only the prompts' rows."""
    prompts = [PREFIX + own for own in OWN] + [PREFIX + [36, 2], PREFIX + [38, 13, 13, 29, 1, 17, 23]]
    caps = [6, 3, 5, 6, 1, 4]
    expected = [plain_greedy(model, p, stops=set(), max_new_tokens=cap) for p, cap in zip(prompts, caps)]
    of = [4, 1, 5]
    seen = set()
    with torch.no_grad():
        prefix = decoding.shared_prefix(model, prompts, device=torch.device("cpu"))
        found = decoding.decode_rows(model, prompts, caps=caps, stops=set(), pad_id=0, device=torch.device("cpu"),
                                     pick=decoding.greedy, prefix=prefix, prefill_rows=2,
                                     forced=expected if forced else None,
                                     watch=lambda rows, at, logits, tokens: seen.update(zip(rows, at)),
                                     forks=decoding.Forks(of, decoding.greedy, 7))
    assert found[:len(prompts)] == expected
    assert found[len(prompts):] == [plain_greedy(model, prompts[i], stops=set(), max_new_tokens=7) for i in of]
    assert seen == {(i, at) for i, answer in enumerate(expected) for at in range(len(answer))}


def test_decode_rows_of_no_prompts_and_zero_caps(model) -> None:
    with torch.no_grad():
        assert decoding.decode_rows(model, [], caps=[], stops=set(), pad_id=0, device=torch.device("cpu"),
                                    pick=decoding.greedy) == []
        found = decoding.decode_rows(model, [PREFIX, PREFIX + [3]], caps=[0, 2], stops=set(), pad_id=0,
                                     device=torch.device("cpu"), pick=decoding.greedy)
    assert found == [[], plain_greedy(model, PREFIX + [3], stops=set(), max_new_tokens=2)]


def test_prompts_without_a_common_prefix_decode_as_whole_rows(model) -> None:
    """Ragged prompts that share nothing: no prefix, and still the plain loop's answers."""
    prompts = [[12, *own] for own in OWN[:2]] + [[13, 4, 4], [14]]
    assert decoding.common_prefix(prompts) == 0
    expected = [plain_greedy(model, p, stops=set(), max_new_tokens=7) for p in prompts]
    found, shared = batched(model, prompts, stops=set(), max_new_tokens=7, share=True)
    assert shared == 0 and found == expected


def test_one_prompt_is_its_own_prefix_only_short_of_its_last_token(model) -> None:
    """Identical prompts share all but their last token (decoding starts from each row's last position)."""
    prompts = [PREFIX + OWN[1]] * 3
    assert decoding.common_prefix(prompts) == len(prompts[0]) - 1
    expected = plain_greedy(model, prompts[0], stops=set(), max_new_tokens=6)
    found, shared = batched(model, prompts, stops=set(), max_new_tokens=6, share=True)
    assert shared == len(prompts[0]) - 1 and found == [expected] * 3


def test_a_prefill_callable_takes_the_prompt(model) -> None:
    """A method's prefill (virtual tokens, prefixes) runs the prompt; here one that records its call and runs the
    model plainly, so the answer is the plain loop's."""
    seen: list[tuple[int, ...]] = []

    def prefill(m: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> object:
        seen.append(tuple(input_ids.shape))
        return m(input_ids=input_ids, use_cache=True, **kwargs)

    prompt = PREFIX + OWN[0]
    with torch.no_grad():
        found = decoding.decode_batch(model, [prompt], stops=set(), max_new_tokens=5, pad_id=0,
                                      device=torch.device("cpu"), pick=decoding.greedy, prefill=prefill)
    assert seen == [(1, len(prompt))] and found == [plain_greedy(model, prompt, stops=set(), max_new_tokens=5)]


def test_top_p_draws_are_reproducible_and_stay_in_the_nucleus() -> None:
    """The sampled pick: the same generator seed draws the same tokens; a token outside the top-p set never."""
    logits = torch.tensor([[4.0, 3.9, -9.0, -9.0, -9.0]] * 64)  # top_p 0.9 keeps tokens 0 and 1 only

    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return decoding.top_p_sampler(temperature=0.7, top_p=0.9, generator=generator)(logits)

    assert torch.equal(draw(3), draw(3))
    assert set(draw(3).tolist()) == {0, 1}


def test_the_demo_caps_each_answer_at_its_group_of_like_references() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "support_agent"))
    import demo

    prompts = [[1] * n for n in (30, 5, 17, 5, 90, 12, 40)]
    limits = [10, 50, 20, 40, 30, 20, 10]
    # sorted by (limit, prompt length): rows 0, 6, 5 | 2, 4, 3 | 1, each group capped at its largest limit
    assert demo.caps(prompts, limits, 3) == [20, 50, 40, 40, 40, 20, 20]
