"""examples/support_agent/diagnose.py: the messages its pairing check asks, how it scores them, its checks run
end to end on a tiny model (SWEEP.md's eleventh and thirteenth rounds quote them on the real one)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model_dir, write_qa_chats
from sftlab.cli import main

HERE = Path(__file__).resolve().parent.parent / "examples" / "support_agent"
sys.path.insert(0, str(HERE))

import diagnose  # noqa: E402
from facts import BY_NAME, FACTS, HELDOUT_PAIRS  # noqa: E402
from make_data import build, read_jsonl  # noqa: E402


def test_every_ordered_pair_is_asked_in_held_out_wordings() -> None:
    rows = diagnose.pair_rows(per_pair=2)
    assert len(rows) == len(FACTS) * (len(FACTS) - 1) * 2
    assert sum(row["unseen"] for row in rows) == len(HELDOUT_PAIRS) * 2 * 2  # both orders, two messages each
    assert {(row["x"], row["y"]) for row in rows} == {(a.name, b.name) for a in FACTS for b in FACTS if a is not b}
    for row in rows:
        assert row["unseen"] == (frozenset((row["x"], row["y"])) in HELDOUT_PAIRS)
        message = row["messages"][1]["content"]
        for name in (row["x"], row["y"]):  # a held-out wording of each fact, never a training one
            stems = [t.split("{")[0] for t in BY_NAME[name].heldout]
            assert any(stem in message for stem in stems)
    assert diagnose.pair_rows(per_pair=2) == rows  # seeded


def test_the_pair_table_scores_first_second_and_both() -> None:
    rows = diagnose.pair_rows(per_pair=1)
    right = [row["messages"][-1]["content"] for row in rows]
    assert all(shares["first"] == shares["second"] == shares["both"] == 1.0
               for shares in diagnose.pair_table(rows, right).values())
    first_only = [BY_NAME[row["x"]].answer for row in rows]
    table = diagnose.pair_table(rows, first_only)
    assert all(s["first"] == 1.0 and s["second"] == 0.0 and s["both"] == 0.0 for s in table.values())
    assert table[True]["n"] == len(HELDOUT_PAIRS) * 2 and table[False]["n"] == len(rows) - len(HELDOUT_PAIRS) * 2


def test_both_checks_run_on_a_model(tmp_path, capsys) -> None:
    model = tiny_model_dir(tmp_path / "model")
    names = tmp_path / "names.txt"
    names.write_text("plain|" + "|".join(f"topic {i}" for i in range(len(FACTS))) + "\n")
    assert diagnose.main(["topics", str(model), "--names", str(names)]) == 0
    out = capsys.readouterr().out
    assert "facts.py" in out and "plain" in out and f"/{sum(len(f.train) for f in FACTS)} by sum" in out
    heldout = tmp_path / "heldout.jsonl"
    rows = build(split="heldout", rows=6)
    heldout.write_text("".join(json.dumps(sample.heldout_row()) + "\n" for sample in rows), encoding="utf-8")
    singles = [sample for sample in rows if sample.kind == "single"]
    assert diagnose.main(["topics", str(model), "--heldout", str(heldout)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(singles) == 3 and len(lines) == 4
    assert re.fullmatch(r"facts\.py +right name first: [0-3]/3 by sum, [0-3]/3 by mean", lines[-1])
    for line, sample in zip(lines, singles):  # each single question: the right name's rank and margin, in file order
        rank, margin, right = line.split()[1], float(line.split()[3]), line.split()[4]
        assert right == sample.turns[0][1][0] and 1 <= int(rank) <= len(FACTS) and margin <= 0
        assert (margin == 0) == (rank == "1") and sample.turns[0][0][:70] in line
    assert diagnose.main(["pairs", str(model), "--per-pair", "1"]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0].startswith("pairs never trained together n= 18 first ") and " both " in lines[0]
    assert lines[1].startswith("pairs trained together n= 54 first ")


def test_a_soup_is_the_mean_of_the_runs_folded_weights(tmp_path, capsys) -> None:
    """`soup`: two adapter runs of one tiny model (two seeds) folded into their base and averaged, weight by weight,
    as `sftlab merge` folds each; each run's and the soup's accuracy printed; a run of another base is refused."""
    model = tiny_model_dir(tmp_path / "model", init_range=0.2)
    data = write_qa_chats(tmp_path / "train.jsonl", [(f"What is {i}+{i}?", f"It is {2 * i}.") for i in range(8)])
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(s.heldout_row()) + "\n" for s in build(split="heldout", rows=3)))
    config = tmp_path / "config.yaml"
    config.write_text("method: lora\n", encoding="utf-8")
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        assert main(["train", str(config), f"model={model}", f"output_dir={run}", f"data.train={data}",
                     "data.cache=false", "eval.probe=none", "train.max_steps=3", "train.lr=5e-2",
                     "train.save_every_steps=3", f"train.seed={seed}"]) == 0
        assert main(["merge", str(run), "--output", str(tmp_path / f"merged{seed}")]) == 0
        runs.append(str(run))
    capsys.readouterr()
    rows = read_jsonl(heldout)
    mean, each = diagnose.soup_of(runs, rows, None)
    assert len(each) == 2 and all(len(answers) == 3 for answers in each)
    merged = [load_file(tmp_path / f"merged{seed}" / "model.safetensors") for seed in (1, 2)]
    got = mean.model.state_dict()
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged[0][up], merged[1][up])  # the seeds trained apart
    for name, first in merged[0].items():
        torch.testing.assert_close(got[name], (first + merged[1][name]) / 2, rtol=0, atol=1e-6)
    assert diagnose.main(["soup", *runs, "--heldout", str(heldout)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{runs[0]}: ") and lines[1].startswith(f"{runs[1]}: ") and "/3 (" in lines[0]
    assert lines[2].startswith("soup of 2: ")
    other = tiny_model_dir(tmp_path / "other", seed=5)
    saved = Path(runs[1]) / "config.yaml"
    saved.write_text(saved.read_text().replace(str(model), str(other)))
    with pytest.raises(SystemExit, match="a soup averages runs of one base model and method"):
        diagnose.soup_of(runs, rows, None)
