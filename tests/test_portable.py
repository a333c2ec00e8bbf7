"""A run dir travels: its base is recorded so that generate, chat, merge and PEFT load it from any working
directory, and from a moved tree (models/portable.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_model_dir
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.models.portable import locate, portable
from sftlab.runs import load_for_inference

ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Ping?", "Pong."), ("Hi!", "Hello there."), ("2+2?", "Four."), ("Sky?", "Blue.")]]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def _logits(run: Path | str) -> torch.Tensor:
    model = load_for_inference(str(run))[0]
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """A project dir holding the base, the data and the run, trained with paths relative to it."""
    root = tmp_path_factory.mktemp("portable")
    project = root / "project"
    tiny_model_dir(project / "models" / "base", init_range=0.2)
    (project / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (project / "config.yaml").write_text(
        "model: models/base\nmethod: lora\noutput_dir: runs/mine\ndata:\n  train: train.jsonl\n  cache: false\n"
        "lora:\n  rank: 4\ntrain:\n  max_steps: 30\n  lr: 1e-2\n  micro_batch_size: 4\n  save_every_steps: 30\n",
        encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        assert main(["train", "config.yaml"]) == 0
        logits = _logits("runs/mine")
    return {"root": root, "project": project, "logits": logits}


def test_config_yaml_and_the_adapter_record_the_base_absolute(tree) -> None:
    run = tree["project"] / "runs" / "mine"
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["model"]["path"] == str((tree["project"] / "models" / "base").resolve())
    assert saved["output_dir"] == str(run.resolve()) and saved["model"]["gguf_dir"] is None
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["base_model_name_or_path"] == saved["model"]["path"]


def test_the_run_works_from_another_cwd_after_the_tree_moved(tree, monkeypatch, capsys) -> None:
    moved = tree["root"] / "elsewhere" / "project-copy"
    moved.parent.mkdir()
    shutil.copytree(tree["project"], moved)  # the whole tree, base and run together
    shutil.rmtree(tree["project"] / "models")  # the recorded absolute base is gone
    try:
        monkeypatch.chdir(tree["root"] / "elsewhere")
        run = Path("project-copy/runs/mine")
        torch.testing.assert_close(_logits(run), tree["logits"], rtol=0, atol=0)
        assert main(["generate", str(run), "--prompt", "Ping?", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.strip() == "Pong."
        answers = iter(["2+2?", "/exit"])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
        assert main(["chat", str(run), "--temperature", "0"]) == 0
        assert "Four." in capsys.readouterr().out
        assert main(["merge", str(run), "--output", "merged"]) == 0
        assert "fidelity" in capsys.readouterr().out
        assert main(["generate", "merged", "--prompt", "Ping?", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.strip() == "Pong."
    finally:
        shutil.copytree(moved / "models", tree["project"] / "models")


def test_peft_loads_the_moved_run_dir_adapter_from_another_cwd(tree, monkeypatch) -> None:
    from peft import AutoPeftModelForCausalLM

    run = tree["root"] / "runs-moved" / "mine"
    shutil.copytree(tree["project"] / "runs" / "mine", run)  # the run alone moves; the base stays
    monkeypatch.chdir(tree["root"])
    model = AutoPeftModelForCausalLM.from_pretrained(str(run / "adapter"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, tree["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(run), tree["logits"], rtol=0, atol=0)


def test_a_base_found_nowhere_names_the_places_tried_and_the_fix(tmp_path) -> None:
    cfg = portable(load_config(overrides=[f"model={tmp_path / 'gone'}", f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match=r"tried .*gone.*--base PATH"):
        locate(cfg, tmp_path / "run")
    hub = load_config(overrides=["model=Org/name", f"output_dir={tmp_path / 'run'}"])
    assert locate(portable(hub), tmp_path / "run").model.path == "Org/name"  # a hub id stays a hub id
