"""One run per output dir: a second run on a dir in use is refused, the first finishes unharmed."""

from __future__ import annotations

import json
import os
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
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
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
        stdout, stderr = first.communicate(timeout=300)
    assert second.returncode != 0
    assert f"is in use by another sftlab run (pid {first.pid}" in second.stderr
    assert first.returncode == 0, stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 151))  # every step of the first run, none of the second's
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / lock.LOCK_NAME).exists()  # released at the end
