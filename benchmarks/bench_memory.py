"""Big models on small machines: peak RSS of short CPU training runs against the memory plan and the ideal.

Not a unit test. For Llama shapes of 135M (SmolLM), 1B and 3B (Llama-3.2) and 7B (Llama-2), a random-weight
model is written once as bf16 safetensors shards under $SFTLAB_BENCH_CACHE (default benchmarks/results/models/,
git-ignored), one shard
at a time — never the whole model in memory. Each (shape, method) then runs in a fresh process: `sftlab`'s
prepare + train, 2 steps, rows of 256 tokens, micro-batch 1, gradient checkpointing on, on the CPU (fp32
compute), the forgetting probe off (eval.probe=none: its base answers are a generation pass, not training
memory, and on a 7B shape on a CPU they take longer than the steps). Per run it reports the process's peak
RSS (VmHWM), the memory plan's estimate (train/memory.py, the `memory plan:` line) and the ideal (the stored
base + trainable weights + gradients + AdamW state, the plan's own terms without activations and runtime), and
the ratio plan / measured.

    python benchmarks/bench_memory.py                  # 135M and 1B (lora, qlora; full for 135M and 1B)
    python benchmarks/bench_memory.py --shapes 135M 1B 3B 7B --methods qlora
    python benchmarks/bench_memory.py --shapes 1B --merge lora qlora   # `sftlab merge`'s peak RSS
    python benchmarks/bench_memory.py --shapes 135M --methods --peer   # TRL+PEFT's LoRA (bf16) only
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
MODELS = Path(os.environ.get("SFTLAB_BENCH_CACHE") or RESULTS / "models")
"""Where the random models are written once (GBs: set SFTLAB_BENCH_CACHE to a dir outside the repo)."""
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied head
    "135M": (576, 1536, 30, 9, 3, 49152, True),
    "1B": (2048, 8192, 16, 32, 8, 128256, True),
    "3B": (3072, 8192, 28, 24, 8, 128256, True),
    "7B": (4096, 11008, 32, 32, 32, 32000, False),
    "70B": (8192, 28672, 80, 64, 8, 128256, False),
    "tiny": (64, 128, 2, 4, 2, 512, False),
}
SHARD_BYTES = 2 * 2**30
FULL_UP_TO = ("135M", "1B")
GIB = 2**30


def _config(name: str):
    import transformers

    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                    tie_word_embeddings=tied, max_position_embeddings=4096, dtype="bfloat16",
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tensor_shapes(name: str):
    """(tensor name, shape) of the Llama shape `name`, in model order."""
    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    head_dim = hidden // heads
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


def write_sparse_model(name: str) -> Path:
    """The shape `name` as sparse bf16 shards: each file's safetensors header, then a hole of the data's size
    (reads as zeros, takes no disk). For measuring a load's memory only: the values are all zero."""
    path = MODELS / f"{name}-sparse"
    if (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    _config(name).save_pretrained(path)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in tensor_shapes(name):
        nbytes = 2 * _numel(shape)
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape in shard:
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * _numel(shape)]}
            offset += 2 * _numel(shape)
            weight_map[key] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(path / file, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little") + text)
            handle.truncate(8 + len(text) + offset)
    _tokenizer().save_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def write_model(name: str) -> Path:
    """The random bf16 model of shape `name`, written shard by shard (cached: written once)."""
    import torch
    from safetensors.torch import save_file

    path = MODELS / name
    if (path / "model.safetensors.index.json").is_file():
        return path
    config = _config(name)
    scratch = path.with_name(name + ".partial")
    scratch.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(scratch)
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
    for key, shape in tensor_shapes(name):
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
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]  # a checkout without `pip install -e .` runs too
    from conftest import tiny_chat_tokenizer  # a small byte-level BPE with ChatML tokens, built locally

    return tiny_chat_tokenizer()


def _data(repeat: int = 40) -> Path:
    """Rows that encode to more than 256 tokens (cut to 256: data.truncation=truncate); `repeat`=320 for rows
    over 2048 tokens (the GPU preset)."""
    path = MODELS / ("rows.jsonl" if repeat == 40 else f"rows-{repeat}.jsonl")
    if not path.is_file():
        MODELS.mkdir(parents=True, exist_ok=True)
        text = "The capital of France is Paris. What is 2+2? It is 4. " * repeat
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
                             "train.gradient_checkpointing=true", "train.resume=never", "eval.probe=none",
                             *sys.argv[5:]])
console = Console(record=True, width=400, stderr=True)
start = time.time()
marks = []
def mark(name):  # the peak so far, and what is resident now (anonymous / file-backed pages), in bytes
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    now = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in fields}
    marks.append({"at": name, "seconds": round(time.time() - start, 1), "peak": peak_rss(), **now})
    print(json.dumps(marks[-1]), file=sys.stderr, flush=True)
try:
    setup = prepare(cfg, console=console, overwrite=True)
    loaded = peak_rss()
    mark("loaded")
    train(setup, console=Console(quiet=True), on_step=lambda step: mark(f"step {step}"))
    status = "ok"
except SftlabError as exc:
    loaded, status = None, "refused: " + str(exc)
mark("end")  # after the export, the report and finished.json
text = console.export_text()
import torch
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"peak": peak_rss(), "after_load": loaded, "status": status, "seconds": time.time() - start,
                  "cuda_peak": cuda, "marks": marks,
                  "plan": [l for l in text.splitlines() if l.startswith("memory plan")]}))
"""


def run(name: str, method: str, extra: list[str], repeat: int = 40) -> dict:
    model = write_model(name)
    out = RESULTS / "memory_runs" / f"{name}-{method}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = RESULTS / "memory_runs" / f"{name}-{method}.log"  # each mark as it is taken (a long run can be followed)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as stderr:
        done = subprocess.run([sys.executable, "-c", RUN, str(model), str(_data(repeat)), str(out), method, *extra],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    done.stderr = log.read_text(encoding="utf-8")
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
            "seconds": round(result["seconds"], 1), "plan_line": plan_line, "cuda_peak": result.get("cuda_peak"),
            "marks": result.get("marks")}


PEER = r"""
import json, sys, time, datasets, torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from sftlab.train.memory import peak_rss
model_dir, data, out, dtype = sys.argv[1:5]
start = time.time()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
with open(data, encoding="utf-8") as file:
    rows = datasets.Dataset.from_list([json.loads(line) for line in file])
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
args = SFTConfig(output_dir=out, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                 max_length=256, gradient_checkpointing=True, bf16=dtype == "bfloat16", use_cpu=True,
                 report_to=[], save_strategy="no", logging_steps=100_000, disable_tqdm=True,
                 dataloader_num_workers=0)
trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
loaded = peak_rss()
trainer.train()
print(json.dumps({"peak": peak_rss(), "after_load": loaded, "seconds": time.time() - start, "status": "ok"}))
"""


def peer_row(name: str, dtype: str = "bfloat16") -> dict:
    """TRL's SFTTrainer with PEFT's LoRA (rank 16, alpha 32, all-linear: sftlab's defaults) on the same model
    dir and rows, `dtype` weights, 2 steps of one 256-token row, gradient checkpointing, CPU, in a fresh
    process. bitsandbytes (PEFT's QLoRA path) has no CPU build here, so the peer is LoRA."""
    out = RESULTS / "memory_runs" / f"{name}-trl-lora"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", PEER, str(write_model(name)), str(_data()), str(out), dtype],
                          capture_output=True, text=True, env=env)
    row = {"shape": name, "method": f"TRL+PEFT lora ({dtype})"}
    if done.returncode != 0 or not done.stdout.strip():
        return {**row, "status": f"failed: {done.stderr.strip()[-600:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, **result, "seconds": round(result["seconds"], 1)}


LOAD = r"""
import json, sys, time, torch
from sftlab.config import load_config
from sftlab.methods import method_class
from sftlab.models.load import load_model
from sftlab.train.memory import peak_rss
cfg = load_config(overrides=[f"model={sys.argv[1]}", "method=qlora"])
start = time.time()
model = load_model(cfg.model, nf4=method_class(cfg.method).nf4(cfg))
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"peak": peak_rss(), "cuda_peak": cuda, "seconds": time.time() - start,
                  "device": str(next(model.parameters()).device)}))
"""


def load_row(name: str) -> dict:
    """QLoRA's NF4 load of the shape `name` (sparse shards: zeros) in a fresh process: peak host RSS and, on a
    GPU, peak torch.cuda.max_memory_allocated."""
    model = write_sparse_model(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD, str(model)], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not done.stdout.strip():
        return {"shape": name, "method": "nf4 load", "status": f"failed: {done.stderr.strip()[-600:]}"}
    return {"shape": name, "method": "nf4 load", "status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


PRESETS = {
    "gpu": [("7B", "qlora", 2048), ("70B", "load", None)],
    "gpu-dry": [("tiny", "qlora", 2048), ("tiny", "load", None)],
}
"""--preset gpu: QLoRA of the 7B shape on rows of 2048 tokens (goal: torch.cuda.max_memory_allocated ≤ 6 GB)
and the 70B shape's NF4 load (goal ≤ 40 GB), on the GPU that load_model picks. gpu-dry: the same code on tiny
shapes, on whatever device is there (a check of the path, not a measurement)."""


def preset_rows(name: str, extra: list[str]) -> list[dict]:
    rows = []
    for shape, kind, seq in PRESETS[name]:
        rows.append(load_row(shape) if kind == "load" else
                    run(shape, kind, [f"data.max_seq_len={seq}", *extra], repeat=320))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def adapter_run(name: str, method: str) -> Path:
    """A run dir (config.yaml + adapter/) holding a random rank-16 LoRA adapter of all linear layers for the
    shape `name` (B non-zero: the merge changes every wrapped weight), built on the meta skeleton: no base
    weight is read. Stands in for a trained run: the merge reads only the adapter and the base."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from sftlab import export
    from sftlab.config import load_config
    from sftlab.methods import METHODS
    from sftlab.methods.lora import LoRA, lora_modules
    from sftlab.models import stream

    run = MODELS / f"{name}-{method}-run"
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        return run
    model = write_model(name)
    cfg = load_config(overrides=[f"model={model}", f"method={method}", "lora.rank=16", "lora.targets=all-linear"])
    skeleton = stream.skeleton(model, dtype=torch.float32, trust_remote_code=False, attn_implementation="auto")
    trained = METHODS[method](cfg)
    LoRA.apply(trained, skeleton)  # the wrapping only (QLoRA's NF4 base is not needed to save its adapter)
    generator = torch.Generator().manual_seed(0)
    for layer in lora_modules(skeleton).values():
        layer.A = torch.nn.Parameter(torch.randn(layer.A.shape, generator=generator) * 0.01)
        layer.B = torch.nn.Parameter(torch.randn(layer.B.shape, generator=generator) * 0.01)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"model: {json.dumps(str(model))}\nmethod: {method}\n"
                                     "lora: {rank: 16, targets: all-linear}\n", encoding="utf-8")
    export.save_trained(skeleton, trained, cfg, _tokenizer(), run)
    return run


MERGE = r"""
import json, sys, time
from sftlab.cli import main
from sftlab.train.memory import peak_rss
start = time.time()
code = main(["merge", sys.argv[1], "--output", sys.argv[2], "--overwrite"])
print(json.dumps({"peak": peak_rss(), "code": code, "seconds": time.time() - start}))
"""


def merge_row(name: str, method: str) -> dict:
    """`sftlab merge` of the shape's adapter run in a fresh process: peak RSS against one shard + adapter."""
    import shutil

    run = adapter_run(name, method)
    out = MODELS / f"{name}-{method}-merged"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", MERGE, str(run), str(out)], capture_output=True, text=True, env=env)
    shard = max(f.stat().st_size for f in write_model(name).glob("*.safetensors"))
    adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0 or not done.stdout.strip():
        return {"shape": name, "method": f"merge {method}", "status": f"failed: {done.stderr.strip()[-600:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    printed = [line for line in done.stdout.splitlines()
               if line.startswith(("merged into", "fidelity", "onto", "closer"))]
    return {"shape": name, "method": f"merge {method}", "status": "ok" if result["code"] == 0 else "failed",
            "peak": result["peak"], "bound": shard + adapter + GIB, "shard": shard, "adapter": adapter,
            "seconds": round(result["seconds"], 1), "printed": printed}


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
    parser.add_argument("--methods", nargs="*", default=["lora", "qlora", "full"])
    parser.add_argument("--preset", choices=list(PRESETS), help="the GPU rows (gpu), or their dry check on tiny shapes")
    parser.add_argument("--peer", action="store_true",
                        help="also TRL+PEFT's LoRA in bf16 on each shape (the peer row)")
    parser.add_argument("--merge", nargs="*", default=None, choices=("lora", "qlora"),
                        help="instead of training: `sftlab merge` of a random adapter of each shape (default lora)")
    parser.add_argument("--out", help="results file name under benchmarks/results/ (default memory.json)")
    args, extra = parser.parse_known_args()
    rows = []
    if args.preset is not None:
        rows = preset_rows(args.preset, extra)
        print("\n".join(f"| {r['shape']} | {r['method']} | cuda peak {_gib(r.get('cuda_peak'))} | host peak "
                        f"{_gib(r.get('peak'))} | {r.get('seconds', '–')} s | {r['status'][:80]} |" for r in rows))
        return
    if args.merge is not None:
        for name in args.shapes:
            for method in args.merge or ["lora"]:
                rows.append(merge_row(name, method))
                print(json.dumps(rows[-1]), file=sys.stderr)
        print("\n".join(f"| {r['shape']} | {r['method']} | {_gib(r.get('peak'))} | ≤ {_gib(r.get('bound'))} "
                        f"(shard {_gib(r.get('shard'))} + adapter + 1 GiB) | {r.get('seconds', '–')} s | "
                        f"{r['status'][:80]} |"
                        for r in rows))
        return
    for name in args.shapes:
        started = time.time()
        write_model(name)
        print(f"{name}: model ready ({time.time() - started:.0f} s)", file=sys.stderr)
        for method in args.methods:
            if method == "full" and name not in FULL_UP_TO:
                continue
            rows.append(run(name, method, extra))
            print(json.dumps(rows[-1]), file=sys.stderr)
        if args.peer:
            rows.append(peer_row(name))
            print(json.dumps(rows[-1]), file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "memory.json" if args.out is None else args.out
    (RESULTS / name).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
