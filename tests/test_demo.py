"""`make demo` in a reduced form: the whole pipeline on a tiny model for a few steps, so CI catches breakage.

The numbers the real demo prints (SmolLM2-135M-Instruct, held-out accuracy before/after) need minutes of
training and are quoted in the README; here every step must run and leave its files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model_dir

DEMO = Path(__file__).resolve().parent.parent / "examples" / "support_agent" / "demo.py"


def test_the_demo_pipeline_runs_end_to_end_on_a_tiny_model(tmp_path) -> None:
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "support-agent"
    done = subprocess.run([sys.executable, str(DEMO), "--model", str(model), "--out", str(out), "--steps", "2",
                           "--heldout", "9", "--show", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("1. the model", "2. the data", "3. sftlab check", "4. sftlab train", "5. held-out", "6. sftlab merge",
                 "7. sftlab chat"):
        assert f"=== {step}" in done.stdout
    assert "held-out accuracy (9 questions never seen in training" in done.stdout
    result = json.loads((out / "demo.json").read_text())
    assert result["heldout"] == 9 and 0 <= result["accuracy_before"] <= 1 and 0 <= result["accuracy_after"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and {"prompt", "reference", "before", "after"} <= set(samples[0])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert (out / "report.html").is_file()
