"""Property (issue 14): whatever the user keeps where sftlab writes — files, dirs and symlinks named like a
run's files, in the output dir, beside it, as the data or the model — random sequences of `train`,
`train --overwrite`, `merge` and `check --rejects` never change or remove one of them. Each command may
succeed or be refused (exit 2); it may never raise, and the user's files are hashed before and after.

CI runs a fixed (derandomized) handful of sequences on a tiny model (each train is 1 step);
SFTLAB_PROPERTY_EXAMPLES=200 searches deeper.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import tiny_model_dir
from sftlab.cli import main
from test_ownership import snapshot

EXAMPLES = int(os.environ.get("SFTLAB_PROPERTY_EXAMPLES", "3"))
ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Ping?", "Pong."), ("Hi!", "Hello there."), ("2+2?", "Four.")]]
NAMES = ("config.yaml", "tensorboard", "model", "adapter", "metrics.jsonl", "checkpoints", "finished.json",
         "rejects.jsonl", "report.html", "loss.png", "base", "notes.txt", ".sftlab-manifest.json", ".adapter.tmp-1")
"""Names a user's entries in the output dir get: mostly the ones a run writes, its manifest's included."""

entries = st.dictionaries(st.sampled_from(NAMES), st.sampled_from(["file", "dir", "link", "model"]), max_size=4)
data_places = st.sampled_from(["beside", "in output", "in output as rejects.jsonl"])
model_places = st.sampled_from(["shared", "in output as model", "is output"])
commands = st.lists(st.one_of(
    st.tuples(st.just("train"), st.booleans()),  # (train, --overwrite)
    st.tuples(st.just("merge"), st.sampled_from(["out", "work", ".", "out/merged", "model", "new"]), st.booleans()),
    st.tuples(st.just("check"), st.sampled_from(["data", "new", "out", "out/rejects.jsonl", "a user entry"])),
), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("property")
    return {"root": root, "model": tiny_model_dir(root / "base", init_range=0.2)}


def build(work: Path, model: Path, users: dict[str, str], data_place: str, model_place: str) -> dict[str, Path]:
    """The user's tree: out/ holding `users`, victims outside it for the symlinks, the data and the model."""
    out, outside = work / "out", work / "outside"
    out.mkdir(parents=True)
    outside.mkdir()
    for i, (name, kind) in enumerate(sorted(users.items())):
        path = out / name
        if kind == "file":
            path.write_text(f"the user's {name} ({i})\n", encoding="utf-8")
        elif kind == "dir":
            path.mkdir()
            (path / "inside.txt").write_text(f"the user's file in {name}\n", encoding="utf-8")
        elif kind == "link":
            victim = outside / f"victim-{i}.txt"
            victim.write_text(f"outside, linked from {name}\n", encoding="utf-8")
            path.symlink_to(victim)
        else:
            shutil.copytree(model, path)
    data = {"beside": work / "train.jsonl", "in output": out / "train.jsonl",
            "in output as rejects.jsonl": out / "rejects.jsonl"}[data_place]
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "{broken\n", encoding="utf-8")
    if model_place == "in output as model" and not (out / "model").exists():
        shutil.copytree(model, out / "model")
    chosen = {"shared": model, "in output as model": out / "model", "is output": out}[model_place]
    if model_place == "is output" and not (out / "config.json").exists():
        for child in model.iterdir():
            if not (out / child.name).exists():
                shutil.copy(child, out / child.name)
    return {"out": out, "data": data, "model": chosen, "outside": outside}


def run(command: tuple, work: Path, tree: dict[str, Path], users: dict[str, str]) -> int:
    out, data, model = tree["out"], tree["data"], tree["model"]
    if command[0] == "train":
        args = ["train", str(work / "cfg.yaml"), f"model={model}", f"data.train={data}", f"output_dir={out}",
                "data.cache=false", "data.on_bad_row=skip", "train.max_steps=1", "train.micro_batch_size=2",
                "lora.rank=2", "data.max_seq_len=64", *(["--overwrite"] if command[1] else [])]
        return main(args)
    if command[0] == "merge":
        target = {"out": out, "work": work, ".": Path("."), "out/merged": out / "merged", "model": model,
                  "new": work / "merged-new"}[command[1]]
        return main(["merge", str(out), "--output", str(target), *(["--overwrite"] if command[2] else [])])
    target = {"data": data, "new": work / "new.rejects.jsonl", "out": out, "out/rejects.jsonl": out / "rejects.jsonl",
              "a user entry": out / (sorted(users)[0] if users else "notes.txt")}[command[1]]
    return main(["check", str(data), "--model", str(model), "--template", "chatml", "data.max_seq_len=64",
                 "data.on_bad_row=skip", "--rejects", str(target)])


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(users=entries, data_place=data_places, model_place=model_places, sequence=commands)
@example(users={"model": "model", "notes.txt": "file", "tensorboard": "dir"}, data_place="in output",
         model_place="shared", sequence=[("train", True), ("train", True), ("merge", "new", False),
                                         ("check", "out/rejects.jsonl")])  # the runs succeed beside the user's
def test_no_command_changes_or_removes_a_file_the_run_did_not_write(shared, users, data_place, model_place,
                                                                    sequence) -> None:
    work = Path(tempfile.mkdtemp(dir=shared["root"]))
    (work / "cfg.yaml").write_text("method: lora\n", encoding="utf-8")
    tree = build(work, shared["model"], users, data_place, model_place)
    before, model_before = snapshot(work), snapshot(shared["model"])
    cwd = Path.cwd()
    os.chdir(work)
    try:
        codes = [run(command, work, tree, users) for command in sequence]
    finally:
        os.chdir(cwd)
    after = snapshot(work)
    changed = {path: (digest, after.get(path)) for path, digest in before.items() if after.get(path) != digest}
    assert not changed, (sequence, codes, changed)
    assert snapshot(shared["model"]) == model_before
    assert all(code in (0, 1, 2) for code in codes), codes
    shutil.rmtree(work)
