"""`sftlab eval`: the same numbers for the same weights whether they come as a run dir, its adapter dir, a merged
dir, a plain model dir or a checkpoint; task checks; eval.json only where it may go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_model_dir
from sftlab.cli import main
from sftlab.errors import DataError
from sftlab.eval import evaluate, passes, read_tasks

PROBE = [("What is the capital of France?", False), ("Say hello.", True), ("What is 2+2?", False),
         ("Imagine two magic dice.", True)]
KEYS = ("probe_nll", "probe_kl", "probe_distinct2", "probe_repetition", "probe_length")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model_dir(root / "model", init_range=0.2)
    data, probe, tasks = root / "train.jsonl", root / "probe.jsonl", root / "tasks.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                                                     {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n"
                            for i in range(16)), encoding="utf-8")
    probe.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "open": o}) + "\n"
                             for q, o in PROBE), encoding="utf-8")
    tasks.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "What is 3+3?"}], "check": c}) + "\n"
                             for c in ({"contains": "It"}, {"regex": r"\d"}, {"facts": ["is", ["6", "six"]]})),
                     encoding="utf-8")
    common = [f"data.train={data}", "data.cache=false", f"eval.probe={probe}", "eval.probe_max_new_tokens=8",
              "train.max_steps=6", "train.lr=1e-2"]
    config = root / "config.yaml"
    config.write_text("train:\n  seed: 3\n", encoding="utf-8")
    for method in ("lora", "full"):
        assert main(["train", str(config), f"model={model}", f"output_dir={root / method}", f"method={method}",
                     *common]) == 0
    assert main(["merge", str(root / "lora"), "--output", str(root / "merged")]) == 0
    return {"root": root, "probe": probe, "tasks": tasks, "lora": root / "lora", "full": root / "full",
            "merged": root / "merged"}


def numbers(found: dict) -> dict:
    return {key: found[key] for key in KEYS}


def test_a_run_dir_and_its_adapter_dir_give_the_same_numbers(trained) -> None:
    run = evaluate(str(trained["lora"]))
    adapter = evaluate(str(trained["lora"] / "adapter"))
    assert numbers(run) == numbers(adapter) and run["probe_kl"] > 0
    assert run["reference"].endswith("probe_reference.safetensors")
    # the run's last eval line measured the same weights against the same reference
    last = [json.loads(x) for x in (trained["lora"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert run["probe_nll"] == pytest.approx(last["probe_nll"], rel=1e-5)
    assert run["probe_kl"] == pytest.approx(last["probe_kl"], rel=1e-4, abs=1e-6)


def test_a_merged_dir_gives_the_adapters_numbers_against_the_runs_reference(trained) -> None:
    run = evaluate(str(trained["lora"]))
    merged = evaluate(str(trained["merged"]), reference=str(trained["lora"]))
    for key in ("probe_nll", "probe_kl"):
        assert merged[key] == pytest.approx(run[key], rel=1e-3, abs=1e-4), key


def test_a_plain_model_dir_and_a_checkpoint_give_the_runs_numbers(trained) -> None:
    run = evaluate(str(trained["full"]))
    plain = evaluate(str(trained["full"] / "model"), reference=str(trained["full"]))
    step = evaluate(str(trained["full"]), checkpoint="step-6")
    assert numbers(plain) == numbers(run) == numbers(step)


def test_a_base_model_is_its_own_reference(trained) -> None:
    found = evaluate(str(trained["root"] / "model"), probe=str(trained["probe"]))
    assert found["probe_kl"] == 0.0 and found["probe_nll"] == found["base"]["probe_nll"]
    assert "its own greedy answers" in found["reference"]


def test_the_base_dir_gives_the_runs_step_0_numbers(trained) -> None:
    """The base's weights are the LoRA run's at step 0: against the run's reference, the base dir measures the
    reference's own probe_nll and a probe_kl of 0 (fp32 tolerance: a different load of the same weights)."""
    base = evaluate(str(trained["root"] / "model"), reference=str(trained["lora"]))
    assert base["probe_nll"] == pytest.approx(base["base"]["probe_nll"], rel=1e-5)
    assert base["probe_kl"] == pytest.approx(0.0, abs=1e-6)
    run = evaluate(str(trained["lora"]))
    assert run["base"] == base["base"] and run["probe_kl"] > 1e-3  # the trained weights moved; the base did not


def test_tasks_are_answered_and_checked(trained) -> None:
    found = evaluate(str(trained["lora"]), tasks=str(trained["tasks"]))
    assert found["tasks"]["total"] == 3 and len(found["tasks"]["rows"]) == 3
    checks = ({"contains": "It"}, {"regex": r"\d"}, {"facts": ["is", ["6", "six"]]})
    for row, check in zip(found["tasks"]["rows"], checks):
        assert row["passed"] == passes(row["answer"], check)


def test_eval_json_goes_only_where_it_may(trained, tmp_path, capsys) -> None:
    assert main(["eval", str(trained["lora"])]) == 0
    assert json.loads((trained["lora"] / "eval.json").read_text())["probe_kl"] > 0
    assert main(["eval", str(trained["merged"]), "--probe", "none", "--tasks", str(trained["tasks"])]) == 0
    assert not (trained["merged"] / "eval.json").exists()
    assert "never written to" in capsys.readouterr().out
    target = tmp_path / "mine.json"
    target.write_text("keep me")
    assert main(["eval", str(trained["merged"]), "--probe", "none", "--tasks", str(trained["tasks"]),
                 "--output", str(target)]) == 2
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("check, found", [
    ({"contains": ["return", "45 DAYS"]}, True), ({"contains": "60 days"}, False), ({"regex": r"\b45\b"}, True),
    ({"exact": "  Returns within 45 days. "}, True), ({"exact": "returns within 45 days."}, False),
    ({"facts": ["45 days", ["refund", "returns"]]}, True), ({"facts": ["return"]}, False),
    ({"facts": ["4 days"]}, False)])
def test_checks(check, found) -> None:
    assert passes("Returns within 45 days.", check) is found


def test_a_bad_task_row_names_its_line(tmp_path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}], "check": {"contains": "x"}}\n'
                    '{"messages": [{"role": "user", "content": "hi"}], "check": {"regex": "("}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:2.*does not compile"):
        read_tasks(str(path))
