"""Stages orpo, simpo and kto under torchrun (2 processes, gloo, CPU): the weights and the logged metrics equal one
process's with the same global batch, as tests/train/test_dpo.py checks for dpo. KTO's full fine-tuning runs its
frozen reference copy sharded like the policy under FSDP; its LoRA runs take the reference with the adapters off."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_dpo
import test_kto
import torch
from test_distributed import dist_weights, launch
from test_dpo import load_file_of, metrics, run

from sftlab.config import load_config
from sftlab.train.checkpoint import latest_checkpoint

# Fixtures shared with their home modules: bound by assignment so that pytest finds them here by name.
model_dir, pairs, feedback_file = test_dpo.model_dir, test_dpo.pairs, test_kto.feedback_file

STAGE_METRICS = {"orpo": ("accuracy", "log_odds_ratio", "nll", "eval_accuracy"),
                 "simpo": ("accuracy", "margin", "eval_accuracy", "eval_margin"),
                 "kto": ("kl", "desirable", "eval_kl")}
"""Besides loss and eval_loss, what each stage's runs must log alike."""


def held_out(source: Path, out: Path, rows: int = 5) -> Path:
    """The first `rows` rows of `source`: five make three eval micro-batches of two, so the second rank's last one
    is a stand-in that must add nothing."""
    out.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]), encoding="utf-8")
    return out


@pytest.mark.parametrize("stage, method, mode", [("orpo", "lora", "ddp"), ("simpo", "full", "fsdp"),
                                                 ("kto", "lora", "ddp"), ("kto", "full", "fsdp")])
def test_two_processes_end_with_the_single_process_weights(model_dir, pairs, feedback_file, tmp_path, stage,
                                                           method, mode) -> None:
    # 2 processes x 2 items = one process x 2 items x accumulation 2.
    data = feedback_file if stage == "kto" else pairs["train"]
    shared = [f"stage={stage}", f"method={method}", "train.max_steps=3", "train.micro_batch_size=2",
              "train.lr=1e-3", f"data.eval={held_out(data, tmp_path / 'held_out.jsonl')}",
              *(["lora.rank=4"] if method == "lora" else []), *(["orpo.nll=sequence"] if stage == "orpo" else [])]
    common = [f"model={model_dir}", f"data.train={data}", "data.cache=false", *shared]
    single = run(load_config(overrides=[*common, f"output_dir={tmp_path / 'single'}", "train.grad_accum_steps=2"]))
    reference = {k: v.float() for k, v in load_file_of(latest_checkpoint(single.output_dir)).items()}
    dist = tmp_path / "dist"
    launch(dist, [*common, f"output_dir={dist}", f"train.distributed={mode}"])
    got = dist_weights(dist)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for key in ("loss", "eval_loss", *STAGE_METRICS[stage]):
        want = [r[key] for r in metrics(tmp_path / "single") if key in r]
        assert [r[key] for r in metrics(dist) if key in r] == pytest.approx(want, rel=1e-5, abs=1e-6) and want, key
