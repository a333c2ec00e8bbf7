"""One run per output dir: a second run on a dir in use is refused, the first finishes unharmed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_model_dir
from sftlab.train import lock


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sftlab.train import lock; "
                               f"lock.acquire({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.RunInUseError, match=f"in use by another sftlab run \\(pid {holder.pid}"):
            lock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire(tmp_path) == tmp_path / lock.LOCK_NAME  # the holder is gone: a stale lock
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock.acquire(tmp_path)  # the same process may take it again
    lock.release(tmp_path)
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_a_second_run_on_a_dir_in_use_is_refused_and_the_first_is_unharmed(tmp_path) -> None:
    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sftlab", "train", "-", f"model={model}", f"data.train={data}", f"output_dir={out}",
            "data.cache=false", "train.micro_batch_size=2"]
    config = tmp_path / "cfg.yaml"
    config.write_text("method: lora\n", encoding="utf-8")
    args[4] = str(config)
    first = subprocess.Popen([*args, "train.max_steps=150"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:  # the first run is training
            time.sleep(0.2)
        second = subprocess.run([*args, "train.max_steps=2"], capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second started; make it longer"
    finally:
        _, stderr = first.communicate(timeout=300)
    assert second.returncode != 0
    assert f"is in use by another sftlab run (pid {first.pid}" in second.stderr
    assert first.returncode == 0, stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 151))  # every step of the first run, none of the second's
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / lock.LOCK_NAME).exists()  # released at the end


def _racer(dirs: list[str], barrier, results) -> None:
    """One of two processes: for each fresh dir, wait for the other at the barrier, then try to take it."""
    won = []
    for path in dirs:
        barrier.wait()
        try:
            lock.acquire(Path(path))
            won.append(True)
        except lock.RunInUseError:
            won.append(False)
    results.send(won)


def test_two_processes_racing_for_fresh_dirs_never_both_win(tmp_path) -> None:
    import multiprocessing

    trials = 300
    dirs = [str(tmp_path / f"run{i}") for i in range(trials)]
    context = multiprocessing.get_context("fork")  # no re-import of torch per process: the race stays tight
    barrier = context.Barrier(2)
    pipes = [context.Pipe(duplex=False) for _ in range(2)]
    racers = [context.Process(target=_racer, args=(dirs, barrier, sender)) for _, sender in pipes]
    for racer in racers:
        racer.start()
    try:
        first, second = (receiver.recv() for receiver, _ in pipes)
    finally:
        for racer in racers:
            racer.join(timeout=60)
    winners = [a + b for a, b in zip(first, second)]
    assert winners == [1] * trials, f"{winners.count(2)} trials with two winners, {winners.count(0)} with none"
    pids = [racer.pid for racer in racers]
    for path, a in zip(dirs, first):  # the lock names the winner, written whole
        assert json.loads((Path(path) / lock.LOCK_NAME).read_text())["pid"] == pids[0 if a else 1]
    assert not [p for path in dirs for p in Path(path).iterdir() if p.name != lock.LOCK_NAME]  # no temp files left


def test_a_live_pid_with_another_start_time_is_a_reused_pid_and_its_lock_is_taken_over(tmp_path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": other.pid, "host": socket.gethostname(), "since": "2020-01-01 00:00:00"}
        path = tmp_path / lock.LOCK_NAME
        path.write_text(json.dumps({**record, "start": lock.process_start(other.pid)}))
        with pytest.raises(lock.RunInUseError, match=f"pid {other.pid}"):  # that very process: in use
            lock.acquire(tmp_path)
        path.write_text(json.dumps({**record, "start": "an earlier process's start"}))
        assert lock.acquire(tmp_path) == path  # the pid now belongs to another process: stale
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        other.kill()
        other.wait()
    lock.release(tmp_path)
    assert not path.exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path) -> None:
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": "x"}))
    with pytest.raises(lock.RunInUseError, match="locked by a run on host elsewhere"):
        lock.acquire(tmp_path)


GOOD_ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize("case", ["bad-row", "targets-match-nothing"])
def test_a_start_that_fails_after_claiming_the_dir_leaves_no_lock(case, tmp_path, capsys) -> None:
    from sftlab.cli import main

    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    rows = [GOOD_ROW] * 4 + ([{"messages": "not a list"}] if case == "bad-row" else [])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text("method: lora\n", encoding="utf-8")
    out = tmp_path / "run"
    extra = ["lora.targets=[no_such_layer]"] if case == "targets-match-nothing" else []  # fails at the layer check
    code = main(["train", str(config), f"model={model}", f"data.train={data}", f"output_dir={out}",
                 "data.cache=false", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("train.jsonl:5" if case == "bad-row" else "no_such_layer") in err.replace("\n", "")
    assert out.is_dir() and not (out / lock.LOCK_NAME).exists()
