"""The streaming load (models/stream.py): the same model as from_pretrained (logits equal exactly, tied
heads, sharded or not), QLoRA's NF4 weights equal quantising after a full load bit for bit, a checkpoint it
cannot map falls back to from_pretrained with the reason, and loading raises the peak RSS of a fresh
process by at most the model's final size plus one shard."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import ROOT, tiny_model_dir
from sftlab.config import load_config
from sftlab.methods import QLoRA, method_class
from sftlab.models.load import _from_pretrained, load_model
from sftlab.models.quant import QUANTIZER_CHUNK, nf4_modules
from sftlab.models.stream import checkpoint_tensors, weight_files


def llama_dir(path: Path, *, hidden: int = 64, layers: int = 2, vocab: int = 320, tied: bool = True,
              shard: str | None = None) -> Path:
    """A random Llama saved in bf16 (as released models are), its head tied or not, sharded when `shard`."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


def logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied,shard", [(True, None), (False, "60KB")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_model_equals_from_pretrained(tmp_path: Path, tied: bool, shard: str | None, dtype: str) -> None:
    path = llama_dir(tmp_path / "m", tied=tied, shard=shard)
    assert (len(weight_files(path)) > 1) == (shard is not None)
    notes: list[str] = []
    ours = load_model(load_config(overrides=[f"model={path}", f"model.dtype={dtype}"]).model,
                      device=torch.device("cpu"), notes=notes)
    theirs = _from_pretrained(transformers.AutoModelForCausalLM, str(path), {"dtype": getattr(torch, dtype)})
    assert notes == []  # streamed, not the fallback
    assert not ours.training and ours.get_input_embeddings().weight.dtype == getattr(torch, dtype)
    assert (ours.lm_head.weight is ours.get_input_embeddings().weight) == tied
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), theirs.buffers()))  # rotary inv_freq
    assert torch.equal(logits(ours, 320), logits(theirs, 320))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_tensors_cast_as_read_in_small_pieces_equal_whole_reads(tmp_path: Path, monkeypatch, method: str) -> None:
    """A bf16 checkpoint loaded in fp32 through a staging buffer of 1001 bytes (500 values a piece, the last
    piece of each tensor partial) gives the model from_pretrained gives, and QLoRA's NF4 codes of that model."""
    from sftlab.models import stream

    path = llama_dir(tmp_path / "m", tied=False)
    cfg = load_config(overrides=[f"model={path}", "model.dtype=float32", f"method={method}", "lora.rank=4"])
    spec = method_class(method).nf4(cfg) if method == "qlora" else None
    whole = load_model(cfg.model, device=torch.device("cpu"), nf4=spec)
    monkeypatch.setattr(stream, "STAGING_BYTES", 1001)
    pieces = load_model(cfg.model, device=torch.device("cpu"), nf4=spec)
    mine, other = pieces.state_dict(), whole.state_dict()
    assert mine.keys() == other.keys()
    for key in mine:
        a, b = mine[key], other[key]
        inner = a.__tensor_flatten__()[0] if type(a).__name__ == "NF4Tensor" else None
        assert (all(torch.equal(getattr(a, n), getattr(b, n)) for n in inner) if inner else torch.equal(a, b)), key
    reference = _from_pretrained(transformers.AutoModelForCausalLM, str(path), {"dtype": torch.float32})
    if method == "lora":
        assert all(torch.equal(mine[k], reference.state_dict()[k]) for k in mine)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qlora_weights_quantised_as_read_equal_quantise_after_load(tmp_path: Path, arch: str) -> None:
    path = tiny_model_dir(tmp_path / arch, arch=arch, hidden=64)
    cfg = load_config(overrides=[f"model={path}", "model.dtype=float32", "method=qlora", "lora.rank=4"])
    models = []
    for spec in (None, method_class(cfg.method).nf4(cfg)):  # today's order (load, then quantise) and the streamed one
        model = load_model(cfg.model, device=torch.device("cpu"), nf4=spec)
        torch.manual_seed(0)
        QLoRA(cfg).apply(model)
        models.append(model)
    after, streamed = (nf4_modules(m) for m in models)
    assert after.keys() == streamed.keys() and len(after) == 7 * 2 if arch == "llama" else len(after) == 4 * 2
    for name in after:
        a, b = after[name].weight, streamed[name].weight
        for inner in a.__tensor_flatten__()[0]:  # codes, scales, their scales, the level table
            assert torch.equal(getattr(a, inner), getattr(b, inner)), (name, inner)
    params = [dict(m.named_parameters()) for m in models]
    assert params[0].keys() == params[1].keys()
    assert all(params[0][k].requires_grad == params[1][k].requires_grad for k in params[0])
    assert torch.equal(logits(models[0], 300), logits(models[1], 300))


def test_a_checkpoint_it_cannot_map_falls_back_to_from_pretrained_and_says_why(tmp_path: Path) -> None:
    path = llama_dir(tmp_path / "m", tied=False)
    weights = load_file(str(path / "model.safetensors"))  # saved from the bare LlamaModel: no `model.` prefix
    save_file({k.removeprefix("model."): v for k, v in weights.items() if k != "lm_head.weight"} |
              {"lm_head.weight": weights["lm_head.weight"]}, str(path / "model.safetensors"))
    assert "layers.0.mlp.up_proj.weight" in checkpoint_tensors(weight_files(path))
    notes: list[str] = []
    cfg = load_config(overrides=[f"model={path}", "model.dtype=float32"])
    model = load_model(cfg.model, device=torch.device("cpu"), notes=notes)
    assert len(notes) == 1 and "not streamed" in notes[0] and "model.embed_tokens.weight" in notes[0], notes
    theirs = _from_pretrained(transformers.AutoModelForCausalLM, str(path), {"dtype": torch.float32})
    assert torch.equal(logits(model, 320), logits(theirs, 320))


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers, safetensors, torchao.quantization  # code, imported before the baseline
    transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=8, intermediate_size=8, vocab_size=8,
                                                           num_hidden_layers=1, num_attention_heads=1))
    from sftlab.config import load_config
    from sftlab.methods import method_class
    from sftlab.models.load import load_model
    from sftlab.train.memory import peak_rss, current_rss
    path, method = sys.argv[1], sys.argv[2]
    cfg = load_config(overrides=[f"model={path}", "model.dtype=float32", f"method={method}"])
    before = peak_rss()
    model = load_model(cfg.model, device=torch.device("cpu"), nf4=method_class(cfg.method).nf4(cfg))
    after = peak_rss()
    seen, final = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        for x in inner:
            s = x.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr()); final += s.nbytes()
    print(json.dumps({"rise": after - before, "final": final}))
""")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_loading_raises_peak_rss_by_at_most_the_final_size_plus_one_shard(tmp_path: Path, method: str) -> None:
    # 36M parameters, bf16 on disk in shards of ≤ 20 MB; fp32 in memory (144 MB), or NF4 decoder layers.
    path = llama_dir(tmp_path / "m", hidden=1024, layers=3, vocab=8192, tied=False, shard="20MB")
    shards = weight_files(path)
    assert len(shards) > 3
    largest = max(f.stat().st_size for f in shards)
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), method], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    slack = 16 * 2**20  # allocator and first-use overheads
    if method == "qlora":  # the NF4 quantiser's working set: two (chunk, 16 levels) fp32 temporaries, and
        slack += 2 * QUANTIZER_CHUNK * 16 * 4 + 3 * 4 * 2048 * 1024  # the largest layer in fp32 3 times
    print(f"{method}: peak RSS rose {measured['rise'] / 2**20:.1f} MiB; final {measured['final'] / 2**20:.1f} MiB "
          f"+ one shard {largest / 2**20:.1f} MiB")
    assert measured["rise"] <= measured["final"] + largest + slack
    if method == "qlora":  # the NF4 decoder is well under the dense model: the fp32 base never existed
        assert measured["final"] < 0.5 * 4 * sum(p.numel() for p in load_file(str(shards[0])).values()) * len(shards)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_merge_writes_the_base_models_dtype_and_keeps_its_logits(tmp_path: Path, capsys, stored: torch.dtype) -> None:
    from safetensors import safe_open

    from sftlab.cli import main

    model_dir = tiny_model_dir(tmp_path / "base", hidden=64, init_range=0.2)
    weights = load_file(str(model_dir / "model.safetensors"))  # stored as a bf16 release stores it
    save_file({k: v.to(stored) for k, v in weights.items()}, str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi."},
                                             {"role": "assistant", "content": "Hi there!"}]}) + "\n", encoding="utf-8")
    (tmp_path / "run.yaml").write_text("method: lora\n", encoding="utf-8")
    assert main(["train", str(tmp_path / "run.yaml"), f"model={model_dir}", f"data.train={data}", "data.cache=false",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.lr=1e-2"]) == 0
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as merged:
        dtypes = {merged.get_tensor(name).dtype for name in merged.keys()}  # noqa: SIM118 - a safe_open handle is no mapping
    assert dtypes == {stored}
    diff, kl = (float(x) for x in re.search(r"max \|Δlogit\| ([\d.e+-]+), mean KL ([\d.e+-]+)", printed).groups())
    # The adapter model computes in fp32 over the stored weights; the merged dir holds W0 + s·B·A rounded to
    # the stored dtype: bf16 rounding (2^-8 relative) moves the logits a little (mean KL ~1e-4 here); fp32
    # keeps them to fp32 rounding, as before.
    if stored == torch.bfloat16:
        assert kl <= 1e-3, printed
    else:
        assert diff <= 1e-4 and kl <= 1e-9, printed
