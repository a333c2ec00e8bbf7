"""torchrun with 2 processes (gloo, CPU, tiny models): DDP and FSDP2 train what one process trains.

Each distributed run is a real `torchrun --standalone --nproc-per-node 2` of tests/train/dist_driver.py,
which calls sftlab's own prepare() and train(); the reference is the same config in this process with the
same global batch (micro-batch × accumulation × processes) and seed. Runs that tests only read are trained
one after another in one launch (module fixtures), as each launch pays seconds of process start and imports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import only_for, tiny_model_dir, write_qa_chats
from sftlab.config import load_config
from sftlab.runs import prepare, train

DRIVER = Path(__file__).resolve().parent / "dist_driver.py"
QUIET = Console(quiet=True)
QA = [(f"What is item {i} called?", f"Item {i} is called {'abcdefghijk'[i] * (1 + i % 3)}.") for i in range(11)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_qa_chats(tmp_path_factory.mktemp("data") / "qa.jsonl", QA)


def common(model_dir: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    return [f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "data.cache=false",
            "train.lr=1e-3", "train.warmup_steps=1", *overrides]


def launch(out: Path, overrides: list[str], *, kill_at: int | None = None, expect_ok: bool = True) -> Path:
    """torchrun 2 processes of the driver; returns the run dir."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(DRIVER),
           str(out / "driver" / "out.json"), *(["--kill-at", str(kill_at)] if kill_at else []), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, check=False)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    else:
        assert done.returncode != 0
    return out


def launch_many(runs: dict[object, tuple[Path, list[str]]]) -> dict[object, Path]:
    """One torchrun launch of 2 processes that trains each run in turn ({key: (run dir, overrides)})."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(DRIVER)]
    for index, (out, overrides) in enumerate(runs.values()):
        cmd += [*(["--next"] if index else []), str(out / "driver" / "out.json"), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {key: out for key, (out, _) in runs.items()}


def single_weights(model_dir: Path, data: Path, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    setup = prepare(load_config(overrides=common(model_dir, data, out, *overrides)), console=QUIET)
    train(setup, console=QUIET)
    return {k: v.detach().float() for k, v in setup.method.state_dict(setup.model).items()}


def dist_weights(run: Path) -> dict[str, torch.Tensor]:
    return {k[2:]: v for k, v in load_file(run / "driver" / "result.safetensors").items() if k.startswith("w.")}


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def eval_losses(run: Path) -> list[float]:
    return [json.loads(x)["eval_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]


CASES = [("full", "ddp", "false"), ("lora", "ddp", "false"), ("full", "fsdp", "false"), ("lora", "fsdp", "false"),
         ("lora", "fsdp", "true"), ("qlora", "ddp", "false"), ("adapter", "fsdp", "false"), ("prefix", "fsdp", "false"),
         ("ptuning", "ddp", "false")]


def case_settings(method: str, packing: str) -> tuple[str, ...]:
    return only_for(method, f"method={method}", "train.max_steps=3", "train.micro_batch_size=2",
                    f"data.packing={packing}", "data.max_seq_len=120", "lora.rank=4", "prefix.num_virtual_tokens=4",
                    "ptuning.num_virtual_tokens=4", "data.eval_fraction=0.25")


@pytest.fixture(scope="module")
def case_runs(model_dir, data, tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    """Every CASES run, 2 processes, in one launch; the tests only read them."""
    root = tmp_path_factory.mktemp("cases")
    runs = {}
    for index, (method, mode, packing) in enumerate(CASES):
        out = root / f"dist-{index}"
        runs[(method, mode, packing)] = (out, common(model_dir, data, out, *case_settings(method, packing),
                                                     f"train.distributed={mode}"))
    return launch_many(runs)


@pytest.mark.parametrize("method, mode, packing", CASES)
def test_two_processes_end_with_the_single_process_weights(model_dir, data, case_runs, tmp_path_factory, method,
                                                           mode, packing) -> None:
    # 2 processes x micro-batch 2 x accumulation 1 = one process x micro-batch 2 x accumulation 2.
    shared = case_settings(method, packing)
    root = tmp_path_factory.mktemp("equal")
    reference = single_weights(model_dir, data, root / "single", *shared, "train.grad_accum_steps=2")
    run = case_runs[(method, mode, packing)]
    assert json.loads((run / "driver" / "out.json").read_text()) == {"mode": mode, "world": 2}
    got = dist_weights(run)
    assert got.keys() == reference.keys()
    base = load_file(next((model_dir).glob("*.safetensors")))
    moved = 0
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
        moved += int(name not in base or not torch.equal(base[name].float(), value))
    assert moved > 0
    assert losses(run) == pytest.approx(losses(root / "single"), rel=1e-5)
    # The held-out 3 examples, split between the ranks, give the single process's eval loss.
    assert eval_losses(run) == pytest.approx(eval_losses(root / "single"), rel=1e-5) and eval_losses(run)


@pytest.fixture(scope="module")
def epoch_runs(model_dir, data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("epoch")
    return launch_many({packing: (root / packing, common(model_dir, data, root / packing, "method=lora",
                                                         "train.epochs=1", "train.micro_batch_size=4",
                                                         f"data.packing={packing}", "data.max_seq_len=60",
                                                         "train.distributed=ddp"))
                        for packing in ("false", "true")})


@pytest.mark.parametrize("packing", ["false", "true"])
def test_an_epoch_is_split_between_the_ranks_without_repeats_or_gaps(data, epoch_runs, packing) -> None:
    # 11 examples in micro-batches of 4 (or packed rows): train.epochs=1 trains exactly that epoch, each row once.
    # With an odd number of micro-batches the last round gives rank 1 a batch that adds nothing (not one of the
    # next epoch), so rank 0 has one more micro-batch of rows than rank 1.
    out = epoch_runs[packing]
    seen = [json.loads((out / "driver" / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(seen[0]) - len(seen[1]) in (0, 1) and all(seen[0] + seen[1])  # none empty among the real ones
    flat = [where for rows in seen[0] + seen[1] for where in rows]
    assert sorted(flat) == sorted(f"{data}:{i}" for i in range(1, 12))  # the epoch: each row once, no more


RESUME = ("method=lora", "lora.dropout=0.1", "train.max_steps=6", "train.micro_batch_size=2", "lora.rank=4")
"""The runs that are interrupted and resumed (dropout: the resumed run must also restore the random state)."""


@pytest.fixture(scope="module")
def whole_runs(model_dir, data, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted RESUME runs (checkpoint every 2 steps, which changes nothing trained), per mode."""
    root = tmp_path_factory.mktemp("whole")
    return launch_many({mode: (root / mode, common(model_dir, data, root / mode, *RESUME, "train.save_every_steps=2",
                                                   f"train.distributed={mode}")) for mode in ("fsdp", "ddp")})


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_a_two_process_checkpoint_resumes_to_the_uninterrupted_weights(model_dir, data, whole_runs, tmp_path,
                                                                       mode) -> None:
    shared = (*RESUME, "train.save_every_steps=2", f"train.distributed={mode}")
    whole = whole_runs[mode]
    killed = tmp_path / "killed"
    launch(killed, common(model_dir, data, killed, *shared), kill_at=3, expect_ok=False)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-2"]
    if mode == "fsdp":
        assert (killed / "checkpoints" / "step-2" / "sharded").is_dir()
    launch(killed, common(model_dir, data, killed, *shared))
    a, b = dist_weights(whole), dist_weights(killed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(killed)[-3:] == losses(whole)[-3:]


def test_sigterm_to_every_process_of_a_launch_saves_one_checkpoint_and_resumes(model_dir, data, whole_runs,
                                                                             tmp_path) -> None:
    """As a scheduler stops a job: SIGTERM to torchrun and its workers at once (torchrun may forward it again).
    Every rank finishes the step, they write one (FSDP-sharded) checkpoint together and stop; the resumed
    launch ends with the uninterrupted launch's weights."""
    shared = (*RESUME, "train.distributed=fsdp")  # no checkpoint period: only the signal saves
    whole = whole_runs["fsdp"]
    out = tmp_path / "signalled"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(DRIVER),
           str(out / "driver" / "out.json"), "--step-sleep", "1", *common(model_dir, data, out, *shared)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    deadline = time.time() + 120
    while (not (out / "metrics.jsonl").exists() or len(losses(out)) < 2) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode != 0
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and (out / "checkpoints" / saved[0] / "sharded").is_dir(), saved
    step = int(saved[0].removeprefix("step-"))
    assert 2 <= step < 6
    assert f"stopped by SIGTERM after step {step} of 6" in stdout + stderr
    assert not (out / ".sftlab.lock").exists()
    launch(out, common(model_dir, data, out, *shared))
    a, b = dist_weights(whole), dist_weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_export_of_an_fsdp_run_loads_in_one_process_with_the_same_logits(case_runs, method) -> None:
    from sftlab.runs import load_for_inference

    run = case_runs[(method, "fsdp", "false")]
    distributed_logits = load_file(run / "driver" / "result.safetensors")["logits"]
    model, *_ = load_for_inference(str(run))
    ids = torch.arange(3, 40).reshape(1, -1) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    torch.testing.assert_close(logits, distributed_logits, rtol=1e-5, atol=1e-5)


def test_qlora_keeps_its_nf4_weights_sharded_under_fsdp(tmp_path, data) -> None:
    # NF4 weights shard when their quantized parts divide by the number of processes: hidden 256 here.
    model_dir = tiny_model_dir(tmp_path / "model256", hidden=256, init_range=0.2)
    shared = ("method=qlora", "train.max_steps=3", "train.micro_batch_size=2", "lora.rank=4")
    reference = single_weights(model_dir, data, tmp_path / "single", *shared, "train.grad_accum_steps=2")
    run = launch(tmp_path / "dist", common(model_dir, data, tmp_path / "dist", *shared, "train.distributed=fsdp"))
    got = dist_weights(run)
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_a_model_too_small_to_shard_is_refused_at_start_with_the_reason(model_dir, data, tmp_path) -> None:
    out = tmp_path / "small"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(DRIVER),
           str(out / "driver" / "out.json"), *common(model_dir, data, out, "method=qlora", "train.distributed=fsdp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    assert done.returncode != 0
    assert "cannot be sharded over 2 processes: its NF4" in done.stdout + done.stderr
    assert "Set train.distributed=ddp" in done.stdout + done.stderr
    assert not (out / "checkpoints").exists()


def test_a_weighted_mixture_trains_the_same_under_two_processes(model_dir, tmp_path_factory) -> None:
    # Sources of 6, 6 and 8 examples weighted 0.5/0.3/0.2: 10, 6 and 4 examples in the epoch (a repeats).
    root = tmp_path_factory.mktemp("mixture")
    listed = []
    for name, size, weight in (("a", 6, 0.5), ("b", 6, 0.3), ("c", 8, 0.2)):
        rows = [{"messages": [{"role": "user", "content": f"{name} asks {i}?"},
                              {"role": "assistant", "content": f"{name} says {i}."}]} for i in range(size)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        listed.append(f"{{path: {root / f'{name}.jsonl'}, weight: {weight}}}")
    shared = ("method=lora", "lora.rank=4", "train.micro_batch_size=2", "train.epochs=1",
              f"data.train=[{', '.join(listed)}]")
    reference = single_weights(model_dir, root / "a.jsonl", root / "single", *shared, "train.grad_accum_steps=2")
    out = root / "dist"
    launch(out, common(model_dir, root / "a.jsonl", out, *shared, "train.distributed=ddp"))
    got = dist_weights(out)
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
    seen = [where for rank in (0, 1) for batch in json.loads((out / "driver" / f"seen-{rank}.json").read_text())
            for where in batch]
    assert Counter(Path(w.rsplit(":", 1)[0]).stem for w in seen) == {"a": 10, "b": 6, "c": 4}
    assert losses(out) == pytest.approx(losses(root / "single"), rel=1e-5)
