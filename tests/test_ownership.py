"""Nothing of the user's is ever lost (issue 14): a run owns only what its manifest names; `check --rejects`
and `merge --output` never destroy an input or a path they did not create; non-finite weights are never
exported; the merge's fidelity check compares against the adapter model and fails on NaN. Each case is
reproduced for real through the CLI on a tiny model, and hashes of the user's files prove them untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model_dir
from sftlab import export, files
from sftlab.cli import main
from sftlab.data.rejects import RejectLog

ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Ping?", "Pong."), ("Hi!", "Hello there."), ("2+2?", "Four."), ("Sky?", "Blue.")]]
BAD_ROW = "{not json"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """One tiny base model, one data file (with a bad row, so check has rejects) and one finished LoRA run."""
    root = tmp_path_factory.mktemp("ownership")
    model = tiny_model_dir(root / "base", init_range=0.2)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + BAD_ROW + "\n", encoding="utf-8")
    run = root / "run"
    assert main(["train", *train_args(root, model, data, run)]) == 0
    return {"root": root, "model": model, "data": data, "run": run}


def train_args(root: Path, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A config file outside every dir under test, then overrides: 2 steps of LoRA on the tiny model."""
    config = root / "cfg.yaml"
    if not config.exists():
        config.write_text("method: lora\n", encoding="utf-8")
    return [str(config), f"model={model}", f"data.train={data}", f"output_dir={out}", "data.cache=false",
            "train.max_steps=2", "train.micro_batch_size=2", "lora.rank=2", "data.max_seq_len=64",
            "data.on_bad_row=skip", *extra]


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Each entry under root (not following symlinks) -> its content hash, link target or 'dir'."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --- output-dir ownership ---------------------------------------------------------------------------


def test_a_project_dir_holding_the_users_config_and_model_is_never_written(world, tmp_path, capsys) -> None:
    """The report's case: `sftlab train proj/config.yaml model=proj/model data.train=proj/train.jsonl
    output_dir=proj` overwrote proj/config.yaml and proj/model/model.safetensors."""
    proj = tmp_path / "proj"
    shutil.copytree(world["model"], proj / "model")
    shutil.copy(world["data"], proj / "train.jsonl")
    (proj / "config.yaml").write_text(f"method: lora\noutput_dir: {proj}\n", encoding="utf-8")
    before = snapshot(proj)
    for extra in ([], ["--overwrite"]):
        code = main(["train", str(proj / "config.yaml"), f"model={proj / 'model'}",
                     f"data.train={proj / 'train.jsonl'}", "train.max_steps=1", "data.cache=false", *extra])
        err = capsys.readouterr().err
        assert code == 2
        assert f"model {proj / 'model'} lies inside output_dir {proj} at model" in err.replace("\n", "")
        assert snapshot(proj) == before


def test_overwrite_on_a_dir_no_run_made_removes_nothing_of_the_users(world, tmp_path, capsys) -> None:
    out = tmp_path / "mine"
    shutil.copytree(world["model"], out / "model")  # the user's own model/ (a LoRA run writes adapter/)
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    before = snapshot(out)
    assert main(["train", *train_args(world["root"], world["model"], world["data"], out)]) == 2
    assert "not an sftlab run" in capsys.readouterr().err
    assert snapshot(out) == before
    for _ in range(2):  # writes beside the user's files; the second --overwrite removes only the run's
        assert main(["train", *train_args(world["root"], world["model"], world["data"], out), "--overwrite"]) == 0
        assert {k: v for k, v in snapshot(out).items() if k in before} == before
        assert set(files.manifest(out)) >= {"config.yaml", "adapter", "finished.json", "metrics.jsonl"}
        assert not set(files.manifest(out)) & {"model", "notes.txt"}
    capsys.readouterr()


def test_a_run_file_name_held_by_the_user_is_refused_never_replaced(world, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own metrics\n", encoding="utf-8")
    (out / "adapter").mkdir()
    (out / "adapter" / "weights.bin").write_bytes(b"mine")
    before = snapshot(out)
    assert main(["train", *train_args(world["root"], world["model"], world["data"], out), "--overwrite"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "holds adapter, metrics.jsonl, which the run writes but did not write" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("in_run_dir", [False, True])
def test_a_planted_symlink_is_never_written_through(world, tmp_path, capsys, in_run_dir) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    out = tmp_path / "out"
    if in_run_dir:  # a finished run's own config.yaml replaced by a link
        shutil.copytree(world["run"], out, symlinks=True)
        (out / "config.yaml").unlink()
    else:
        out.mkdir()
    (out / "config.yaml").symlink_to(victim)
    before = snapshot(tmp_path)
    assert main(["train", *train_args(world["root"], world["model"], world["data"], out), "--overwrite"]) == 2
    assert "never writes through a symlink" in capsys.readouterr().err.replace("\n", "")
    assert snapshot(tmp_path) == before and victim.read_text() == "precious"
    with pytest.raises(files.ForeignPathError, match="symlink"):
        files.owned(out, "config.yaml")


@pytest.mark.parametrize("case", ["output is the model dir", "data inside output at a run name",
                                  "model inside output at a run name"])
def test_inputs_and_output_may_not_overlap_where_a_write_lands_on_an_input(world, tmp_path, capsys, case) -> None:
    model, data, out = tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out"
    shutil.copytree(world["model"], model)
    shutil.copy(world["data"], data)
    if case == "output is the model dir":
        out = model
        named = (f"output_dir {model} is model {model} itself",)
    elif case == "data inside output at a run name":
        shutil.copytree(world["run"], out)  # a run dir whose rejects.jsonl the user points data.train at
        data = out / "rejects.jsonl"
        named = (f"data.train {data} lies inside output_dir {out} at rejects.jsonl",)
    else:
        shutil.copytree(world["run"], out)
        model = out / "base"
        shutil.copytree(world["model"], model)
        named = (f"model {model} lies inside output_dir {out} at base",)
    before = snapshot(tmp_path)
    assert main(["train", *train_args(world["root"], model, data, out), "--overwrite"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert all(text in err for text in named) and "Set output_dir" in err
    assert snapshot(tmp_path) == before


def test_a_run_dir_of_an_earlier_version_is_adopted_conservatively(world, tmp_path, capsys) -> None:
    """No manifest but finished.json: the run files that are plainly the run's are removed by --overwrite;
    an input at a run-file name (here the base model at model/) and anything else are kept."""
    out = tmp_path / "old"
    shutil.copytree(world["run"], out)
    (out / files.MANIFEST).unlink()
    for name in ("probe_reference.safetensors", "probe.json"):  # an earlier sftlab ran no probe
        (out / name).unlink(missing_ok=True)
    shutil.copytree(world["model"], out / "base-model")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    kept = snapshot(out, skip=("adapter", "checkpoints", "config.yaml", "finished.json", "loss.png",
                               "metrics.jsonl", "report.html", "report.json", "rejects.jsonl"))
    assert main(["train", *train_args(world["root"], out / "base-model", world["data"], out), "--overwrite"]) == 0
    err = capsys.readouterr().err.replace("\n", "")
    assert "a run of an earlier sftlab without a manifest" in err and "base-model" not in err.split("taken to be")[1]
    assert {k: v for k, v in snapshot(out).items() if k in kept} == kept
    assert (out / "finished.json").is_file() and "base-model" not in files.manifest(out)


def test_overwrite_removes_exactly_the_manifests_files(world, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    (out / "tensorboard").mkdir()  # a run-file name the run never wrote (tensorboard is off): the user's
    (out / "tensorboard" / "mine.txt").write_text("mine", encoding="utf-8")
    (out / ".notes.tmp-1").write_text("not scratch of ours", encoding="utf-8")
    before = snapshot(out, skip=tuple(files.manifest(out)))
    assert main(["train", *train_args(world["root"], world["model"], world["data"], out), "--overwrite"]) == 0
    assert "removed the previous run's files" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(out).items() if k in before} == before


# --- check --rejects -----------------------------------------------------------------------------------


def check(world, data: Path, rejects: Path | str) -> int:
    return main(["check", str(data), "--model", str(world["model"]), "--template", "chatml",
                 "data.max_seq_len=64", "data.on_bad_row=skip", "--rejects", str(rejects)])


def test_rejects_equal_to_the_data_file_is_refused_and_the_data_kept(world, tmp_path, capsys) -> None:
    data = tmp_path / "train.jsonl"
    shutil.copy(world["data"], data)
    before = data.read_bytes()
    assert check(world, data, data) == 2
    assert f"--rejects {data} is {data}, an input of this command" in capsys.readouterr().err.replace("\n", "")
    assert data.read_bytes() == before


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "symlink", "user file"])
def test_rejects_never_deletes_a_path_it_did_not_create(world, tmp_path, capsys, kind) -> None:
    target = tmp_path / "rejects"
    if kind == "directory":
        target.mkdir()
        (target / "inside.txt").write_text("mine", encoding="utf-8")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target = Path("/dev/null")
    elif kind == "symlink":
        (tmp_path / "victim.txt").write_text("mine", encoding="utf-8")
        target.symlink_to(tmp_path / "victim.txt")
    else:
        target.write_text('{"my": "own data"}\n', encoding="utf-8")
    before = snapshot(tmp_path)
    mode = target.lstat().st_mode
    assert check(world, world["data"], target) == 2
    err = capsys.readouterr().err
    assert f"--rejects {target}" in err.replace("\n", "") and "Traceback" not in err
    assert target.lstat().st_mode == mode and snapshot(tmp_path) == before


def test_rejects_replaces_its_own_earlier_log_and_clears_a_killed_runs_scratch(world, tmp_path, capsys) -> None:
    rejects = tmp_path / "data.rejects.jsonl"
    stale = tmp_path / f".data.rejects.jsonl.tmp-{dead_pid()}"
    stale.write_text('{"where": "half', encoding="utf-8")
    live = tmp_path / f".data.rejects.jsonl.tmp-{os.getppid()}"  # another process's, still running
    live.write_text("in use", encoding="utf-8")
    for _ in range(2):
        assert check(world, world["data"], rejects) == 0
        lines = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
        assert [r["reason"] for r in lines] == ["invalid JSON"] and lines[0]["row"] == BAD_ROW
    assert not stale.exists() and live.read_text() == "in use"
    capsys.readouterr()
    with RejectLog(rejects):  # no rejects this time: the earlier log (ours) would mislead, so it goes
        pass
    assert not rejects.exists()


# --- merge ---------------------------------------------------------------------------------------------


def test_merge_output_is_never_the_run_dir_nor_an_input(world, tmp_path, capsys, monkeypatch) -> None:
    run = tmp_path / "runs" / "run"
    shutil.copytree(world["run"], run)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path / "runs")
    cases = {str(run): "is or holds the source", str(run.parent): "is the working directory",
             ".": "is the working directory", str(tmp_path): "is the working directory or one of its parents",
             str(run / "adapter" / "merged"): "lies inside the source",
             str(run / "checkpoints"): "lies inside the source",
             str(world["model"]): "is or holds the base model",
             str(world["model"] / "sub"): "lies inside the base model"}
    for output, message in cases.items():
        assert main(["merge", str(run), "--output", output, "--overwrite"]) == 2, output
        err = capsys.readouterr().err.replace("\n", "")
        assert message in err and "Traceback" not in err, (output, err)
    assert snapshot(tmp_path) == before


def test_merge_clears_a_killed_merges_scratch_and_compares_with_the_adapter_model(world, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    stale = tmp_path / f".merged.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    assert main(["merge", str(world["run"]), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "left by an interrupted merge" in captured.err and not stale.exists()
    diff = float(captured.out.split("max |Δlogit| ")[1].split(",")[0])
    assert 0 < diff < 1e-4  # a real comparison of two models (the output with itself gives exactly 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_non_finite_adapter_is_never_merged(world, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    weights = run / "adapter" / "adapter_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "non-finite" in err and "mean KL nan" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_export_with_non_finite_weights_fails_and_leaves_nothing(world, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(world["model"]))
    tokenizer = AutoTokenizer.from_pretrained(str(world["model"]))
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 0] = float("inf")
    final = tmp_path / "model"
    with (pytest.raises(export.NonFiniteWeightsError, match="non-finite"),
          files.atomic_dir(final, what="the export") as scratch):
        export.save_model(model, tokenizer, scratch)
    assert list(tmp_path.iterdir()) == []


def test_fidelity_reports_nan_never_zero(world) -> None:
    from transformers import AutoModelForCausalLM

    good = AutoModelForCausalLM.from_pretrained(str(world["model"]))
    broken = AutoModelForCausalLM.from_pretrained(str(world["model"]))
    with torch.no_grad():
        broken.lm_head.weight[5, 0] = float("nan")
    result = export.fidelity(good, broken, [torch.tensor([1, 2, 3, 4])])
    assert result["max_abs_logit_diff"] != result["max_abs_logit_diff"]  # NaN
    assert export.fidelity(good, good, [torch.tensor([1, 2, 3, 4])])["max_abs_logit_diff"] == 0.0


def test_export_format_hf_is_the_merge_with_its_checks(world, tmp_path, capsys) -> None:
    """`sftlab export RUN --format hf` writes what `sftlab merge` writes (same weights), through the same
    output checks; gguf-only options are refused with the reason."""
    merged, exported = tmp_path / "merged", tmp_path / "exported"
    assert main(["merge", str(world["run"]), "--output", str(merged), "--dtype", "fp32"]) == 0
    assert main(["export", str(world["run"]), "--format", "hf", "--output", str(exported), "--dtype", "fp32"]) == 0
    assert "fidelity (adapter model vs merged dir" in capsys.readouterr().out
    a, b = load_file(merged / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", str(world["run"]), "--format", "hf", "--output", str(world["run"])]) == 2
    assert main(["export", str(world["run"]), "--format", "hf", "--quant", "q8_0",
                 "--output", str(tmp_path / "x")]) == 2
    assert "apply to --format gguf" in capsys.readouterr().err
    assert main(["export", str(world["run"]), "--format", "gguf", "--dtype", "bf16",
                 "--output", str(tmp_path / "y.gguf")]) == 2
    assert "--dtype applies to --format hf" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.gguf").exists()


def test_merge_into_a_new_entry_of_the_run_dir_is_recorded_as_the_runs(world, tmp_path, capsys) -> None:
    """runs/mine/merged (what the demo writes): allowed, named in the run's manifest first — so a user's own
    file or symlink under that name is refused, and the run's --overwrite later removes what it wrote."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    assert main(["merge", str(run), "--output", str(run / "merged")]) == 0
    assert (run / "merged" / "config.json").is_file() and "merged" in files.manifest(run)
    assert main(["merge", str(run), "--output", str(run / "merged"), "--overwrite"]) == 0  # its own: replaced
    (run / "mine").mkdir()
    (run / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    (run / "link").symlink_to(tmp_path)
    capsys.readouterr()
    for name in ("mine", "link"):
        assert main(["merge", str(run), "--output", str(run / name), "--overwrite"]) == 2
        assert "was not written by this sftlab run" in capsys.readouterr().err.replace("\n", "") or name == "link"
    assert (run / "mine" / "notes.txt").read_text(encoding="utf-8") == "keep" and (run / "link").is_symlink()
