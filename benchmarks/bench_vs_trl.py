"""Training speed, side by side: sftlab vs TRL's SFTTrainer / DPOTrainer (+ PEFT LoRA), same model, data, settings.

Not a unit test. Both tools train the same generated random model on the same generated chat data, with
the same sequence limit, batch size, optimizer (AdamW, lr 1e-4, constant, clip 1.0), seed and LoRA shape
(rank 16, alpha 32, all linear layers), for `lora` and for `full` fine-tuning, and for `dpo`: preference
training (DPO, sigmoid loss, beta 0.1) with LoRA against TRL's DPOTrainer, both taking the reference as the base
model with the adapter disabled. Per run it reports:

- tokens/s and supervised tokens/s over the timed steps: the tokens of those steps over the wall time from
  the end of the last warm-up step to the end of the last timed step, so everything the loop does per step
  (data, forward, backward, optimizer, logging) is inside; one more step runs after the window, so that
  the end-of-run checkpoint and export stay outside it. "Supervised" counts the positions the loss uses
  (a target that is not -100 after the shift), counted from the batches each tool feeds its model;
- the peak RSS of the run (VmHWM: each run is a fresh process, so the figure is that tool's alone; it
  includes TRL's tokenisation and packing, which happen before the timed steps and are not timed);
- on a GPU: peak torch.cuda.max_memory_allocated and model-FLOPs utilisation, 4N FLOPs per token for LoRA,
  6N for full fine-tuning and for DPO with LoRA (4N for the policy + 2N for the reference forward), N = the
  matmul weights (every nn.Linear, the output head included), over
  --peak-tflops (989, an H100/H200's dense bf16);
- sftlab's step time by phase (data / forward / backward / optimizer), where train.profile exists;
- the ratios sftlab / TRL per method, next to the targets of the issue (shown, not asserted).

Setup, made once and cached under .cache/bench/ (deterministic for a seed):
1. chat data in the `messages` format, shaped like SFT data: a system prompt, 1-3 turns, long user turns
   (60-250 words), shorter answers; chats longer than --max-chat-tokens (512) are left out;
2. a byte-level BPE tokenizer (12k) trained on that text, with <|im_start|>/<|im_end|> and a ChatML chat
   template whose {% generation %} block holds exactly the assistant content + <|im_end|> (not the newline
   after it), so TRL's assistant_only_loss trains what sftlab's data.template=chatml trains — checked on a
   few rows before anything runs;
3. for `dpo`, preference pairs made from those chats (prefs.jsonl): the prompt is a chat up to its last user
   turn, the chosen answer its last assistant reply, the rejected answer the last reply of the next chat;
   sftlab's scored tokens are checked against what TRL scores (TRL also scores the template's newline after
   <|im_end|>, one token per sequence, which sftlab cuts);
4. a random model saved to a dir: preset cpu, Llama-shaped, 8 layers, hidden 512 (~36M parameters), fp32;
   preset gpu, Qwen2-0.5B-shaped (24 layers, hidden 896, 2 KV heads, its 151,936-row tied embedding; our
   tokenizer uses the first 12k rows, the FLOPs are the real model's), bf16.

TRL runs as well configured as it gets on these machines: packing (BFD) + padding_free (one (1, N) row with
position_ids per batch), assistant_only_loss, no gradient checkpointing, its chunked LM-head loss, sdpa
attention (sftlab too; flash-attention-2 is not a choice sftlab offers, so neither tool gets it). TRL's
DPOTrainer pads (its padding_free is disabled in 1.16): a DPO step is `batch` pairs (2 x batch sequences) in
both tools, sftlab's padded too (data.packing=false, pairs grouped by length) so that the steps hold the same
number of pairs; tokens count the real tokens, not the padding.

Wall-clock rates move with whatever else runs on the machine (or the VM: other tenants' processes do not show
in `ps`). Each run records the CPU time the rest of the machine used during its timed window (/proc/stat), and
the table marks runs where others kept more than 0.1 CPUs busy; the 1-minute load average is recorded too.

    python benchmarks/bench_vs_trl.py                        # CPU preset: ~4 min on 2 idle cores
    python benchmarks/bench_vs_trl.py --methods lora --timed-steps 5
    python benchmarks/bench_vs_trl.py --methods dpo              # the DPO row alone
    python benchmarks/bench_vs_trl.py --methods orpo,kto         # ORPO (TRL's ORPOTrainer) and KTO (KTOTrainer),
                                                                 # LoRA, on the same pairs / unpaired rows
    python benchmarks/bench_vs_trl.py --preset gpu --wheels DIR   # a GPU machine without internet (4.1 min
                                                                   # on an H200); DIR: fetch_bench_wheels.sh
                                                                   # (benchmarks/gpu_lease.sh: both GPU presets)
    python benchmarks/bench_vs_trl.py --preset gpu --device cpu --smoke   # the GPU code path, tiny, on CPU

Targets (issue): LoRA >= 1.5x TRL+PEFT supervised tokens/s at <= 0.7x its peak RSS; full fine-tuning
>= 1.3x its tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench" / "vs_trl"
RESULTS = REPO / "benchmarks" / "results" / "bench_vs_trl.json"
TRL_REQUIREMENT = "trl==1.16.0"
"""The TRL that `--wheels` installs (the one PERFORMANCE.md measured); keep in step with pyproject's bench extra."""
SETUP_VERSION = 1
"""Bump when the data, tokenizer or model generation changes, so cached setups are rebuilt."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN, END_OF_TURN = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""sftlab's built-in ChatML, character for character, with TRL's {% generation %} markers around what
sftlab trains: the assistant content and the <|im_end|> that closes it."""


# -------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    architecture: str
    """transformers model_type of the random model: llama or qwen2."""
    shape: dict[str, int]
    """hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads."""
    model_vocab: int | None
    """Embedding rows; None: the tokenizer's size."""
    tie_embeddings: bool
    dtype: str
    """float32 or bfloat16: the saved weights, and what both tools train in."""
    device: str
    max_length: int
    """TRL's max_length (its pack size) = sftlab's data.max_seq_len."""
    batch_size: int
    """TRL's per_device_train_batch_size = sftlab's train.micro_batch_size; no gradient accumulation."""
    warmup_steps: int
    timed_steps: int
    conversations: int
    max_chat_tokens: int = 512
    tokenizer_vocab: int = 12_000
    lr: float = 1e-4
    lora_rank: int = 16
    lora_alpha: int = 32


LLAMA_36M = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 4}
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}

PRESETS = {
    # PERFORMANCE.md's CPU row: chats <= 512 tokens, batch 2; packs of up to 1024 tokens.
    "cpu": Preset("llama", LLAMA_36M, None, False, "float32", "cpu", max_length=1024, batch_size=2,
                  warmup_steps=3, timed_steps=15, conversations=1000),
    # PERFORMANCE.md's H200 rows: bf16, batch 8 x 2048.
    "gpu": Preset("qwen2", QWEN2_05B, 151_936, True, "bfloat16", "cuda", max_length=2048, batch_size=8,
                  warmup_steps=3, timed_steps=10, conversations=3000),
}
SMOKE = {"shape": TINY, "model_vocab": None, "dtype": "float32", "max_length": 512, "batch_size": 2,
         "warmup_steps": 1, "timed_steps": 1, "conversations": 120, "tokenizer_vocab": 2000}
"""--smoke: the same code path in a minute, numbers meaningless."""

TARGETS = {"lora": {"supervised_tokens_per_s": 1.5, "peak_rss_mib": 0.7}, "full": {"tokens_per_s": 1.3},
           "orpo": {"tokens_per_s": 1.5, "peak_rss_mib": 0.7}, "kto": {"tokens_per_s": 1.5, "peak_rss_mib": 0.7}}
"""sftlab / TRL: at least this for speeds, at most this for memory."""


# ----------------------------------------------------------------------------------------------- data


def generate_chats(count: int, *, seed: int) -> list[dict[str, Any]]:
    """`count` conversations: system prompt, 1-3 turns, user 60-250 words, answers shorter. The word budget
    shrinks with the number of turns so that most chats stay within ~500 tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_encode import SYSTEM_PROMPTS, TextSource  # the word generator of the encode benchmark

    source = TextSource(seed, sentences=20_000)
    rng = source.rng
    chats = []
    for _ in range(count):
        turns = rng.choices((1, 2, 3), (50, 30, 20))[0]
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
        for _ in range(turns):
            messages.append({"role": "user", "content": source.paragraph(60, 250 // turns, code=0.05)})
            messages.append({"role": "assistant", "content": source.paragraph(20, 100 // turns, code=0.15)})
        chats.append({"messages": messages})
    return chats


def render_chatml(messages: list[dict[str, str]]) -> str:
    """The text both templates render (checked against the tokenizer's template in check_masks)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def build_tokenizer(chats: list[dict[str, Any]], *, vocab_size: int) -> Any:
    """A transformers tokenizer: byte-level BPE trained on the rendered chats, with our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((render_chatml(chat["messages"]) for chat in chats), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TURN, pad_token=PAD_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def keep_short(chats: list[dict[str, Any]], tokenizer: Any, *, max_tokens: int, count: int) -> tuple[list, list[int]]:
    """The first `count` chats of at most `max_tokens` tokens, and their lengths."""
    texts = [render_chatml(chat["messages"]) for chat in chats]
    lengths = [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    kept = [(chat, n) for chat, n in zip(chats, lengths) if n <= max_tokens][:count]
    if len(kept) < count:
        raise SystemExit(f"only {len(kept)} of {len(chats)} generated chats fit {max_tokens} tokens; "
                         f"raise --max-chat-tokens")
    return [chat for chat, _ in kept], [n for _, n in kept]


def preference_pairs(chats_path: Path, out: Path) -> Path:
    """prefs.jsonl next to the chats (made once): per chat, its messages up to the last user turn as the prompt,
    its last assistant reply as chosen and the next chat's last reply as rejected (fluent, but off the prompt)."""
    if out.is_file():
        return out
    with chats_path.open(encoding="utf-8") as file:
        chats = [json.loads(line)["messages"] for line in file]
    rows = [{"prompt": chat[:-1], "chosen": [chat[-1]], "rejected": [chats[(k + 1) % len(chats)][-1]]}
            for k, chat in enumerate(chats)]
    scratch = out.with_suffix(".tmp")
    scratch.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    scratch.rename(out)
    return out


def feedback_rows(prefs_path: Path, out: Path) -> Path:
    """feedback.jsonl from prefs.jsonl (made once), for `kto`: each pair as two unpaired rows, its chosen answer
    labelled true and its rejected one false."""
    if out.is_file():
        return out
    with prefs_path.open(encoding="utf-8") as file:
        pairs = [json.loads(line) for line in file]
    rows = [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
            for pair in pairs for side in ("chosen", "rejected")]
    scratch = out.with_suffix(".tmp")
    scratch.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    scratch.rename(out)
    return out


# ---------------------------------------------------------------------------------------------- model


def build_model(preset: Preset, vocab: int, out: Path, *, seed: int) -> dict[str, int]:
    """A random model of the preset's shape, saved to `out`; its parameter counts."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from sftlab.models.quant import quiet_loggers

    config = AutoConfig.for_model(preset.architecture, vocab_size=preset.model_vocab or vocab,
                                  tie_word_embeddings=preset.tie_embeddings, max_position_embeddings=4096,
                                  pad_token_id=None, bos_token_id=None, eos_token_id=None, **preset.shape)
    torch.manual_seed(seed)
    hf_logging.disable_progress_bar()
    with quiet_loggers("torchao", "torch.utils._pytree"):  # torchao's CPU-only import warnings, as sftlab does
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(getattr(torch, preset.dtype))
        model.save_pretrained(str(out))
    return {"parameters": sum(p.numel() for p in model.parameters()),
            # N of the MFU: what a token multiplies through, the output head included (tied or not)
            "matmul_parameters": sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
            "embedding_rows": config.vocab_size}


# ---------------------------------------------------------------------------------------------- setup


def setup_key(preset: Preset, seed: int) -> str:
    made_of = {"version": SETUP_VERSION, "seed": seed, **{k: getattr(preset, k) for k in (
        "architecture", "shape", "model_vocab", "tie_embeddings", "dtype", "conversations", "max_chat_tokens",
        "tokenizer_vocab")}}
    return hashlib.blake2b(json.dumps(made_of, sort_keys=True).encode(), digest_size=6).hexdigest()


def prepare_setup(preset: Preset, *, seed: int, root: Path) -> dict[str, Any]:
    """Data, tokenizer and model for the preset, from the cache or made now."""
    directory = root / f"{preset.architecture}-{setup_key(preset, seed)}"
    # Paths are not stored: a cache dir copied elsewhere (with the repo, to another machine) still works.
    where = {"dir": str(directory), "data": str(directory / "chats.jsonl"), "model": str(directory / "model")}
    manifest = directory / "setup.json"
    if manifest.is_file():
        print(f"setup: cached in {directory}", flush=True)
        return {**json.loads(manifest.read_text(encoding="utf-8")), **where}
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="making-", dir=root))
    # Twice the rows needed: the few longer than max_chat_tokens are left out.
    chats = generate_chats(2 * preset.conversations, seed=seed)
    tokenizer = build_tokenizer(chats, vocab_size=preset.tokenizer_vocab)
    chats, lengths = keep_short(chats, tokenizer, max_tokens=preset.max_chat_tokens, count=preset.conversations)
    with (scratch / "chats.jsonl").open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(chat, ensure_ascii=False) + "\n" for chat in chats)
    counts = build_model(preset, len(tokenizer), scratch / "model", seed=seed)
    tokenizer.save_pretrained(str(scratch / "model"))  # a model dir holds its tokenizer (sftlab loads it there)
    setup = {"tokenizer_size": len(tokenizer), "chats": len(chats), "chat_tokens_mean": sum(lengths) / len(lengths),
             "chat_tokens_max": max(lengths), **counts}
    (scratch / "setup.json").write_text(json.dumps(setup, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    scratch.rename(directory)  # whole or absent: an interrupted setup leaves no half-made cache entry
    print(f"setup: made in {time.perf_counter() - started:.0f} s in {directory}", flush=True)
    return {**setup, **where}


def check_masks(setup: dict[str, Any], *, rows: int = 8) -> dict[str, Any]:
    """sftlab's labels (data.template=chatml) against TRL's source of labels (the tokenizer's assistant mask
    from the {% generation %} template) on the first `rows` chats: same ids, same trained tokens."""
    from itertools import islice

    from transformers import AutoTokenizer

    from sftlab.data.encode import IGNORE_INDEX, Encoder
    from sftlab.data.formats import read_conversations
    from sftlab.data.templates import load_template

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    encoder = Encoder(tokenizer, load_template("chatml", tokenizer), max_seq_len=None)
    with open(setup["data"], encoding="utf-8") as file:
        raw = [json.loads(line) for line in islice(file, rows)]
    trained = 0
    for k, (row, conversation) in enumerate(zip(raw, read_conversations(setup["data"], format="messages"))):
        ours = encoder.encode(conversation)
        theirs = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        ours_trained = [label != IGNORE_INDEX for label in ours.labels]
        if list(theirs["input_ids"]) != ours.input_ids or [bool(m) for m in theirs["assistant_masks"]] != ours_trained:
            first = next((i for i, (a, b) in enumerate(zip(ours_trained, theirs["assistant_masks"])) if a != bool(b)),
                         None)
            raise SystemExit(f"chat {k + 1}: sftlab and TRL would not train the same tokens (ids equal: "
                             f"{list(theirs['input_ids']) == ours.input_ids}, first differing label at token "
                             f"{first}); fix CHAT_TEMPLATE before comparing speeds.")
        trained += sum(ours_trained)
    return {"rows": rows, "trained_tokens": trained}


def check_pairs(setup: dict[str, Any], *, rows: int = 8) -> dict[str, Any]:
    """sftlab's pair encoding against TRL's DPO tokenisation (the prompt rendered with the generation prompt,
    then prompt + answer) on the first `rows` pairs: the same prompt ids, and TRL's completion = sftlab's scored
    tokens + the template's newline after <|im_end|>."""
    from itertools import islice

    from transformers import AutoTokenizer

    from sftlab.data.encode import IGNORE_INDEX, Encoder
    from sftlab.data.preference import PairEncoder, read_pairs
    from sftlab.data.templates import load_template

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    encoder = PairEncoder(Encoder(tokenizer, load_template("chatml", tokenizer), max_seq_len=None))
    newline = tokenizer.encode("\n", add_special_tokens=False)
    with open(setup["prefs"], encoding="utf-8") as file:
        raw = [json.loads(line) for line in islice(file, rows)]
    scored = 0
    for k, (row, pair) in enumerate(zip(raw, read_pairs(setup["prefs"]))):
        ours = encoder.encode(pair)
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        for side, answer in ((ours.chosen, row["chosen"]), (ours.rejected, row["rejected"])):
            full = tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=True, return_dict=True)["input_ids"]
            mine = [t for t in side.labels if t != IGNORE_INDEX]
            if list(prompt) != side.input_ids[:ours.prompt_tokens] or list(full[len(prompt):]) != mine + newline:
                raise SystemExit(f"pair {k + 1}: sftlab and TRL would not score the same tokens; fix the setup "
                                 "before comparing speeds.")
            scored += len(mine)
    return {"rows": rows, "scored_tokens": scored}


# -------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class RunSpec:
    """What one worker process runs; written as JSON for `--worker`."""
    tool: str
    method: str
    model: str
    """The model dir, with its tokenizer."""
    data: str
    output_dir: str
    result: str
    dtype: str
    device: str
    max_length: int
    batch_size: int
    warmup_steps: int
    timed_steps: int
    lr: float
    seed: int
    threads: int | None
    lora_rank: int
    lora_alpha: int
    extra_overrides: tuple[str, ...] = field(default_factory=tuple)


class StepClock:
    """At the end of each optimizer step (after a CUDA sync, so queued work is inside): the wall clock, this
    process's CPU time and, on Linux, the whole machine's busy CPU time, so that the window can say how much
    CPU other processes took meanwhile (on a shared machine, the reason a rate is low)."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.ticks: list[tuple[float, float, float | None]] = []

    def tick(self) -> None:
        self.sync()
        own = os.times()
        self.ticks.append((time.perf_counter(), own.user + own.system, _machine_busy_s()))

    def window(self, warmup: int, timed: int) -> dict[str, Any]:
        """From the end of step `warmup` to the end of step `warmup + timed`: wall seconds in all and per
        step, this process's CPU seconds, and the CPU seconds of everything else on the machine."""
        if len(self.ticks) < warmup + timed:
            raise RuntimeError(f"only {len(self.ticks)} steps ran; {warmup + timed} needed")
        first, last = self.ticks[warmup - 1], self.ticks[warmup + timed - 1]
        walls = [t[0] for t in self.ticks[warmup - 1:warmup + timed]]
        window = {"seconds": last[0] - first[0], "step_s": [b - a for a, b in itertools.pairwise(walls)],
                  "cpu_s": last[1] - first[1]}
        if first[2] is not None and last[2] is not None:
            window["other_cpu_s"] = max(0.0, last[2] - first[2] - window["cpu_s"])
        return window


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (the `cpu` line of /proc/stat); None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def probe_attention() -> dict[str, Any]:
    """Record the first scaled_dot_product_attention call (is there a dense mask?), then step aside.
    transformers' sdpa path looks the function up on torch.nn.functional at each call."""
    import torch.nn.functional as F

    seen: dict[str, Any] = {}
    original = F.scaled_dot_product_attention

    def probe(query, key, value, attn_mask=None, *args, **kwargs):  # torch's signature, passed through
        if not seen:
            F.scaled_dot_product_attention = original
            seen.update(query=list(query.shape), is_causal=bool(kwargs.get("is_causal", False)),
                        attn_mask=None if attn_mask is None else list(attn_mask.shape),
                        attn_mask_dtype=None if attn_mask is None else str(attn_mask.dtype).replace("torch.", ""))
        return original(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = probe
    return seen


def memory_peaks(device: str) -> dict[str, float]:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, it does not inherit the parent's peak through
    fork/exec) and, on CUDA, peak allocated GPU memory, in MiB."""
    import resource

    import torch

    status = Path("/proc/self/status")
    if status.is_file():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        rss = int(line.split()[1]) / 1024
    else:  # not Linux; bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)
    peaks = {"peak_rss_mib": rss}
    if device.startswith("cuda"):
        peaks["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / (1 << 20)
        peaks["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / (1 << 20)
    return peaks


def count_sft(batch: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """SFTTrainer's batch: tokens (the attention mask, or every token of a padding-free row) and supervised
    positions (labels after the shift), and its layout: padding-free or not, its sequences and the causal
    query-key pairs they need."""
    from sftlab.data.encode import IGNORE_INDEX  # TRL's labels use the same ignored label

    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else int(input_ids.numel())  # padding-free: no padding
    layout = {"padding_free": input_ids.shape[0] == 1 and "position_ids" in batch and mask is None}
    if "position_ids" in batch:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
        lengths = [b - a for a, b in itertools.pairwise(starts)]
        layout.update(sequences=len(lengths), causal_pairs_needed=sum(n * (n + 1) // 2 for n in lengths))
    return tokens, int((labels[:, 1:] != IGNORE_INDEX).sum()), layout


def count_dpo(batch: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """DPOTrainer's batch (both sides stacked): its attention mask, its completion mask after the shift."""
    return (int(batch["attention_mask"].sum()), int(batch["completion_mask"][:, 1:].sum()),
            {"sequences": int(batch["input_ids"].shape[0])})


def count_orpo(batch: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """ORPOTrainer's batch: both sides' attention masks and labels after the shift."""
    sides = ("chosen", "rejected")
    return (sum(int(batch[f"{s}_attention_mask"].sum()) for s in sides),
            sum(int((batch[f"{s}_labels"][:, 1:] != -100).sum()) for s in sides),
            {"sequences": 2 * int(batch["chosen_input_ids"].shape[0])})


def count_kto(batch: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """KTOTrainer's batch: the examples and their KL sequences (sftlab counts both too)."""
    return (sum(int(batch[f"{p}attention_mask"].sum()) for p in ("", "KL_")),
            sum(int(batch[f"{p}completion_mask"][:, 1:].sum()) for p in ("", "KL_")),
            {"sequences": 2 * int(batch["input_ids"].shape[0])})


class CountingCollator:
    """Wraps a TRL trainer's collator: the tokens and supervised (scored) positions of each batch, in the order the
    trainer draws them (batch k feeds optimizer step k: no gradient accumulation), and the first batch's layout.
    `count` reads them off the batch, one function per trainer's batch keys."""

    def __init__(self, inner: Any, count: Any) -> None:
        self.inner, self.count = inner, count
        self.batches: list[tuple[int, int]] = []
        self.first: dict[str, Any] = {}

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        tokens, supervised, layout = self.count(batch)
        self.batches.append((tokens, supervised))
        if not self.first:
            key = "input_ids" if "input_ids" in batch else "chosen_input_ids"
            self.first = {"input_ids": list(batch[key].shape), "keys": sorted(batch), "padding_free": False, **layout}
        return batch


def trl_trainer(method: str, common: dict[str, Any]) -> tuple[Any, Any, Any]:
    """TRL's trainer class for `method`, its config (the shared settings + the method's own) and the function
    that counts its batches."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig(**common, beta=DPO_BETA, loss_type=["sigmoid"]), count_dpo
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig(**common, beta=ORPO_LAMBDA), count_orpo
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig(**common, beta=KTO_BETA), count_kto
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer, SFTConfig(**common, packing=True, padding_free=True, assistant_only_loss=True), count_sft


def trl_settings(spec: RunSpec) -> dict[str, Any]:
    """The training settings every TRL trainer gets, the same as sftlab's (sftlab_config)."""
    return {
        "output_dir": spec.output_dir, "max_steps": spec.warmup_steps + spec.timed_steps + 1,
        "per_device_train_batch_size": spec.batch_size, "gradient_accumulation_steps": 1, "learning_rate": spec.lr,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "seed": spec.seed, "data_seed": spec.seed, "max_length": spec.max_length, "gradient_checkpointing": False,
        "bf16": spec.dtype == "bfloat16", "fp16": False, "use_cpu": spec.device == "cpu", "report_to": [],
        "save_strategy": "no", "eval_strategy": "no", "logging_steps": 100_000, "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def run_trl(spec: RunSpec) -> dict[str, Any]:
    """TRL's SFTTrainer (lora, full), DPOTrainer (dpo), ORPOTrainer (orpo) or KTOTrainer (kto), with PEFT's LoRA
    for all but full, timed per step."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=getattr(torch, spec.dtype),
                                                 attn_implementation="sdpa")
    with open(spec.data, encoding="utf-8") as file:
        dataset = datasets.Dataset.from_list([json.loads(line) for line in file])
    peft_config = None
    if spec.method != "full":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer_class, args, count = trl_trainer(spec.method, trl_settings(spec))
    clock = StepClock(spec.device)

    class Tick(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=[Tick()])
    # TRL refuses a custom collator with padding_free; wrapping its own after construction counts tokens.
    counter = CountingCollator(trainer.data_collator, count)
    trainer.data_collator = counter
    attention = probe_attention()
    setup_s = time.perf_counter() - started
    trainer.train()
    timing = clock.window(spec.warmup_steps, spec.timed_steps)
    timed = counter.batches[spec.warmup_steps:spec.warmup_steps + spec.timed_steps]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
        **timing, "setup_s": setup_s,
        "tokens": sum(t for t, _ in timed), "supervised_tokens": sum(s for _, s in timed),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "optimizer": f"{type(optimizer).__name__} ({getattr(args.optim, 'value', args.optim)})",
        "batch": counter.first, "attention": attention,
    }


DPO_BETA = 0.1
ORPO_LAMBDA = 0.1
KTO_BETA = 0.1
PREFERENCE_STAGES = {"dpo": ["stage=dpo", f"dpo.beta={DPO_BETA}", "dpo.loss=sigmoid"],
                     # orpo.nll=sequence: TRL's ORPOTrainer's NLL, over the chosen prompt and answer
                     "orpo": ["stage=orpo", f"orpo.lambda={ORPO_LAMBDA}", "orpo.nll=sequence"],
                     "kto": ["stage=kto", f"kto.beta={KTO_BETA}"]}
"""sftlab's settings for the preference methods (all with LoRA, padded micro-batches: TRL's trainers pad)."""
PROFILE_PHASES = ("time_data", "time_forward", "time_backward", "time_optimizer")


def sftlab_config(spec: RunSpec) -> Any:
    from sftlab.config import load_config

    # dpo: preference rows (their own format), LoRA, the reference = the base with the adapter disabled; padded
    # micro-batches of `batch_size` pairs, the pairs per step of TRL's DPOTrainer (which cannot pack).
    stage = [*PREFERENCE_STAGES[spec.method], "data.packing=false"] if spec.method in PREFERENCE_STAGES \
        else ["data.format=messages", "data.train_on=assistant", "data.packing=true"]
    lora = [] if spec.method == "full" else [f"lora.rank={spec.lora_rank}", f"lora.alpha={spec.lora_alpha}",
                                              "lora.dropout=0.0", "lora.targets=all-linear"]
    return load_config(overrides=[
        f"model={spec.model}", f"model.dtype={spec.dtype}", "model.attn_implementation=sdpa",
        f"method={'lora' if spec.method in PREFERENCE_STAGES else spec.method}", f"output_dir={spec.output_dir}",
        *stage,
        f"data.train={spec.data}", "data.template=chatml",
        f"data.max_seq_len={spec.max_length}", "data.cache=false", *lora,
        f"train.micro_batch_size={spec.batch_size}", "train.grad_accum_steps=1",
        f"train.max_steps={spec.warmup_steps + spec.timed_steps + 1}", f"train.lr={spec.lr}",
        "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0.0", "train.max_grad_norm=1.0",
        f"train.seed={spec.seed}", "train.save_every_steps=null", "train.resume=never",
        "train.gradient_checkpointing=false", "train.profile=true", *spec.extra_overrides,
    ])


def run_sftlab(spec: RunSpec) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from sftlab.runs import prepare, train
    from sftlab.train.metrics import read_metrics

    started = time.perf_counter()
    cfg = sftlab_config(spec)
    setup = prepare(cfg, console=Console(stderr=True), device=torch.device(spec.device))
    clock = StepClock(spec.device)
    attention = probe_attention()
    setup_s = time.perf_counter() - started
    train(setup, console=Console(stderr=True), on_step=lambda step: clock.tick())
    timing = clock.window(spec.warmup_steps, spec.timed_steps)
    steps = {r["step"]: r for r in read_metrics(Path(spec.output_dir) / "metrics.jsonl") if "loss" in r}
    timed = [steps[k] for k in range(spec.warmup_steps + 1, spec.warmup_steps + spec.timed_steps + 1)]
    profile = {phase: sum(r[phase] for r in timed) / len(timed) for phase in PROFILE_PHASES if phase in timed[0]}
    if profile:
        profile["other"] = sum(r["seconds"] for r in timed) / len(timed) - sum(profile.values())
        profile["between steps"] = (timing["seconds"] - sum(r["seconds"] for r in timed)) / len(timed)
    return {
        **timing, "setup_s": setup_s,
        "tokens": sum(r["tokens"] for r in timed), "supervised_tokens": sum(r["supervised_tokens"] for r in timed),
        "trainable_parameters": sum(p.numel() for p in setup.method.trainable_parameters(setup.model).values()),
        "optimizer": "AdamW (sftlab)", "attention": attention, "profile_s": profile,
    }


RUNNERS = {"trl": run_trl, "sftlab": run_sftlab}


def worker(spec_path: Path) -> None:
    """One (tool, method) run in this fresh process; its result goes to spec.result as JSON."""
    spec = RunSpec(**json.loads(spec_path.read_text(encoding="utf-8")))
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    load_before = os.getloadavg()[0]
    result = RUNNERS[spec.tool](spec)
    result.update(memory_peaks(spec.device), threads=torch.get_num_threads(),
                  load_average_1m=[load_before, os.getloadavg()[0]])
    if spec.device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name()
    Path(spec.result).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def run_in_fresh_process(spec: RunSpec, log: Path) -> dict[str, Any]:
    """`worker` in a new interpreter (its own peak RSS), output to `log`; exits with its tail on failure."""
    spec_path = Path(spec.result).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                               stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if code != 0 or not Path(spec.result).is_file():
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{spec.tool} {spec.method} failed (exit {code}); the end of {log}:\n{tail}")
    return json.loads(Path(spec.result).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- report


def summarize(run: dict[str, Any], *, method: str, matmul_parameters: int, peak_tflops: float | None) -> dict[str, Any]:
    """Rates over the timed window (the figures of record), the same at the median step time (steadier
    when other processes took CPU during a few steps), other processes' load, and MFU given a peak."""
    steps = len(run["step_s"])
    median_s = statistics.median(run["step_s"])
    summary = {**run, "tokens_per_s": run["tokens"] / run["seconds"],
               "supervised_tokens_per_s": run["supervised_tokens"] / run["seconds"],
               "tokens_per_s_median_step": run["tokens"] / (median_s * steps),
               "supervised_tokens_per_s_median_step": run["supervised_tokens"] / (median_s * steps),
               "tokens_per_step": run["tokens"] / steps, "median_step_s": median_s,
               # per CPU-second of this process: steadier than wall rates when others share the cores
               "tokens_per_cpu_s": run["tokens"] / run["cpu_s"] if run["cpu_s"] > 0 else 0.0}
    if "other_cpu_s" in run and run["seconds"] >= 2:  # /proc/stat counts in 10 ms ticks: too coarse below
        summary["other_cores_busy"] = run["other_cpu_s"] / run["seconds"]  # mean CPUs others kept busy
    if peak_tflops:
        flops_per_token = FLOPS_PER_PARAMETER[method] * matmul_parameters
        summary["mfu"] = summary["tokens_per_s"] * flops_per_token / (peak_tflops * 1e12)
    return summary


FLOPS_PER_PARAMETER = {"lora": 4, "full": 6, "dpo": 6, "orpo": 4, "kto": 5}
"""Matmul FLOPs per token per weight: forward 2N; backward 2N (LoRA: no weight gradients of the frozen base) or
4N; DPO with LoRA adds the reference's forward (2N) to LoRA's 4N; ORPO has no reference (4N); KTO's tokens are
half examples (4N + the reference's 2N) and half KL sequences (forwards of the policy and the reference, 4N)."""
RATIO_KEYS = ("supervised_tokens_per_s", "tokens_per_s", "supervised_tokens_per_s_median_step",
              "tokens_per_s_median_step", "tokens_per_cpu_s", "peak_rss_mib", "peak_gpu_mib", "mfu")


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """sftlab / TRL per method, for speeds and memory."""
    out: dict[str, dict[str, float]] = {}
    for method in ("lora", "full", "dpo", "orpo", "kto"):
        ours, theirs = runs.get(f"sftlab/{method}"), runs.get(f"trl/{method}")
        if ours and theirs:
            out[method] = {k: ours[k] / theirs[k] for k in RATIO_KEYS if k in ours and k in theirs and theirs[k]}
    return out


def target_line(method: str, ratio: dict[str, float]) -> str:
    parts = []
    for key, bound in TARGETS.get(method, {}).items():
        value = ratio.get(key)
        if value is None:
            continue
        faster = key.endswith("_per_s")
        met = value >= bound if faster else value <= bound
        parts.append(f"{key} {value:.2f}x (target {'>=' if faster else '<='} {bound}x: {'met' if met else 'NOT met'})")
    return "; ".join(parts)


BUSY = 0.1
"""Other processes keeping more than this many CPUs busy on average during a run's window mark it noisy."""


def table(result: dict[str, Any]) -> list[list[str]]:
    runs, gpu = result["runs"], any("mfu" in r for r in result["runs"].values())  # the gpu preset
    header = ["method", "tool", "tok/s", "sup tok/s", "(median step)", "tok/CPU-s", "tok/step", "s/step",
              "peak RSS MiB", "others' CPUs"]
    if gpu:
        header += ["GPU MiB", "MFU"]
    rows = [header]
    for name, run in runs.items():
        tool, method = name.split("/")
        others = run.get("other_cores_busy")
        row = [method, tool, f"{run['tokens_per_s']:,.0f}", f"{run['supervised_tokens_per_s']:,.0f}",
               f"{run['tokens_per_s_median_step']:,.0f} / {run['supervised_tokens_per_s_median_step']:,.0f}",
               f"{run.get('tokens_per_cpu_s', 0):,.0f}", f"{run['tokens_per_step']:,.0f}",
               f"{run['seconds'] / len(run['step_s']):.2f}",
               f"{run['peak_rss_mib']:,.0f}", "" if others is None else f"{others:.2f}{' !' if others > BUSY else ''}"]
        if gpu:
            row += [f"{run['peak_gpu_mib']:,.0f}" if "peak_gpu_mib" in run else "-", f"{100 * run['mfu']:.1f}%"]
        rows.append(row)
    for method, ratio in result["ratios"].items():
        row = [method, "sftlab/TRL", f"{ratio.get('tokens_per_s', 0):.2f}x",
               f"{ratio.get('supervised_tokens_per_s', 0):.2f}x",
               (f"{ratio.get('tokens_per_s_median_step', 0):.2f}x / "
                f"{ratio.get('supervised_tokens_per_s_median_step', 0):.2f}x"),
               f"{ratio.get('tokens_per_cpu_s', 0):.2f}x", "", "", f"{ratio.get('peak_rss_mib', 0):.2f}x", ""]
        if gpu:
            row += [f"{ratio['peak_gpu_mib']:.2f}x" if "peak_gpu_mib" in ratio else "-", f"{ratio.get('mfu', 0):.2f}x"]
        rows.append(row)
    return rows


def print_report(result: dict[str, Any]) -> None:
    setup, s = result["setup"], result["settings"]
    print(f"\nmodel: {setup['architecture']} {setup['parameters'] / 1e6:.1f}M parameters "
          f"({setup['matmul_parameters'] / 1e6:.1f}M in matmuls), {setup['embedding_rows']:,} embedding rows, "
          f"{s['dtype']}; tokenizer {setup['tokenizer_size']:,}; {setup['chats']:,} chats, "
          f"{setup['chat_tokens_mean']:.0f} tokens mean, {setup['chat_tokens_max']} max")
    print(f"settings: max_length {s['max_length']}, batch {s['batch_size']}, {s['warmup_steps']} warm-up + "
          f"{s['timed_steps']} timed steps, lr {s['lr']}, LoRA r{s['lora_rank']}/alpha {s['lora_alpha']} all-linear, "
          f"device {s['device']}, {s['threads'] or 'default'} threads\n")
    rows = table(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    if any(r.get("other_cores_busy", 0) > BUSY for r in result["runs"].values()):
        print(f"! other processes kept more than {BUSY} CPUs busy during that run's timed steps: its rates are "
              "low by about that share; the median-step rates hold better, a quiet machine best")
    for method, ratio in result["ratios"].items():
        if method in TARGETS:  # dpo: no target set, the ratios are shown
            print(f"targets, {method}: {target_line(method, ratio)}")
    print_notes(result["runs"])


def print_notes(runs: dict[str, dict[str, Any]]) -> None:
    print()
    for name, run in runs.items():
        attention = run.get("attention") or {}
        mask = (f"a dense {attention['attn_mask_dtype']} mask {attention['attn_mask']}" if attention.get("attn_mask")
                else f"no mask, is_causal={attention.get('is_causal')}")
        line = (f"{name}: {run['trainable_parameters'] / 1e6:.2f}M trainable, {run['optimizer']}; first sdpa call: "
                f"query {attention.get('query')}, {mask}")
        batch = run.get("batch")
        if batch:
            free = "padding-free" if batch["padding_free"] else "NOT padding-free"
            line += (f"; first batch {free}: input_ids {batch['input_ids']}, {batch.get('sequences')} sequences, "
                     f"keys {', '.join(batch['keys'])}")
            if attention.get("attn_mask") and batch.get("causal_pairs_needed"):
                pairs = attention["attn_mask"][-1] * attention["attn_mask"][-2]
                line += (f"; so attention covers {pairs:,} query-key pairs where the sequences' causal ones are "
                         f"{batch['causal_pairs_needed']:,} ({pairs / batch['causal_pairs_needed']:.1f}x)")
        print(line)
        profile = run.get("profile_s")
        if profile:
            step = run["seconds"] / len(run["step_s"])
            print("  step time: " + ", ".join(f"{k.removeprefix('time_')} {1000 * v:.0f} ms ({100 * v / step:.0f}%)"
                                              for k, v in profile.items()))


def machine(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from importlib import metadata

    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if cpuinfo.is_file() else platform.processor()
    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpus = sorted({r["device_name"] for r in runs.values() if "device_name" in r})
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": gpus[0] if gpus else None, **versions}


def save(label: str, result: dict[str, Any], path: Path) -> None:
    """Merge this run into the results file under `label`, keeping other runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    runs[label] = result
    path.write_text(json.dumps(runs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- main


def ensure_packages(tools: list[str], wheels: Path | None) -> None:
    """TRL, datasets and PEFT are benchmark-only: install them from a local wheel dir when asked and
    missing (a machine without internet), else say how to get them."""
    from importlib.util import find_spec

    if "trl" not in tools:
        return
    wanted = {"trl": TRL_REQUIREMENT, "datasets": "datasets>=3", "peft": "peft>=0.13"}
    missing = [name for name in wanted if find_spec(name) is None]
    if missing and wheels is not None:
        print(f"installing {', '.join(missing)} from {wheels}", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "--no-index", "--find-links", str(wheels), *(wanted[n] for n in missing)])
        missing = [name for name in wanted if find_spec(name) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not installed: pip install -e '.[bench]', or on a machine "
                         "without internet --wheels DIR (a dir made by benchmarks/fetch_bench_wheels.sh); "
                         "or --tools sftlab to time sftlab alone.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", help="override the preset's device (e.g. cpu, to try the gpu preset's path)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 warm-up + 1 timed step, fp32")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="override the preset's (and --smoke's)")
    parser.add_argument("--methods", default="lora,full,dpo", help="comma-separated: lora, full, dpo, orpo, kto")
    parser.add_argument("--tools", default="trl,sftlab", help="comma-separated: trl, sftlab")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default: the preset's)")
    parser.add_argument("--timed-steps", type=int, help="timed steps (default: the preset's)")
    parser.add_argument("--max-length", type=int, help="TRL max_length = sftlab data.max_seq_len")
    parser.add_argument("--batch-size", type=int, help="TRL per_device_train_batch_size = sftlab micro_batch_size")
    parser.add_argument("--conversations", type=int, help="chats in the generated data")
    parser.add_argument("--max-chat-tokens", type=int, help="longest generated chat kept (default 512)")
    parser.add_argument("--threads", type=int, help="torch threads in both tools (default: all cores on CPU)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for the gpu preset's MFU (989: H100/H200 SXM)")
    parser.add_argument("--sftlab-override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra sftlab config override (repeatable), e.g. train.compile=true")
    parser.add_argument("--wheels", type=Path, default=os.environ.get("BENCH_WHEELS") or None,
                        help="install missing trl/datasets/peft from this wheel dir (or $BENCH_WHEELS)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help=f"setup cache (default {CACHE})")
    parser.add_argument("--keep-runs", action="store_true", help="keep the runs' output dirs and logs")
    parser.add_argument("--label", help="name of this run in the results file (default: the preset)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    if args.smoke:
        preset = dataclasses.replace(preset, **SMOKE)
    given = {"device": args.device, "dtype": args.dtype, "warmup_steps": args.warmup_steps,
             "timed_steps": args.timed_steps, "max_length": args.max_length, "batch_size": args.batch_size,
             "conversations": args.conversations, "max_chat_tokens": args.max_chat_tokens}
    preset = dataclasses.replace(preset, **{k: v for k, v in given.items() if v is not None})
    if preset.device == "cpu" and preset.dtype == "bfloat16" and args.dtype is None:
        preset = dataclasses.replace(preset, dtype="float32")  # CPUs train in fp32 here, unless told otherwise
    if preset.warmup_steps < 1 or preset.timed_steps < 1:
        raise SystemExit("--warmup-steps and --timed-steps must be at least 1 (the window starts at a step's end)")
    return preset


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    sys.path.insert(0, str(REPO / "src"))  # a copied checkout without `pip install -e .` runs too
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    preset = resolve_preset(args)
    tools, methods = args.tools.split(","), args.methods.split(",")
    ensure_packages(tools, args.wheels)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare_setup(preset, seed=args.seed, root=args.cache_dir)
    print(f"model: {setup['parameters'] / 1e6:.1f}M parameters ({setup['matmul_parameters'] / 1e6:.1f}M in matmuls)")
    masks = check_masks(setup)
    print(f"labels: sftlab (chatml) and TRL (assistant_only_loss) train the same {masks['trained_tokens']:,} "
          f"tokens of the first {masks['rows']} chats", flush=True)
    if {"dpo", "orpo", "kto"} & set(methods):
        setup["prefs"] = str(preference_pairs(Path(setup["data"]), Path(setup["dir"]) / "prefs.jsonl"))
        masks["pairs"] = check_pairs(setup)
        print(f"pairs: sftlab scores the tokens TRL's DPOTrainer scores but the newline after <|im_end|> "
              f"({masks['pairs']['scored_tokens']:,} tokens of the first {masks['pairs']['rows']} pairs)", flush=True)
    if "kto" in methods:
        setup["feedback"] = str(feedback_rows(Path(setup["prefs"]), Path(setup["dir"]) / "feedback.jsonl"))
    threads = args.threads or (len(os.sched_getaffinity(0)) if preset.device == "cpu" else None)
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=args.cache_dir))
    runs: dict[str, dict[str, Any]] = {}
    try:
        for method in methods:
            for tool in tools:
                name, stem = f"{tool}/{method}", f"{tool}-{method}"
                data = {"dpo": "prefs", "orpo": "prefs", "kto": "feedback"}.get(method, "data")
                spec = RunSpec(tool, method, setup["model"], setup[data], output_dir=str(scratch / stem),
                               result=str(scratch / f"{stem}.json"),
                               dtype=preset.dtype, device=preset.device, max_length=preset.max_length,
                               batch_size=preset.batch_size, warmup_steps=preset.warmup_steps,
                               timed_steps=preset.timed_steps, lr=preset.lr, seed=args.seed, threads=threads,
                               lora_rank=preset.lora_rank, lora_alpha=preset.lora_alpha,
                               extra_overrides=tuple(args.sftlab_override) if tool == "sftlab" else ())
                run_started = time.perf_counter()
                run = run_in_fresh_process(spec, scratch / f"{stem}.log")
                runs[name] = summarize(run, method=method, matmul_parameters=setup["matmul_parameters"],
                                       peak_tflops=args.peak_tflops if args.preset == "gpu" else None)
                print(f"{name}: {runs[name]['tokens_per_s']:,.0f} tok/s, {runs[name]['supervised_tokens_per_s']:,.0f} "
                      f"supervised tok/s, peak RSS {run['peak_rss_mib']:,.0f} MiB "
                      f"({time.perf_counter() - run_started:.0f} s in all)", flush=True)
    finally:
        if not args.keep_runs:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"runs kept in {scratch}")
    settings = {**{k: v for k, v in dataclasses.asdict(preset).items()}, "preset": args.preset, "smoke": args.smoke,
                "seed": args.seed, "threads": threads, "sftlab_overrides": args.sftlab_override}
    result = {"settings": settings, "setup": {**setup, "architecture": preset.architecture}, "label_check": masks,
              "runs": runs, "ratios": ratios(runs), "machine": machine(runs),
              "load_average_1m": [load_before, os.getloadavg()[0]], "wall_s": time.perf_counter() - started}
    print_report(result)
    label = args.label or (f"{args.preset}{' smoke' if args.smoke else ''} on {preset.device}")
    save(label, result, args.output)
    print(f"\ntotal {result['wall_s'] / 60:.1f} min; load average {load_before:.2f} before, "
          f"{result['load_average_1m'][1]:.2f} after; saved to {args.output} as {label!r}")


if __name__ == "__main__":
    main()
