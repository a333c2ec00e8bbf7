"""`make demo` in a reduced form: the whole pipeline on a tiny model for a few steps, so CI catches breakage.

The numbers the real demo prints (SmolLM2-135M-Instruct, held-out accuracy before/after) need minutes of
training and are quoted in the README and examples/support_agent/SWEEP.md; here every step must run, leave
its files and print its timing, and the batched evaluation must answer as the base model with the adapters
off, as the fine-tuned model with them folded in, and stop at its length cap.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_dir

DEMO = Path(__file__).resolve().parent.parent / "examples" / "support_agent" / "demo.py"
sys.path.insert(0, str(DEMO.parent))

import demo  # noqa: E402


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[Path, Path, str]:
    """(tiny base model dir, run dir, stdout) of one reduced demo run."""
    tmp_path = tmp_path_factory.mktemp("demo")
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "support-agent"
    args = ["--model", str(model), "--out", str(out), "--steps", "2", "--train", "60", "--heldout", "9", "--show", "2"]
    done = subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return model, out, done.stdout


def test_the_demo_pipeline_runs_end_to_end_on_a_tiny_model(ran) -> None:
    _, out, stdout = ran
    for step in ("1. the model", "2. the data", "3. sftlab check", "4. sftlab train", "5. held-out", "6. sftlab merge",
                 "7. sftlab chat", "8. sftlab export", "timing"):
        assert f"=== {step}" in stdout
    assert "held-out accuracy (9 questions never seen in training" in stdout
    result = json.loads((out / "demo.json").read_text())
    assert result["heldout"] == 9 and 0 <= result["accuracy_before"] <= 1 and 0 <= result["accuracy_after"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and all({"prompt", "reference", "before", "after"} <= set(s) for s in samples)
    asked = [s for s in samples if s["before"] is not None]  # the base answers one question per fact
    assert len(asked) == result["base_asked"] and 0 < len(asked) < 9
    assert all(isinstance(s["before_ok"], bool) for s in asked)
    assert f"(asked {len(asked)}, one per fact; --base-all: all) -> fine-tuned" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert (out / "report.html").is_file()
    # no eval split (step 5 scores the held-out questions themselves): no eval pass in the training run
    assert not any("eval_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_the_demo_prints_and_keeps_its_timing_per_phase(ran) -> None:
    _, out, stdout = ran
    phases = json.loads((out / "demo.json").read_text())["phases"]
    assert list(phases) == ["set-up: the model (GGUF conversion, once) and the data", "sftlab check", "sftlab train",
                            "evaluation: load the run", "evaluation: base model answers",
                            "evaluation: fine-tuned answers", "sftlab merge", "sftlab chat", "sftlab export (GGUF)"]
    assert all(p["seconds"] >= 0 and p["cpu_seconds"] >= 0 for p in phases.values())
    assert phases["sftlab train"]["cpu_seconds"] > 0  # the child process's CPU time is counted
    assert phases["sftlab train"]["note"].startswith("2 steps, ") and "tokens/s" in phases["sftlab train"]["note"]
    table = stdout[stdout.index("=== timing"):]
    assert all(name in table for name in phases) and "total" in table and "CPU-s" in table
    assert json.loads((out / "demo.json").read_text())["final_loss"] > 0


def test_the_base_model_answers_one_single_question_per_fact() -> None:
    rows = [{"kind": "combo", "facts": ["a", "b"]}, {"kind": "single", "facts": ["b"]},
            {"kind": "single", "facts": ["a"]}, {"kind": "single", "facts": ["b"]},
            {"kind": "follow_up", "facts": ["c"]}]
    assert demo.base_sample(rows) == [1, 2]
    assert demo.base_sample([{"kind": "combo", "facts": ["a", "b"]}] * 12) == list(range(demo.BASE_SAMPLE))


def test_base_answers_are_the_base_models_and_answers_stop_at_the_cap(ran) -> None:
    """With the adapters switched off (one load of the run) the answers are exactly the base model's own
    (loaded on its own); with them on they differ; no answer runs past its batch's cap."""
    model, out, _ = ran
    rows = [json.loads(line) for line in (Path(f"{out}-data") / "heldout.jsonl").read_text().splitlines()]
    answerer = demo.Answerer(str(out))
    with torch.no_grad():  # adapters that surely change the answers: B of every LoRA layer made large
        for name, param in answerer.method.trainable_parameters(answerer.model).items():
            if name.endswith(".B"):
                param.copy_(torch.randn_like(param))
    base = demo.Answerer(str(model)).answers(rows, batch=4)
    assert answerer.answers(rows, base=True, batch=4) == base
    tuned = answerer.answers(rows, batch=4)
    assert tuned != base
    cap = max(len(answerer.tokenizer.encode(r["messages"][-1]["content"], add_special_tokens=False))
              for r in rows) + demo.ANSWER_MARGIN
    ids = answerer.token_answers(rows, batch=4)
    assert all(len(row) <= cap for row in ids) and max(map(len, ids)) == cap  # a random model never stops early
    # the demo folds the adapters into the weights for its fine-tuned answers: the same answers, and no base after
    answerer.fold()
    assert answerer.answers(rows, batch=4) == tuned
    with pytest.raises(ValueError, match="answer before fold"):
        answerer.answers(rows, base=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # an output head of its own, and one tied to the embedding
@pytest.mark.parametrize("freeze", [False, True])  # full.freeze_embeddings: the embedding is not in the checkpoint
def test_the_sweep_scores_full_fine_tuning_checkpoints(tmp_path, arch, freeze) -> None:
    """sweep.py's checkpoint loader: a full fine-tuning checkpoint (the weights the run trained, under the model's
    names: a tied head saved once, a frozen embedding not at all) goes into the loaded model as is, through the
    run's own method as `sftlab eval --checkpoint` loads it; one from another model is refused by name."""
    import sweep
    from safetensors.torch import save_file

    from sftlab.errors import SftlabError

    model_dir = tiny_model_dir(tmp_path / "model", arch=arch)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {model_dir}\nmethod: full\n"
                                     f"full: {{freeze_embeddings: {str(freeze).lower()}}}\n")
    answerer = demo.Answerer(str(model_dir))
    assert answerer.method is None
    embedding = "model.embed_tokens.weight" if arch == "llama" else "transformer.wte.weight"
    left_out = {"lm_head.weight"} if answerer.model.config.tie_word_embeddings else set()
    left_out |= {embedding} if freeze else set()
    state = {name: tensor + 1.0 for name, tensor in answerer.model.state_dict().items() if name not in left_out}
    save_file(state, run / "checkpoints" / "step-1" / "trainable.safetensors")
    sweep.load_checkpoint(answerer, run / "checkpoints" / "step-1")
    now = answerer.model.state_dict()
    assert all(torch.equal(now[name], tensor) for name, tensor in state.items())
    (run / "checkpoints" / "step-2").mkdir()
    save_file({"model.not_a_layer.weight": torch.zeros(2)}, run / "checkpoints" / "step-2" / "trainable.safetensors")
    with pytest.raises(SftlabError, match="do not fit the model: missing"):
        sweep.load_checkpoint(answerer, run / "checkpoints" / "step-2")
