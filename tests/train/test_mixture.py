"""Weighted mixtures of several sources through sftlab's own prepare() and loop: exact per-epoch counts,
deterministic plans, repeats said, per-source hold-out and eval loss, rejects counted per source."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import tiny_model_dir
from sftlab.config import load_config
from sftlab.data.mixture import Mixture
from sftlab.runs import prepare, train
from sftlab.train.loop import epoch_plan, total_steps

SIZES = {"a": 10, "b": 20, "c": 10}
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    paths = {}
    for name, size in SIZES.items():
        rows = [{"messages": [{"role": "user", "content": f"{name} question {i}?"},
                              {"role": "assistant", "content": f"{name} answer {i}."}]} for i in range(size)]
        if name == "c":  # one bad row, rejected and counted for c only
            rows.append({"messages": [{"role": "wizard", "content": "x"}]})
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def mixture_overrides(model_dir: Path, sources: dict[str, Path], out: Path, *extra: str) -> list[str]:
    listed = ", ".join(f"{{path: {sources[n]}, weight: {WEIGHTS[n]}}}" for n in SIZES)
    return [f"model={model_dir}", f"data.train=[{listed}]", f"output_dir={out}", "data.cache=false",
            "data.on_bad_row=skip", "train.micro_batch_size=4", "train.epochs=2", "lora.rank=4", *extra]


def per_source(setup, epoch: int) -> Counter:
    return Counter(Path(setup.train_data.where(int(i)).rsplit(":", 1)[0]).stem
                   for batch in epoch_plan(setup, epoch) for i in batch)


def test_weights_give_exact_counts_per_epoch_deterministically(model_dir, sources, tmp_path) -> None:
    text = io.StringIO()
    setup = prepare(load_config(overrides=mixture_overrides(model_dir, sources, tmp_path / "one")),
                    console=Console(file=text, width=200))
    total = sum(SIZES.values())  # 40 usable examples: a's share (20) is twice a, so a repeats
    for epoch in (0, 1):
        counts = per_source(setup, epoch)
        for name, weight in WEIGHTS.items():
            assert abs(counts[name] - weight * total) <= 1, (epoch, counts)
        assert sum(counts.values()) == total
    plans = [[b.tolist() for b in epoch_plan(setup, e)] for e in (0, 1)]
    assert plans[0] != plans[1]  # each epoch samples b and c afresh
    again = prepare(load_config(overrides=mixture_overrides(model_dir, sources, tmp_path / "two")),
                    console=Console(quiet=True))
    assert [[b.tolist() for b in epoch_plan(again, e)] for e in (0, 1)] == plans
    printed = text.getvalue()
    assert "data sources:" in printed and "repeated x2.00" in printed
    row_c = next(line for line in printed.splitlines() if line.startswith("c.jsonl"))
    assert row_c.split()[1:4] == ["11", "1", "10"]  # rows, rejected, examples of c alone
    assert total_steps(setup) == 2 * total // 4


def test_without_weights_every_source_example_trains_once_and_max_samples_caps(model_dir, sources, tmp_path) -> None:
    listed = f"[{sources['a']}, {{path: {sources['b']}, max_samples: 5}}, {sources['c']}]"
    setup = prepare(load_config(overrides=[f"model={model_dir}", f"data.train={listed}", f"output_dir={tmp_path}",
                                           "data.cache=false", "data.on_bad_row=skip"]), console=Console(quiet=True))
    assert per_source(setup, 0) == {"a": 10, "b": 5, "c": 10} == per_source(setup, 1)
    chosen_b = {setup.train_data.where(int(i)) for batch in epoch_plan(setup, 0) for i in batch if "b.jsonl" in
                setup.train_data.where(int(i))}
    assert chosen_b == {setup.train_data.where(int(i)) for batch in epoch_plan(setup, 1) for i in batch
                        if "b.jsonl" in setup.train_data.where(int(i))}  # the cap is one fixed choice


def test_eval_fraction_holds_out_of_every_source_and_logs_each_ones_loss(model_dir, sources, tmp_path) -> None:
    out = tmp_path / "run"
    setup = prepare(load_config(overrides=mixture_overrides(model_dir, sources, out, "data.eval_fraction=0.2",
                                                            "train.max_steps=2")), console=Console(quiet=True))
    assert {k: len(v) for k, v in setup.eval_groups.items()} == {"a.jsonl": 2, "b.jsonl": 4, "c.jsonl": 2}
    held = set(setup.eval_indices.tolist())
    assert all(int(i) not in held for e in (0, 1) for batch in epoch_plan(setup, e) for i in batch)
    train(setup, console=Console(quiet=True))
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line][-1]
    losses = [last[f"eval_loss/{name}.jsonl"] for name in SIZES]
    assert all(np.isfinite(losses))
    # The overall loss is the token-weighted mean of the sources' (each source's tokens are alike in number).
    assert min(losses) <= last["eval_loss"] <= max(losses)
    assert [json.loads(line)["where"] for line in (out / "rejects.jsonl").read_text().splitlines()] == \
        [f"{sources['c']}:11"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Eval loss per source" in page and "share asked" in page and f"{last['eval_loss/b.jsonl']:.4f}" in page


def test_mixture_counts_round_to_the_epoch_size_exactly() -> None:
    pools = (np.arange(0, 7), np.arange(7, 20), np.arange(20, 23))
    mixture = Mixture(("x", "y", "z"), pools, weights=(0.5, 0.3, 0.2), seed=3)
    assert mixture.counts() == [11, 7, 5] and sum(mixture.counts()) == 23  # 11.5, 6.9, 4.6: largest remainders
    chosen = mixture.epoch_indices(5)
    assert Counter(chosen.tolist())[0] in (1, 2) and np.array_equal(chosen, mixture.epoch_indices(5))
    assert len(set(chosen[11:18].tolist())) == 7  # y: its share without repeats
    assert set(chosen[18:].tolist()) == {20, 21, 22}  # z: all of it, some twice


def test_preference_pairs_mix_across_sources_with_columns_mapped(model_dir, tmp_path) -> None:
    paths = []
    for name, size in (("p", 4), ("q", 8)):
        rows = [{"question": f"{name} asks {i}?", "good": f"{name} answers {i}.", "bad": "No idea."}
                for i in range(size)]
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    mapping = "columns: {prompt: question, chosen: good, rejected: bad}"
    listed = f"[{{path: {paths[0]}, weight: 1, {mapping}}}, {{path: {paths[1]}, weight: 1, {mapping}}}]"
    setup = prepare(load_config(overrides=[f"model={model_dir}", f"data.train={listed}", f"output_dir={tmp_path / 'o'}",
                                           "stage=dpo", "data.cache=false", "train.max_steps=1"]),
                    console=Console(quiet=True))
    assert len(setup.train_data) == 12  # pairs, not their two sides
    counts = Counter(Path(setup.train_data.where(int(i)).rsplit(":", 1)[0]).stem
                     for batch in epoch_plan(setup, 0) for i in batch)
    assert counts == {"p": 6, "q": 6}  # equal weights: p's 4 pairs give 6 (repeated), q's 8 give 6
    train(setup, console=Console(quiet=True))


def test_the_resume_fingerprint_covers_every_source(sources, tmp_path) -> None:
    from sftlab.train.rundir import data_fingerprints

    copies = {}
    for name, path in sources.items():
        copies[name] = tmp_path / path.name
        copies[name].write_bytes(path.read_bytes())
    listed = f"[{copies['a']}, '{tmp_path / '[bc].jsonl'}']"  # a file and a glob
    cfg = load_config(overrides=[f"data.train={listed}"])
    before = data_fingerprints(cfg)["train"]
    assert before["sources"] == 2 and before == data_fingerprints(cfg)["train"]
    with copies["c"].open("a", encoding="utf-8") as file:  # a file only the glob names
        file.write(json.dumps({"messages": [{"role": "user", "content": "new"}]}) + "\n")
    assert data_fingerprints(cfg)["train"]["blake2b"] != before["blake2b"]
