"""Every method trains through `sftlab train` with the same config shape, prints its trainable share,
and writes its export; `generate` then answers from the run dir."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import only_for, tiny_model_dir
from sftlab.cli import main
from sftlab.methods import METHODS

ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Ping?", "Pong."), ("Hi!", "Hello there."), ("2+2?", "Four."), ("Sky?", "Blue.")]]


METHOD_OPTIONS = {name: only_for(name, "lora.rank=4", "adapter.bottleneck_dim=8", "prompt.num_virtual_tokens=4",
                                 "ptuning.num_virtual_tokens=4", "ptuning.encoder_hidden=16",
                                 "prefix.num_virtual_tokens=4", "prefix.encoder_hidden=16") for name in METHODS}
"""Each method's own options (a config may only set the options of the method it uses)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(f"model: {tiny_model_dir(root / 'base', init_range=0.2)}\n"
                      f"data:\n  train: {data}\n  cache: false\n"
                      "train:\n  max_steps: 4\n  micro_batch_size: 4\n  lr: 1.0e-2\n", encoding="utf-8")
    return {"root": root, "config": config}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_through_the_cli(base, method: str, capfd) -> None:
    out = base["root"] / method
    assert main(["train", str(base["config"]), f"method={method}", f"output_dir={out}", *METHOD_OPTIONS[method]]) == 0
    captured = capfd.readouterr()
    share = re.search(rf"method {method}: trainable (\d+\.\d\d)% — ", captured.err)
    assert share and 0 < float(share.group(1)) <= 100, captured.err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    export = out / ("model" if method == "full" else "adapter")
    assert (export / ("config.json" if method == "full" else "adapter_config.json")).is_file()
    assert main(["generate", str(out), "--prompt", "Ping?", "--temperature", "0", "--max-new-tokens", "4"]) == 0
