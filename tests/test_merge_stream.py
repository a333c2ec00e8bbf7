"""The streaming merge (export/merge_stream.py): the merged dir it writes tensor by tensor equals the in-memory
merge's weights bit for bit (LoRA, DoRA, QLoRA onto dequantized and onto original, GPT-2's Conv1D, a sharded
base), in the base's dtype; its layer-sample fidelity check measures the written weights; and in a fresh
process it raises peak RSS by about one tensor plus the adapter, never by a model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import ROOT, tiny_chat_tokenizer
from sftlab import export
from sftlab.config import load_config
from sftlab.export import merge_stream
from sftlab.methods import METHODS, method_class
from sftlab.models.load import load_model
from sftlab.models.quant import QUANTIZER_CHUNK
from sftlab.models.stream import weight_files
from sftlab.runs import load_for_inference


def base_dir(path: Path, *, arch: str = "llama", hidden: int = 64, layers: int = 2, shard: str | None = "40KB",
             stored: torch.dtype = torch.bfloat16) -> Path:
    """A random model stored in `stored` (bf16, as released models are), sharded when `shard`, untied head."""
    tokenizer = tiny_chat_tokenizer()
    common = dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, **common) if arch == "llama" \
        else transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(stored)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trained_run(run: Path, base: Path, *overrides: str) -> Path:
    """A run dir (config.yaml + adapter/) whose adapter has random non-zero B (a merge that changes weights)."""
    settings = [f"model={base}", "model.dtype=float32", *overrides]
    cfg = load_config(overrides=settings)
    model = load_model(cfg.model, device=torch.device("cpu"), nf4=method_class(cfg.method).nf4(cfg))
    method = METHODS[cfg.method](cfg)
    method.apply(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in method.trainable_parameters(model).values():
            param.add_(torch.randn_like(param) * 0.05)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("".join(f"{key}: {value}\n" for key, value in (
        ("model", json.dumps({"path": str(base), "dtype": "float32"})), ("method", cfg.method),
        ("lora", json.dumps({"rank": cfg.lora.rank, "dora": cfg.lora.dora})))), encoding="utf-8")
    export.save_trained(model, method, cfg, tiny_chat_tokenizer(), run)
    return run


def in_memory_merge(run: Path, onto: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What `sftlab merge` wrote before streaming: the adapter model merged in memory, in `dtype`."""
    model, _, _, method = load_for_inference(str(run))
    merged = method.merge(model, onto=onto) if method.quantized_base else method.merge(model)
    return {name: value.to(dtype) for name, value in merged.state_dict().items()}


def written(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(out):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 - a safe_open handle is no mapping
    return tensors


@pytest.mark.parametrize("arch,overrides,onto", [
    ("llama", ("method=lora",), "dequantized"),
    ("llama", ("method=lora", "lora.dora=true"), "dequantized"),
    ("llama", ("method=qlora",), "dequantized"),
    ("llama", ("method=qlora",), "original"),
    ("gpt2", ("method=qlora",), "dequantized"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_merge_equals_the_in_memory_merge(tmp_path: Path, arch: str, overrides: tuple[str, ...], onto: str,
                                                   dtype: torch.dtype) -> None:
    base = base_dir(tmp_path / "base", arch=arch, shard="40KB" if arch == "llama" else None)
    run = trained_run(tmp_path / "run", base, "lora.rank=4", *overrides)
    job = merge_stream.merge_job(str(run), base=None)
    source, why = merge_stream.stream_refusal(job)
    assert why is None and source == base
    out = tmp_path / "merged"
    out.mkdir()
    result = merge_stream.write_merged(job, out, dtype=dtype, onto=onto, source=source, why=None)
    assert result.in_memory is None and result.files == [f.name for f in weight_files(base)]
    ours, theirs = written(out), in_memory_merge(run, onto, dtype)
    assert set(ours) == set(theirs) - {"lm_head.weight"} | ({"lm_head.weight"} if "lm_head.weight" in ours else set())
    for name, value in ours.items():
        assert value.dtype == dtype and torch.equal(value, theirs[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # no sftlab needed
    assert not any(type(m).__module__.startswith("sftlab.") for m in plain.modules())
    check = merge_stream.check_layers(job, out, result)
    assert check["layers"] == len(result.samples) > 0
    # the written weights reproduce the adapter layers to the output dtype's rounding (QLoRA onto original:
    # by the NF4 error, and the merge onto dequantized is the closer one)
    bound = 4 * merge_stream.rel_precision(dtype) if dtype == torch.bfloat16 else 1e-5
    if onto == "dequantized":
        assert check["max_rel_diff"] <= bound, check
    else:
        assert check["max_rel_diff"] > 10 * check["other_rel_diff"], check


def test_the_layer_check_sees_a_corrupted_file(tmp_path: Path) -> None:
    base = base_dir(tmp_path / "base")
    run = trained_run(tmp_path / "run", base, "method=lora", "lora.rank=4")
    job = merge_stream.merge_job(str(run), base=None)
    out = tmp_path / "merged"
    out.mkdir()
    result = merge_stream.write_merged(job, out, dtype=torch.float32, onto="dequantized", source=base, why=None)
    name = f"{result.samples[0].name}.weight"
    info = merge_stream.stream.checkpoint_tensors(weight_files(out))[name]
    with open(info.file, "r+b") as handle:  # the first row of that weight zeroed on disk
        handle.seek(info.start)
        handle.write(b"\0" * (4 * info.shape[1]))
    assert merge_stream.check_layers(job, out, result)["max_rel_diff"] > 1e-3


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers, safetensors, torchao.quantization  # code, imported before the baseline
    transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=8, intermediate_size=8, vocab_size=8,
                                                           num_hidden_layers=1, num_attention_heads=1))
    from pathlib import Path
    from sftlab.export import merge_stream
    from sftlab.train.memory import peak_rss
    run, out = sys.argv[1], Path(sys.argv[2])
    job = merge_stream.merge_job(run, base=None)
    source, why = merge_stream.stream_refusal(job)
    before = peak_rss()
    out.mkdir()
    merge_stream.write_merged(job, out, dtype=torch.bfloat16, onto="dequantized", source=source, why=why)
    print(json.dumps({"rise": peak_rss() - before}))
""")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_raises_peak_rss_by_about_one_tensor_plus_the_adapter(tmp_path: Path, method: str) -> None:
    # 21M parameters, bf16 on disk in shards of <= 8 MB (42 MB): fp32 in memory would be 84 MB.
    base = base_dir(tmp_path / "base", hidden=512, layers=8, shard="8MB")
    shards = weight_files(base)
    assert len(shards) > 3
    run = trained_run(tmp_path / "run", base, f"method={method}", "lora.rank=8")
    adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(run), str(tmp_path / "merged")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rise = json.loads(done.stdout.strip().splitlines()[-1])["rise"]
    largest_shard = max(f.stat().st_size for f in shards)
    model_fp32 = 2 * sum(f.stat().st_size for f in shards)
    print(f"{method}: merge raised peak RSS by {rise / 2**20:.1f} MiB; one shard {largest_shard / 2**20:.1f} MiB, "
          f"adapter {adapter / 2**20:.1f} MiB, the model in fp32 {model_fp32 / 2**20:.0f} MiB")
    # Merging one weight holds it as stored, in fp32, B·A, s·B·A and their sum (LoRALinear.merge), under QLoRA
    # its dequantised NF4 round trip too, and for a sampled layer the other merge's copy and temporaries: up to
    # ten fp32 copies of the largest layer; plus the allocator's and the skeleton's overheads.
    largest_fp32 = 4 * 512 * 1024
    slack = 10 * largest_fp32 + 16 * 2**20
    if method == "qlora":
        # The NF4 quantiser's working set (as in test_stream_load), plus what the allocator keeps of the many
        # short-lived NF4 round trips: measured 73-90 MiB in all here, across runs. Not yet explained in full
        # (the note of issue 18 says so); LoRA's merge below is the streaming bound proper.
        slack += 2 * QUANTIZER_CHUNK * 16 * 4 + 24 * 2**20
    assert rise <= largest_shard + adapter + slack
    if method == "lora":  # never a model's worth
        assert rise < model_fp32 / 3
