"""Faults really injected: SIGKILL at exact points (mid-checkpoint included), SIGINT/SIGTERM, a full disk,
NaN/inf steps, changed configs and foreign dirs. After each, the last complete checkpoint loads and the
resumed run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import only_for, tiny_model_dir, write_qa_chats
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.files import CONTROL_NAMES, WriteError
from sftlab.runs import prepare, train
from sftlab.train import rundir
from sftlab.train.checkpoint import latest_checkpoint
from sftlab.train.loop import TrainingError

DRIVER = Path(__file__).with_name("fault_driver.py")
QUIET = Console(quiet=True)
STEPS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_qa_chats(tmp_path_factory.mktemp("data") / "qa.jsonl",
                          [(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)])


def overrides(model_dir: Path, data: Path, out: Path, method: str = "lora", *extra: str) -> list[str]:
    return [f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "data.cache=false",
            *only_for(method, f"method={method}", f"train.max_steps={STEPS}", "train.save_every_steps=1",
                      "train.micro_batch_size=2", "train.lr=5e-3", "train.warmup_steps=2", "lora.rank=4",
                      "lora.dropout=0.1", "data.max_seq_len=64"), *extra]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text("train:\n  log_every_steps: 1\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(model_dir, data, config_file, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs, one per case, in this process."""
    root = tmp_path_factory.mktemp("whole")
    runs = {}
    for method, extra in CASES.values():
        out = root / f"{method}-{'-'.join(extra)}"
        if out.name not in runs:
            assert main(["train", str(config_file), *overrides(model_dir, data, out, method, *extra)]) == 0
            runs[out.name] = out
    return runs


def drive(config_file: Path, args: list[str], *driver_args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(DRIVER), *driver_args, "--", str(config_file), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def assert_same_weights(out: Path, whole: Path) -> None:
    got, want = load_file(latest_checkpoint(out) / "trainable.safetensors"), \
        load_file(latest_checkpoint(whole) / "trainable.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    export = "model" if (whole / "model").is_dir() else "adapter"
    for path in sorted((whole / export).glob("*.safetensors")):
        assert load_file(out / export / path.name).keys() == load_file(path).keys()
        for name, value in load_file(path).items():
            assert torch.equal(load_file(out / export / path.name)[name], value), name


def scratch(out: Path) -> list[str]:
    return sorted(p.name for d in (out, out / "checkpoints") if d.is_dir() for p in d.iterdir()
                  if p.name.startswith(".") and p.name not in CONTROL_NAMES)


CASES = {
    # kill points, in order, in one output dir; "timed" is a SIGKILL from this test at a moment it does not choose
    "lora": ("lora", ()),
    "full-packed": ("full", ("data.packing=true",)),
}
CHAINS = {
    "lora": [("checkpoint-weights:2", "step-1"), ("checkpoint-rename:4", "step-3"), ("prune:6", "step-6"),
             ("timed", None), ("export", "step-10")],
    "full-packed": [("step:3", "step-3"), ("checkpoint-weights:5", "step-4"), ("export", "step-10")],
}


@pytest.mark.parametrize("case", list(CHAINS))
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(model_dir, data, config_file, reference,
                                                                      tmp_path, case) -> None:
    method, extra = CASES[case]
    out = tmp_path / "run"
    args = overrides(model_dir, data, out, method, *extra)
    for point, latest in CHAINS[case]:
        if point == "timed":
            process = drive(config_file, args, "--step-sleep", "0.15")
            deadline = time.time() + 120
            while max(logged_steps(out), default=0) < 8 and time.time() < deadline and process.poll() is None:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        else:
            process = drive(config_file, args, "--kill", point)
        code, err = finish(process)
        assert code == -signal.SIGKILL, (point, err[-3000:])
        found = latest_checkpoint(out)
        assert found is not None and (latest is None or found.name == latest), (point, found)
        assert not (out / rundir.FINISHED).exists()
    assert scratch(out), "the kills left no scratch behind; the injected points did not hit mid-write"
    code, err = finish(drive(config_file, args))
    assert code == 0, err[-3000:]
    assert scratch(out) == []  # interrupted writes' leftovers were removed
    assert logged_steps(out) == list(range(1, STEPS + 1))  # each step logged once, resumed ones included
    assert (out / rundir.FINISHED).exists()
    assert_same_weights(out, reference[f"{method}-{'-'.join(extra)}"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_say_how_to_resume(model_dir, data, config_file, reference,
                                                                   tmp_path, signum) -> None:
    out = tmp_path / "run"
    args = overrides(model_dir, data, out, "lora", "train.save_every_steps=null")  # only the signal saves
    process = drive(config_file, args, "--step-sleep", "0.3")
    deadline = time.time() + 120
    while max(logged_steps(out), default=0) < 2 and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    code, err = finish(process)
    assert code == 128 + signum, err[-3000:]
    step = int(latest_checkpoint(out).name.removeprefix("step-"))
    assert 2 <= step < STEPS
    assert f"stopped by {signal.Signals(signum).name} after step {step} of {STEPS}" in err
    assert f"saved checkpoint {out / 'checkpoints' / f'step-{step}'}" in err.replace("\n", "")
    assert f"sftlab train {config_file}" in err.replace("\n", "")
    assert not (out / ".sftlab.lock").exists()
    code, err = finish(drive(config_file, args))
    assert code == 0, err[-3000:]
    assert_same_weights(out, reference["lora-"])


def test_a_second_signal_stops_at_once_but_a_duplicate_is_one_request(model_dir, data, config_file, tmp_path) -> None:
    import threading

    def signal_twice(out: Path, gap: float, *, after_ack: bool) -> tuple[int, str]:
        process = drive(config_file, overrides(model_dir, data, out), "--step-sleep", "4")
        lines: list[str] = []
        readers = [threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True),
                   threading.Thread(target=lambda: process.stdout.read(), daemon=True)]  # neither pipe fills up
        for reader in readers:
            reader.start()
        deadline = time.time() + 120
        while max(logged_steps(out), default=0) < 1 and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)  # lands in the 4 s after step 1
        # A signal's handler runs when the main thread is back in Python: on a loaded machine both of two signals
        # sent during one long operation are handled at once, and are one request. The user who insists has seen
        # the first acknowledged (the "stopping after this step" line), so the second is sent after that.
        while after_ack and not any("stopping after this step" in line for line in lines) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(gap)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
        for reader in readers:
            reader.join(timeout=30)
        return code, "".join(lines)

    # 1.5 s after the first was acknowledged: the user (or scheduler) insists — stop now.
    code, _ = signal_twice(tmp_path / "insist", 1.5, after_ack=True)
    assert code == -signal.SIGTERM
    assert latest_checkpoint(tmp_path / "insist") is not None  # the checkpoints written before it are there
    # 0.1 s apart: one request delivered twice (a launcher forwarding what a scheduler sent every process).
    code, err = signal_twice(tmp_path / "duplicate", 0.1, after_ack=False)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after step 2" in err


def run(model_dir: Path, data: Path, out: Path, *extra: str, method: str = "lora", **kwargs):
    cfg = load_config(overrides=overrides(model_dir, data, out, method, *extra))
    return train(prepare(cfg, console=QUIET), console=QUIET, **kwargs)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(model_dir, data, reference, tmp_path,
                                                                monkeypatch) -> None:
    from sftlab.train import checkpoint

    real = checkpoint.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *args, **kwargs):  # the third checkpoint: half its weights, then no space
        calls["n"] += 1
        if calls["n"] == 3:
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(WriteError, match=r"writing checkpoint step-3 .* failed: the disk is full or over quota "
                                         r"\(No space left on device\); free space there\. The partial write was "
                                         r"removed and the last complete checkpoint, step-2, is kept"):
        run(model_dir, data, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (out / ".sftlab.lock").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed: resume
    assert run(model_dir, data, out).steps == STEPS
    assert_same_weights(out, reference["lora-"])


def test_a_full_disk_during_the_export_leaves_no_partial_export(model_dir, data, reference, tmp_path,
                                                                monkeypatch) -> None:
    from sftlab import export

    real = export.save_trained

    def full_disk(*args, into=None, **kwargs):
        (into / "adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_trained", full_disk)
    out = tmp_path / "run"
    with pytest.raises(WriteError, match=r"writing the export to .*adapter failed: the disk is full .* The partial "
                                         r"write was removed\.$"):
        run(model_dir, data, out)
    assert not (out / "adapter").exists() and scratch(out) == [] and not (out / rundir.FINISHED).exists()
    assert latest_checkpoint(out).name == f"step-{STEPS}"
    monkeypatch.setattr(export, "save_trained", real)
    run(model_dir, data, out)  # resumes at the last step: only the export is left to do
    assert (out / rundir.FINISHED).exists()
    assert_same_weights(out, reference["lora-"])


def test_a_real_write_limit_fails_the_checkpoint_cleanly(model_dir, data, config_file, reference, tmp_path) -> None:
    """RLIMIT_FSIZE: the kernel refuses the checkpoint's weight file half way (EFBIG), no patching involved."""
    out = tmp_path / "run"
    args = overrides(model_dir, data, out, "full", "data.packing=true")
    code, err = finish(drive(config_file, args, "--fsize", str(64 * 1024)))
    assert code == 2, err[-3000:]
    assert "writing checkpoint step-1" in err and "disk is full or over quota (File too large)" in err
    assert "there is no earlier checkpoint" in err
    assert not (out / "checkpoints").exists() or list((out / "checkpoints").iterdir()) == []
    code, err = finish(drive(config_file, args))  # without the limit: starts over and finishes
    assert code == 0, err[-3000:]
    assert_same_weights(out, reference["full-data.packing=true"])


class InfGrad(torch.autograd.Function):
    """The identity forward; an infinite gradient backward (a finite loss, a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison(monkeypatch, steps: set[int], how: str) -> None:
    import sftlab.train.loss as loss_module

    real = loss_module.loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, method=None):  # one micro-batch a step here
        calls["n"] += 1
        value = real(model, batch, method)
        if calls["n"] in steps:
            return value * float("nan") if how == "nan" else InfGrad.apply(value)
        return value

    monkeypatch.setattr(loss_module, "loss_sum", poisoned)


@pytest.mark.parametrize("how, what", [("nan", "the loss became nan"), ("inf-grad", "the gradient norm became")])
def test_a_nonfinite_step_stops_the_run_naming_step_and_rows(model_dir, data, tmp_path, monkeypatch, how, what) -> None:
    poison(monkeypatch, {3}, how)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=rf"{what}.* at step 3 \(rows .*qa.jsonl:\d+.*\)\. Nothing of this step "
                                            rf"was applied; the last complete checkpoint is .*step-2"):
        run(model_dir, data, out)
    assert latest_checkpoint(out).name == "step-2"


def test_skip_mode_skips_nonfinite_steps_without_touching_the_weights(model_dir, data, tmp_path, monkeypatch) -> None:
    poison(monkeypatch, {3, 6}, "nan")
    out = tmp_path / "run"
    assert run(model_dir, data, out, "train.on_nonfinite=skip", f"train.keep_checkpoints={STEPS}").steps == STEPS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert [r["step"] for r in skipped] == [3, 6]
    assert skipped[0]["skipped"].startswith("the loss became nan at step 3")
    assert skipped[0]["rows"][0].startswith(str(data))
    weights = {n: load_file(out / "checkpoints" / f"step-{n}" / "trainable.safetensors") for n in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 changed nothing
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # step 4 trained
    state = json.loads((out / "checkpoints" / f"step-{STEPS}" / "state.json").read_text())["state"]
    assert state["skipped_steps"] == 2


def test_skip_mode_still_stops_when_every_step_is_nonfinite(model_dir, data, tmp_path, monkeypatch) -> None:
    poison(monkeypatch, set(range(1, 100)), "nan")
    with pytest.raises(TrainingError, match=r"at step 10 .*\(10 such steps in a row\)"):
        run(model_dir, data, tmp_path / "run", "train.on_nonfinite=skip", "train.max_steps=12")


class Stop(Exception):
    pass


def test_resuming_under_another_config_is_refused_and_no_resume_starts_over(model_dir, data, tmp_path) -> None:
    out = tmp_path / "run"

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        run(model_dir, data, out, on_step=stop_at_3)
    with pytest.raises(ConfigError, match=r"holds checkpoints \(up to step-3\) of a run with another config "
                                          r"\(lora\.rank: 4 -> 8; train\.lr: 0\.005 -> 0\.001\)"):
        run(model_dir, data, out, "lora.rank=8", "train.lr=1e-3")
    # Settings that do not change what is trained may change.
    result = run(model_dir, data, out, "train.save_every_steps=5", "train.log_every_steps=2")
    assert result.steps == STEPS
    # --no-resume on an unfinished run starts over (its checkpoints removed); on a finished one it is refused.
    with pytest.raises(rundir.RunFinishedError):
        run(model_dir, data, out, "train.resume=never")


def test_no_resume_removes_an_unfinished_runs_checkpoints(model_dir, data, tmp_path) -> None:
    out = tmp_path / "run"

    def stop_at_4(step: int) -> None:
        if step == 4:
            raise Stop()

    with pytest.raises(Stop):
        run(model_dir, data, out, "train.keep_checkpoints=10", on_step=stop_at_4)
    assert latest_checkpoint(out).name == "step-4"
    with pytest.raises(Stop):
        run(model_dir, data, out, "train.resume=never", "train.save_every_steps=2", "train.keep_checkpoints=10",
            on_step=lambda step: (_ for _ in ()).throw(Stop()) if step == 2 else None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # none of the old run's
    assert logged_steps(out) == [1, 2]


def test_an_output_dir_with_someone_elses_files_is_refused(model_dir, data, tmp_path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ConfigError, match=r"photos already holds files that are not an sftlab run \(holiday\.jpg\)"):
        run(model_dir, data, out)
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_a_killed_mixture_run_resumes_to_the_uninterrupted_weights(model_dir, config_file, tmp_path) -> None:
    # Three sources weighted 0.5/0.3/0.2: the run crosses an epoch boundary (9 micro-batches per epoch), so the
    # resumed run must redraw epoch 1's samples exactly as the uninterrupted run drew them.
    listed = []
    for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{name} asks {i}?"},
                                                         {"role": "assistant", "content": f"{name} says {i}."}]}) + "\n"
                                for i in range(6)), encoding="utf-8")
        listed.append(f"{{path: {path}, weight: {weight}}}")
    mix = f"data.train=[{', '.join(listed)}]"
    whole = tmp_path / "whole"
    assert main(["train", str(config_file), *overrides(model_dir, tmp_path / "a.jsonl", whole), mix]) == 0
    out = tmp_path / "run"
    args = [*overrides(model_dir, tmp_path / "a.jsonl", out), mix]
    code, err = finish(drive(config_file, args, "--kill", "step:4"))
    assert code == -signal.SIGKILL, err[-3000:]
    assert latest_checkpoint(out).name == "step-4"
    code, err = finish(drive(config_file, args))
    assert code == 0, err[-3000:]
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert_same_weights(out, whole)
