"""examples/support_agent/diagnose.py: the messages its pairing check asks, how it scores them, and both checks run
end to end on a tiny model (SWEEP.md's eleventh round quotes them on the real one)."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import tiny_model_dir

HERE = Path(__file__).resolve().parent.parent / "examples" / "support_agent"
sys.path.insert(0, str(HERE))

import diagnose  # noqa: E402
from facts import BY_NAME, FACTS, HELDOUT_PAIRS  # noqa: E402


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
    assert diagnose.main(["pairs", str(model), "--per-pair", "1"]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0].startswith("pairs never trained together n= 18 first ") and " both " in lines[0]
    assert lines[1].startswith("pairs trained together n= 54 first ")
