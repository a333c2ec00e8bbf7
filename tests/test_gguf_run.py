"""The demo path on a real model: a LoRA run on SmolLM2-135M-Instruct given as a .gguf file travels (PEFT loads
its adapter from a moved run dir; the run loads when the .gguf file is gone) and exports to GGUF files that
transformers' GGUF reader loads with the merged model's logits and <|im_end|> as the stop token.
Slow on a busy CPU (the 135M model is trained 2 steps, written and read back twice). The run's cache starts
with the file's conversion in it, as a second use of the file finds it (tests/test_gguf.py tests the conversion
itself; the session converts the file once, in conftest's smol_converted)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from sftlab.cli import main
from sftlab.models import gguf
from sftlab.runs import load_for_inference
from test_gguf_export import Q8_MEAN_KL, _mean_kl, _metadata, _rounded

ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Where is my order?", "Let me check your order status."), ("Hi!", "Hello! How can I help?"),
                     ("Cancel my plan.", "Your plan is cancelled."), ("Thanks!", "You're welcome.")]]


def _seed_cache(converted: Path, base: Path) -> None:
    """Put the session's conversion of the fixture where the run's cache keeps `base`'s (a copy of that file):
    hard links, as nothing writes into a converted dir."""
    target = gguf.converted_dir(base)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(converted, target, copy_function=os.link)


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smol_converted) -> dict:
    root = tmp_path_factory.mktemp("smol")
    project = root / "project"
    (project / "base").mkdir(parents=True)
    shutil.copy(smol_converted["source"], project / "base" / "smol.gguf")
    (project / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (project / "config.yaml").write_text(
        "model: base/smol.gguf\nmethod: lora\noutput_dir: runs/smol\ndata:\n  train: train.jsonl\n  cache: false\n"
        "  max_seq_len: 128\nlora:\n  rank: 4\ntrain:\n  max_steps: 2\n  lr: 1e-3\n  micro_batch_size: 4\n"
        "  save_every_steps: 2\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFTLAB_CACHE", str(root / "cache"))
        _seed_cache(smol_converted["converted"], project / "base" / "smol.gguf")
        patch.chdir(project)
        assert main(["train", "config.yaml"]) == 0
        yield {"root": root, "run": project / "runs" / "smol", "base": project / "base" / "smol.gguf"}


def _ids(tokenizer, template) -> torch.Tensor:
    text = template.render_text([{"role": "user", "content": "Where is my order?"}], add_generation_prompt=True)
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


def test_a_gguf_based_run_travels_peft_loads_it_and_the_gguf_file_may_go(smol, monkeypatch) -> None:
    from peft import AutoPeftModelForCausalLM

    saved = yaml.safe_load((smol["run"] / "config.yaml").read_text(encoding="utf-8"))
    converted = saved["model"]["gguf_dir"]
    assert saved["model"]["path"] == str(smol["base"].resolve())
    assert Path(converted).parent == (smol["root"] / "cache" / "models").resolve()
    adapter = json.loads((smol["run"] / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["base_model_name_or_path"] == converted
    moved = smol["root"] / "elsewhere" / "smol"
    shutil.copytree(smol["run"], moved)
    monkeypatch.chdir(smol["root"] / "elsewhere")
    model, tokenizer, template, _ = load_for_inference("smol")
    ids = _ids(tokenizer, template)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        peft_model = AutoPeftModelForCausalLM.from_pretrained("smol/adapter", dtype=torch.float32)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    hidden = smol["base"].with_name("away.bin")
    smol["base"].rename(hidden)  # the .gguf file is gone: the run loads from its converted dir
    try:
        with torch.no_grad():
            again = load_for_inference("smol")[0](input_ids=ids).logits
        torch.testing.assert_close(again, expected, rtol=0, atol=0)
    finally:
        hidden.rename(smol["base"])


def test_gguf_export_of_the_lora_run_reads_back_with_the_merged_logits_and_stops_at_im_end(smol, capsys) -> None:
    run = smol["run"]
    model, tokenizer, template, method = load_for_inference(str(run))
    ids = _ids(tokenizer, template)
    merged = method.merge(model)
    for quant in ("f16", "q8_0"):
        out = run / f"model-{quant}.gguf"
        assert main(["export", str(run), "--format", "gguf", "--quant", quant, "--output", str(out)]) == 0
        assert "generation stops at <|im_end|>" in capsys.readouterr().out
        read = transformers.AutoModelForCausalLM.from_pretrained(str(run), gguf_file=out.name, dtype=torch.float32)
        with torch.no_grad():
            got, exact = read(input_ids=ids).logits, merged(input_ids=ids).logits
            rounded = _rounded(merged, quant)(input_ids=ids).logits
        torch.testing.assert_close(got, rounded, rtol=0, atol=1e-3)  # what the file holds, read back exactly
        kl = _mean_kl(exact, got)
        assert kl < (1e-4 if quant == "f16" else Q8_MEAN_KL)
        meta = _metadata(out)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert meta["tokenizer.ggml.eos_token_id"] == im_end == meta["tokenizer.ggml.eot_token_id"]
        assert meta["tokenizer.ggml.pre"] == "smollm"  # the GGUF base's own, not the reader's simpler rebuild
        assert meta["tokenizer.chat_template"] == template.source
        modelfile = out.with_suffix(".Modelfile").read_text(encoding="utf-8")
        assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """You are a helpful AI assistant' in modelfile
