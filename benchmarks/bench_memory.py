"""Big models on small machines: peak RSS of short CPU training runs against the memory plan and the ideal.

Not a unit test. For Llama shapes of 135M (SmolLM), 1B and 3B (Llama-3.2) and 7B (Llama-2), a random-weight
model is written once as bf16 safetensors shards under benchmarks/results/models/ (git-ignored), one shard
at a time — never the whole model in memory. Each (shape, method) then runs in a fresh process: `sftlab`'s
prepare + train, 2 steps, rows of 256 tokens, micro-batch 1, gradient checkpointing on, on the CPU (fp32
compute). Per run it reports the process's peak RSS (VmHWM), the memory plan's estimate (train/memory.py,
the `memory plan:` line) and the ideal (the stored base + trainable weights + gradients + AdamW state, the
plan's own terms without activations and runtime), and the ratio plan / measured.

    python benchmarks/bench_memory.py                  # 135M and 1B (lora, qlora; full for 135M and 1B)
    python benchmarks/bench_memory.py --shapes 135M 1B 3B 7B --methods qlora
A run the plan refuses (exit 2 before any weight is read) is reported as refused, with the plan's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = RESULTS / "models"
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied head
    "135M": (576, 1536, 30, 9, 3, 49152, True),
    "1B": (2048, 8192, 16, 32, 8, 128256, True),
    "3B": (3072, 8192, 28, 24, 8, 128256, True),
    "7B": (4096, 11008, 32, 32, 32, 32000, False),
}
SHARD_BYTES = 2 * 2**30
FULL_UP_TO = ("135M", "1B")
GIB = 2**30


def write_model(name: str) -> Path:
    """The random bf16 model of shape `name`, written shard by shard (cached: written once)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    path = MODELS / name
    if (path / "model.safetensors.index.json").is_file():
        return path
    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      tie_word_embeddings=tied, max_position_embeddings=4096, dtype="bfloat16",
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    scratch = path.with_name(name + ".partial")
    scratch.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(scratch)
    head_dim = hidden // heads

    def tensors():  # (name, shape) in model order
        yield "model.embed_tokens.weight", (vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "self_attn.q_proj.weight", (heads * head_dim, hidden)
            yield p + "self_attn.k_proj.weight", (kv * head_dim, hidden)
            yield p + "self_attn.v_proj.weight", (kv * head_dim, hidden)
            yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim)
            yield p + "mlp.gate_proj.weight", (inter, hidden)
            yield p + "mlp.up_proj.weight", (inter, hidden)
            yield p + "mlp.down_proj.weight", (hidden, inter)
            yield p + "input_layernorm.weight", (hidden,)
            yield p + "post_attention_layernorm.weight", (hidden,)
        yield "model.norm.weight", (hidden,)
        if not tied:
            yield "lm_head.weight", (vocab, hidden)

    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, str(scratch / files[-1]), metadata={"format": "pt"})
        weight_map.update({key: files[-1] for key in shard})
        shard.clear()

    size = 0
    for key, shape in tensors():
        value = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
            (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if size + value.numel() * 2 > SHARD_BYTES and shard:
            flush()
            size = 0
        shard[key] = value
        size += value.numel() * 2
    flush()
    total = sum((scratch / f).stat().st_size for f in files)
    (scratch / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    _tokenizer().save_pretrained(scratch)
    scratch.rename(path)
    return path


def _tokenizer():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_chat_tokenizer  # a small byte-level BPE with ChatML tokens, built locally

    return tiny_chat_tokenizer()


def _data() -> Path:
    """Rows that encode to more than 256 tokens (cut to 256: data.truncation=truncate)."""
    path = MODELS / "rows.jsonl"
    if not path.is_file():
        MODELS.mkdir(parents=True, exist_ok=True)
        text = "The capital of France is Paris. What is 2+2? It is 4. " * 40
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Tell me about France."},
                                                         {"role": "assistant", "content": text}]}) + "\n"
                                for _ in range(8)), encoding="utf-8")
    return path


RUN = r"""
import json, sys, time
from rich.console import Console
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.runs import prepare, train
from sftlab.train.memory import peak_rss
model, data, out, method = sys.argv[1:5]
cfg = load_config(overrides=[f"model={model}", f"data.train={data}", f"output_dir={out}", f"method={method}",
                             "data.cache=false", "data.max_seq_len=256", "data.truncation=truncate",
                             "data.template=chatml", "train.max_steps=2", "train.micro_batch_size=1",
                             "train.gradient_checkpointing=true", "train.resume=never", *sys.argv[5:]])
console = Console(record=True, width=400, stderr=True)
start = time.time()
try:
    setup = prepare(cfg, console=console, overwrite=True)
    loaded = peak_rss()
    train(setup, console=Console(quiet=True))
    status = "ok"
except SftlabError as exc:
    loaded, status = None, "refused: " + str(exc)
text = console.export_text()
print(json.dumps({"peak": peak_rss(), "after_load": loaded, "status": status, "seconds": time.time() - start,
                  "plan": [l for l in text.splitlines() if l.startswith("memory plan")]}))
"""


def run(name: str, method: str, extra: list[str]) -> dict:
    model = write_model(name)
    out = RESULTS / "memory_runs" / f"{name}-{method}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", RUN, str(model), str(_data()), str(out), method, *extra],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0 or not done.stdout.strip():
        return {"shape": name, "method": method, "status": f"failed: {done.stderr.strip()[-600:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    plan_line = (result["plan"][-1] if result["plan"]
                 else (result["status"] if "memory plan" in result["status"] else ""))
    terms = dict(re.findall(r"(base|trainable|gradients|optimizer|activations ~|runtime) ([\d.]+ [MG]iB)", plan_line))
    total = re.search(r"≈ ([\d.]+ [MG]iB)", plan_line)
    ideal = sum(_bytes(terms[k]) for k in ("base", "trainable", "gradients", "optimizer") if k in terms)
    return {"shape": name, "method": method, "status": result["status"][:400], "peak": result["peak"],
            "after_load": result["after_load"], "plan": _bytes(total.group(1)) if total else None, "ideal": ideal,
            "seconds": round(result["seconds"], 1), "plan_line": plan_line}


def _bytes(text: str) -> int:
    value, unit = text.split()
    return int(float(value) * (GIB if unit == "GiB" else 2**20))


def table(rows: list[dict]) -> str:
    lines = ["| shape | method | peak RSS | plan | plan / peak | ideal (base+trainable+grads+optimizer) | s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak, plan = r.get("peak"), r.get("plan")
        ratio = f"{plan / peak:.2f}" if peak and plan and r["status"] == "ok" else "–"
        lines.append(f"| {r['shape']} | {r['method']} | {_gib(peak if r['status'] == 'ok' else None)} | {_gib(plan)} | "
                     f"{ratio} | {_gib(r.get('ideal'))} | {r.get('seconds', '–')} | {r['status'][:60]} |")
    return "\n".join(lines)


def _gib(count: int | None) -> str:
    return "–" if not count else f"{count / GIB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["135M", "1B"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora", "full"])
    args, extra = parser.parse_known_args()
    rows = []
    for name in args.shapes:
        started = time.time()
        write_model(name)
        print(f"{name}: model ready ({time.time() - started:.0f} s)", file=sys.stderr)
        for method in args.methods:
            if method == "full" and name not in FULL_UP_TO:
                continue
            rows.append(run(name, method, extra))
            print(json.dumps(rows[-1]), file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
