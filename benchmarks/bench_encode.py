"""Benchmark of the data pipeline: JSONL -> validated conversations -> chat template -> masked tokens.

Not a unit test. Generates a JSONL of synthetic SFT conversations shaped like real data (a system prompt,
1-3 turns, long user turns, shorter answers, some unicode and code), then times `build_dataset` on it in a
fresh process and reports conversations/s, tokens/s and the peak RSS of that process, next to its RSS
with only the tokenizer loaded. Results go to a table on stdout and to benchmarks/results/bench_encode.json
(one entry per run label, merged with earlier runs).

Wall-clock rates move with whatever else runs on the machine (the 1-minute load average is recorded
before and after); conversations per CPU-second and the per-stage CPU times hold still, so compare those
across runs, and wall rates only between runs made at a similar load.

    python benchmarks/bench_encode.py                   # 100,000 conversations, Qwen2.5, template auto
    python benchmarks/bench_encode.py --size-gb 1       # a ~1 GB file: peak RSS must not grow with size
    python benchmarks/bench_encode.py --stages 20000    # also time each stage on the first 20k rows
    python benchmarks/bench_encode.py --kind tools -n 20000   # tool-calling conversations (issue 15)
    python benchmarks/bench_encode.py --workers 4       # data.num_workers (CPU and RSS include the workers)
    git archive main src | tar -x -C /tmp/main          # then, old vs new alternately on one file:
    python benchmarks/bench_encode.py --baseline /tmp/main/src --rounds 3

Targets (issue 2): >= 2,000 conversations/s on a 2-core machine; a 1 GB JSONL encodes within 2 GB RSS.
Issue 15: >= 1,500 tool-calling conversations/s on 2 cores with the tokenizer's own template (`--kind
tools`: a row's tools, 1-2 rounds of one or two parallel calls with their JSON results, a final answer,
a third of the answers with reasoning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

ZIPF_EXPONENT = 1.1
REPO = Path(__file__).resolve().parent.parent
TOKENIZERS = REPO / ".cache" / "fixtures" / "tokenizers"
RESULTS = REPO / "benchmarks" / "results" / "bench_encode.json"

COMMON_WORDS = ["the", "of", "and", "to", "a", "in", "is", "that", "it", "for", "as", "with", "was",
                "on", "be", "by", "this", "are", "or", "from", "at", "which", "an", "have", "not",
                "but", "they", "you", "we", "can", "all", "one", "their", "there", "has", "been",
                "if", "more", "when", "will", "would", "who", "so", "no", "about", "what", "up",
                "out", "into", "than", "them", "only", "other", "new", "some", "could", "time",
                "these", "two", "may", "then", "first", "any", "like", "my", "now", "over", "such",
                "our", "made", "after", "also", "did", "many", "before", "must", "through", "back",
                "years", "where", "much", "your", "way", "well", "down", "should", "because",
                "each", "just", "those", "how", "too", "little", "state", "good", "very", "make",
                "world", "still", "own", "see", "men", "work", "long", "get", "here", "between",
                "both", "life", "being", "under", "never", "day", "same", "another", "know",
                "while", "last", "might", "us", "great", "old", "year", "off", "come", "since",
                "against", "go", "came", "right", "used", "take", "three", "model", "data",
                "training", "loss", "gradient", "tokenizer", "function", "value", "error", "result",
                "example", "python", "memory", "layer", "batch", "sequence", "token", "learning",
                "rate"]
UNICODE_WORDS = ["café", "naïve", "über", "façade", "Zürich", "São", "Paulo",
                 "東京", "日本語", "中文", "数据", "模型", "训练", "Привет", "данные",
                 "обучение", "Ελληνικά", "αβγ", "שלום", "مرحبا", "हिन्दी", "😀",
                 "🚀", "✓", "→", "—", "…", "€", "½", "µs", "∑", "ℕ", "Ä", "ø"]
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in as few words as the question allows, and say when unsure.",
    "You are an expert Python programmer. Explain your reasoning, then give working code.",
    "You are a friendly tutor for high-school students. Use simple language and short examples.",
    "Tu es un assistant serviable qui répond en français, de façon claire et précise.",
    "You are a careful research assistant. Cite what you rely on and never invent references.",
    "你是一个乐于助人的助手。请用简洁的中文回答问题。",
    "You are a customer-support agent for an online store. Be polite; never promise refunds.",
)
CODE_SNIPPETS = (
    "```python\ndef mean(values):\n    return sum(values) / len(values)\n```",
    "```python\nfor index, row in enumerate(rows):\n    if not row:\n        continue\n    print(index, row)\n```",
    "```bash\npip install -e '.[test]' && python -m pytest -q\n```",
    "```json\n{\"learning_rate\": 2e-4, \"rank\": 16, \"alpha\": 32}\n```",
)


# ----------------------------------------------------------------------------------------------- data


class TextSource:
    """Deterministic pseudo-text: Zipf-weighted words (common English, synthetic words, some unicode)
    pre-assembled into a pool of sentences, so that writing a message costs one `choices` call."""

    def __init__(self, seed: int, *, vocabulary: int = 30_000, sentences: int = 50_000) -> None:
        self.rng = random.Random(seed)
        syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
        synthetic = {"".join(self.rng.choices(syllables, k=self.rng.randint(1, 2)))
                     for _ in range(vocabulary)}
        rare = sorted(synthetic) + UNICODE_WORDS
        self.rng.shuffle(rare)  # unicode words get ranks among the synthetic ones
        words = COMMON_WORDS + rare
        # Zipf's law, steep enough that the common words are about half the text, as in English prose.
        cumulative = list(accumulate(1.0 / (rank + 2) ** ZIPF_EXPONENT for rank in range(len(words))))
        self.sentences: list[str] = []
        self.sentence_words: list[int] = []
        for _ in range(sentences):
            count = self.rng.randint(6, 24)
            picked = self.rng.choices(words, cum_weights=cumulative, k=count)
            if self.rng.random() < 0.2:
                picked[self.rng.randrange(count)] = str(self.rng.randint(0, 10_000))
            if self.rng.random() < 0.3:
                picked[self.rng.randrange(count - 1)] += ","
            end = self.rng.choices((".", "?", "!", ":"), (80, 10, 5, 5))[0]
            self.sentences.append(" ".join(picked).capitalize() + end)
            self.sentence_words.append(count)
        self.mean_words = sum(self.sentence_words) / len(self.sentence_words)

    def paragraph(self, min_words: int, max_words: int, *, code: float = 0.0) -> str:
        """About `min_words`..`max_words` words of sentences, broken into paragraphs; no edge whitespace."""
        target = self.rng.randint(min_words, max_words)
        picked = self.rng.choices(self.sentences, k=max(1, round(target / self.mean_words)))
        parts, current = [], []
        for sentence in picked:
            current.append(sentence)
            if self.rng.random() < 0.15:
                parts.append(" ".join(current))
                current = []
        if current:
            parts.append(" ".join(current))
        if self.rng.random() < code:
            parts.insert(self.rng.randint(0, len(parts)), self.rng.choice(CODE_SNIPPETS))
        return "\n\n".join(parts)

    def conversation(self) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)}]
        for _ in range(self.rng.choices((1, 2, 3), (50, 30, 20))[0]):
            messages.append({"role": "user", "content": self.paragraph(50, 300, code=0.05)})
            messages.append({"role": "assistant", "content": self.paragraph(20, 150, code=0.15)})
        return {"messages": messages}


TOOL_SCHEMAS = tuple(
    {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {arg: {"type": kind, "description": f"The {arg}."} for arg, kind in args},
        "required": [args[0][0]]}}}
    for name, description, args in (
        ("get_weather", "Current weather for a city.", (("city", "string"), ("unit", "string"))),
        ("search_docs", "Full-text search in the product documentation.", (("query", "string"), ("limit", "integer"))),
        ("order_status", "Status and delivery date of an order.", (("order_id", "string"),)),
        ("convert_currency", "Convert an amount between currencies.",
         (("amount", "number"), ("from", "string"), ("to", "string"))),
    ))


def tool_conversation(source: TextSource) -> dict[str, Any]:
    """A function-calling row as OpenAI-style datasets hold it: tools, calls with null content, results."""
    rng = source.rng
    tools = rng.sample(TOOL_SCHEMAS, k=rng.randint(2, 4))
    messages: list[dict[str, Any]] = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                                      {"role": "user", "content": source.paragraph(15, 80)}]
    for round_ in range(rng.choice((1, 1, 2))):
        calls = []
        for number in range(rng.choice((1, 1, 2))):
            function = rng.choice(tools)["function"]
            properties = function["parameters"]["properties"]
            arguments = {arg: (rng.randint(1, 500) if spec["type"] in ("integer", "number")
                               else source.paragraph(1, 4)[:40]) for arg, spec in properties.items()}
            calls.append({"type": "function", "id": f"call_{round_}_{number}",
                          "function": {"name": function["name"], "arguments": arguments}})
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": call["id"],
                      "content": json.dumps({"result": source.paragraph(5, 40), "ok": True}, ensure_ascii=False)}
                     for call in calls]
    answer: dict[str, Any] = {"role": "assistant", "content": source.paragraph(20, 120)}
    if rng.random() < 1 / 3:
        answer["reasoning_content"] = source.paragraph(20, 80)
    messages.append(answer)
    return {"tools": tools, "messages": messages}


def generate(path: Path, *, conversations: int | None, size_bytes: int | None, seed: int,
             kind: str = "chat") -> tuple[int, int]:
    """Write conversations to `path` until `conversations` rows or `size_bytes` bytes; (rows, bytes)."""
    source = TextSource(seed)
    make = source.conversation if kind == "chat" else lambda: tool_conversation(source)
    rows = written = 0
    with path.open("wb", buffering=1 << 22) as file:
        while (conversations is None or rows < conversations) and (size_bytes is None or written < size_bytes):
            line = (json.dumps(make(), ensure_ascii=False) + "\n").encode("utf-8")
            file.write(line)
            rows += 1
            written += len(line)
    return rows, written


# ---------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildSpec:
    data_path: str
    tokenizer: str
    template: str
    max_seq_len: int | str | None
    """A number, None (no limit) or "default" (DataConfig's)."""
    cache_dir: str | None
    """None: build uncached (a scratch dir); else a fresh cache dir, so the key's file hash is timed too."""
    stages: int
    profile: str | None
    src: str | None = None
    """Another sftlab source tree (its `src` dir) to time instead of this checkout's (--baseline)."""
    workers: int | str | None = None
    """data.num_workers (None: DataConfig's default, auto)."""


def _memory_mib() -> dict[str, float]:
    """This process's resident set now (VmRSS) and its peak (VmHWM), in MiB. VmHWM belongs to the
    address space, so a spawned child starts from zero, unlike ru_maxrss which survives exec."""
    status = Path("/proc/self/status")
    if not status.is_file():  # not Linux: ru_maxrss is the best there is (bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)
        return {"rss": peak, "peak": peak}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024}


def _children_rss_mib() -> float:
    """RSS of this process's child processes (the encoding workers of data.num_workers), in MiB."""
    total = 0.0
    for task in Path("/proc/self/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # it just ended
            total += next((int(line.split()[1]) / 1024 for line in status.splitlines()
                           if line.startswith("VmRSS:")), 0.0)
    return total


class RssSampler:
    """Samples the RSS of this process and its workers every `interval` seconds on a thread, to show whether
    memory grows during the build (it must not, whatever the file size) rather than only its peak."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(_memory_mib()["rss"] + _children_rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def by_tenth(self) -> list[float]:
        """Highest RSS in each tenth of the run, in MiB."""
        n = len(self.samples)
        return [max(self.samples[i * n // 10:max((i + 1) * n // 10, i * n // 10 + 1)]) for i in range(10)] if n else []


def _cpu_s() -> float:
    """CPU seconds of this process so far, all threads (the tokenizer's Rust threads included), and of its
    child processes that ended (the encoding workers, which end with the build)."""
    usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def run_build(spec: BuildSpec) -> dict[str, Any]:
    """In this (fresh) process: load the tokenizer, build the dataset, report time, sizes and memory."""
    if spec.src:
        sys.path.insert(0, spec.src)
    from sftlab.config import DataConfig
    from sftlab.data.dataset import build_dataset
    from sftlab.data.encode import Encoder
    from sftlab.data.templates import load_template
    from sftlab.models.load import load_tokenizer

    source = source_digest(Path(spec.src) if spec.src else None)  # before the build: src/ may change meanwhile
    started = time.perf_counter()
    tokenizer = load_tokenizer(spec.tokenizer)
    baseline = _memory_mib()["rss"]
    template = load_template(spec.template, tokenizer)
    length = {} if spec.max_seq_len == "default" else {"max_seq_len": spec.max_seq_len}
    workers = {} if spec.workers is None else {"num_workers": spec.workers}
    if workers and "num_workers" not in {f.name for f in dataclasses.fields(DataConfig)}:
        workers = {}  # an older tree (--baseline): it encodes in one process
    data = DataConfig(template=spec.template, cache=spec.cache_dir is not None, cache_dir=spec.cache_dir,
                      **length, **workers)
    encoder = Encoder(tokenizer, template, train_on=data.train_on, max_seq_len=data.max_seq_len,
                      truncation=data.truncation, add_special_tokens=data.add_special_tokens,
                      special_tokens_in_content=data.special_tokens_in_content)
    setup_s = time.perf_counter() - started
    with_encoder = _memory_mib()["rss"]
    profiler = None
    if spec.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    load_before, cpu_before = os.getloadavg()[0], _cpu_s()
    started = time.perf_counter()
    with RssSampler() as rss:
        dataset = build_dataset(spec.data_path, data, encoder)
    build_s = time.perf_counter() - started
    cpu_s, load_after = _cpu_s() - cpu_before, os.getloadavg()[0]
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec.profile)
    memory = _memory_mib()
    stats = dataset.stats
    result = {
        "sftlab_source": source, "max_seq_len": data.max_seq_len,
        "setup_s": setup_s, "build_s": build_s, "build_cpu_s": cpu_s, "load_average_1m": [load_before, load_after],
        "rows": stats.rows, "examples": stats.examples, "rejected": stats.rejected,
        "tokens": stats.tokens, "trained_tokens": stats.trained_tokens,
        "rss_tokenizer_mib": baseline, "rss_encoder_mib": with_encoder, "rss_end_mib": memory["rss"],
        "peak_rss_mib": max([memory["peak"], *rss.samples]), "peak_rss_parent_mib": memory["peak"],
        "rss_by_tenth_mib": rss.by_tenth(), "num_workers": data.__dict__.get("num_workers", 1),
    }
    if spec.stages:
        result["stages_cpu_ms"] = time_stages(spec, encoder, data, cpu_s * 1000 / stats.rows)
    return result


STAGES = ("read, convert, validate", "Jinja render (x2)", "spans, segments",
          "tokenizer (tiktoken or Rust, all threads)", "labels")


def time_stages(spec: BuildSpec, encoder: Any, data: Any, build_cpu_ms: float) -> dict[str, Any]:
    """CPU milliseconds per conversation of each stage, over the first `spec.stages` rows in batches of
    512 as the build runs them. CPU time, not wall time, so that it holds still when other processes load
    the machine. Each stage is timed on one thread; the tokenizer's as the build calls it (all threads:
    Rust's pool, and the token cache's lookups on the calling thread, from a fresh cache). `other` is the
    build's CPU per conversation (all threads) less the stages: writing the arrays, freeing each batch,
    thread hand-offs.
    Reaches into Encoder internals on purpose: a diagnostic, not an API; if they changed, it says so."""
    from sftlab.data.formats import read_conversations

    spent = dict.fromkeys(STAGES, 0.0)
    count = 0
    if getattr(encoder, "_pieces", None) is not None:  # a fresh token cache, as the build started with
        encoder._pieces = type(encoder._pieces).create(encoder._backend)
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as scratch:
        head = Path(scratch) / "head.jsonl"
        with open(spec.data_path, "rb") as source:
            head.write_bytes(b"".join(islice(source, spec.stages)))
        conversations = read_conversations(head, format=data.format)
        try:
            while batch := _timed(spent, STAGES[0], lambda: list(islice(conversations, 512))):
                count += len(batch)
                _time_batch(encoder, batch, spent)
        except (AttributeError, TypeError, ValueError) as exc:  # Encoder internals changed under us
            return {"error": f"stage timing needs updating to sftlab's Encoder: {type(exc).__name__}: {exc}"}
    stages = {name: seconds * 1000 / count for name, seconds in spent.items()}
    stages["other: write, free, thread hand-offs"] = build_cpu_ms - sum(stages.values())
    return {"conversations": count, **stages}


def _timed(spent: dict[str, float], stage: str, work: Any) -> Any:
    started = time.thread_time()
    value = work()
    spent[stage] += time.thread_time() - started
    return value


def _time_batch(encoder: Any, batch: list[Any], spent: dict[str, float]) -> None:
    template, train_on = encoder.template, encoder.train_on
    plain = [[{"role": m.role, "content": m.content} for m in c.messages] for c in batch]
    # render() renders twice (real contents, then sentinels) and maps spans; time one plain render apart.
    one_render = {STAGES[1]: 0.0}
    _timed(one_render, STAGES[1], lambda: [template.render_text(messages) for messages in plain])
    rendered = _timed(spent, STAGES[2], lambda: [template.render(c, train_on) for c in batch])
    spent[STAGES[1]] += 2 * one_render[STAGES[1]]
    spent[STAGES[2]] -= 2 * one_render[STAGES[1]]
    texts = ["".join(segment.text for segment in segments) for segments in rendered]
    started = time.process_time()  # as the build calls it: all threads, the token cache's lookups included
    tokenized = encoder._tokenize(texts)
    spent[STAGES[3]] += time.process_time() - started
    _timed(spent, STAGES[4], lambda: [encoder._label(c.where, segments, *pair)
                                      for c, segments, pair in zip(batch, rendered, tokenized, strict=True)])


def _child(spec: BuildSpec, connection: Any) -> None:
    try:
        connection.send(("ok", run_build(spec)))
    except Exception as exc:  # report it in the parent, which prints it
        connection.send(("error", f"{type(exc).__name__}: {exc}"))


def build_in_fresh_process(spec: BuildSpec) -> dict[str, Any]:
    """`run_build` in a spawned interpreter, so nothing the parent did (generating the data) is in its
    peak RSS."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(spec, sender))
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "the build process died without a result (killed for memory?)"
    process.join()
    if status != "ok":
        raise SystemExit(f"build failed: {payload}")
    return payload


# --------------------------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    from importlib import metadata

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    versions = {}
    for package in ("tokenizers", "transformers", "jinja2", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu, "python": platform.python_version(), **versions}


def source_digest(src: Path | None = None) -> str:
    """Digest of sftlab's source: src/ changes between runs, and a number belongs to the code it timed."""
    import hashlib

    src = src or REPO / "src"
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted((src / "sftlab").rglob("*.py")):
        digest.update(path.relative_to(src.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def summarize(args: argparse.Namespace, data: dict[str, Any], build: dict[str, Any]) -> dict[str, Any]:
    seconds = build["build_s"]
    return {
        "tokenizer": args.tokenizer, "template": args.template, "source_kind": args.reader,
        "conversations_kind": args.kind,
        "cached_build": args.cache, "file_bytes": data["bytes"], "file_conversations": data["rows"],
        "generate_s": data["generate_s"], **build,
        "conversations_per_s": build["rows"] / seconds, "tokens_per_s": build["tokens"] / seconds,
        "mb_per_s": data["bytes"] / 1e6 / seconds, "machine": machine(),
    }


def print_table(label: str, result: dict[str, Any]) -> None:
    rows = [
        ("run", label),
        ("tokenizer / template", f"{result['tokenizer']} / {result['template']}"),
        ("file", f"{result['file_bytes'] / 1e6:,.1f} MB, {result['file_conversations']:,} conversations"),
        ("examples / rejected", (f"{result['examples']:,} / {sum(result['rejected'].values()):,} "
                                 f"{result['rejected'] or ''}")),
        ("tokens (trained)", f"{result['tokens']:,} ({result['trained_tokens']:,})"),
        ("build time", (f"{result['build_s']:,.1f} s wall, {result['build_cpu_s']:,.1f} s CPU "
                        f"(+ {result['setup_s']:.1f} s tokenizer/template load)")),
        ("load average (1 min)", "{:.2f} before, {:.2f} after".format(*result["load_average_1m"])),
        ("conversations/s", (f"{result['conversations_per_s']:,.0f} "
                             f"({result['rows'] / result['build_cpu_s']:,.0f} per CPU-second)")),
        ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
        ("MB/s of JSONL", f"{result['mb_per_s']:,.2f}"),
        ("RSS, tokenizer loaded", (f"{result['rss_tokenizer_mib']:,.0f} MiB "
                                   f"({result['rss_encoder_mib']:,.0f} MiB with template and Encoder)")),
        ("peak RSS of the build", (f"{result['peak_rss_mib']:,.0f} MiB (all processes, sampled; the parent's "
                                   f"own peak {result.get('peak_rss_parent_mib', result['peak_rss_mib']):,.0f} MiB; "
                                   f"data.num_workers={result.get('num_workers', 1)})")),
        ("RSS by tenth of the build", " ".join(f"{mib:,.0f}" for mib in result["rss_by_tenth_mib"]) + " MiB"),
        ("machine", ("{nproc} CPUs ({cpu}), Python {python}, tokenizers {tokenizers}, "
                     "transformers {transformers}").format(**result["machine"])),
    ]
    stages = dict(result.get("stages_cpu_ms", {}))
    if "error" in stages:
        rows.append(("CPU per conversation", stages["error"]))
    elif stages:
        rows.append(("CPU per conversation", f"by stage, over the first {stages.pop('conversations'):,} rows"))
        total = sum(stages.values())
        rows += [(f"  {name}", f"{ms:.3f} ms  {100 * ms / total:4.1f}%") for name, ms in stages.items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def save(label: str, result: dict[str, Any], path: Path) -> None:
    """Merge this run into the results file under `label`, keeping other runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    runs[label] = result
    path.write_text(json.dumps(runs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- main


def _seq_len(text: str) -> int | str | None:
    return None if text == "none" else text if text == "default" else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("-n", "--conversations", type=int, default=100_000, help="rows to generate (default 100,000)")
    size.add_argument("--size-gb", type=float, help="generate a file of about this many GB instead")
    parser.add_argument("--data", type=Path, help="benchmark this existing JSONL instead of generating one")
    parser.add_argument("--kind", choices=("chat", "tools"), default="chat",
                        help="chat conversations, or tool-calling ones (tools, calls, results, some reasoning)")
    parser.add_argument("--as", dest="reader", choices=("jsonl", "parquet-dir", "arrow"), default="jsonl",
                        help="read the data as JSONL (sftlab's reader), as a dataset dir of parquet shards (a Hub "
                             "dataset's layout) or as one .arrow file (both through `datasets`, streamed)")
    parser.add_argument("--tokenizer", default="qwen2_5", help="fixture name (qwen2_5, llama3_2, gemma3) or a dir")
    parser.add_argument("--template", default="auto", help="chatml, llama3, auto or a .jinja file")
    parser.add_argument("--max-seq-len", type=_seq_len, default="default",
                        help="data.max_seq_len: a number, none, or default (DataConfig's default)")
    parser.add_argument("--cache", action="store_true",
                        help="build through a fresh temporary cache (times hashing the file too)")
    parser.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default=None,
                        help="data.num_workers: auto (the default) or a number of encoding processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the generated file goes (deleted afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--stages", type=int, default=0, metavar="ROWS",
                        help="also time each pipeline stage on the first ROWS rows")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the build to this .prof file")
    parser.add_argument("--label", help="name of this run in the results file (default from the size)")
    parser.add_argument("--baseline", type=Path, metavar="SRC",
                        help="also time another sftlab source tree (e.g. main's src, from `git archive main src`), "
                             "alternately with this one on the same file: on a shared machine only a comparison "
                             "made in one run means anything")
    parser.add_argument("--rounds", type=int, default=1, help="with --baseline: baseline/this pairs to run (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    return parser.parse_args(argv)


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.data is not None:
        with args.data.open("rb") as file:
            rows = sum(1 for _ in file)
        return {"path": args.data, "rows": rows, "bytes": args.data.stat().st_size, "generate_s": 0.0}
    size_bytes = int(args.size_gb * 1e9) if args.size_gb else None
    conversations = None if size_bytes else args.conversations
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    # A unique name: runs of this benchmark by other people on the same machine must not share a file.
    handle, name = tempfile.mkstemp(prefix=f"bench-encode-{args.size_gb or conversations}-seed{args.seed}-",
                                    suffix=".jsonl", dir=args.workdir)
    os.close(handle)
    path = Path(name)
    started = time.perf_counter()
    rows, written = generate(path, conversations=conversations, size_bytes=size_bytes, seed=args.seed,
                             kind=args.kind)
    elapsed = time.perf_counter() - started
    print(f"generated {path}: {rows:,} conversations, {written / 1e6:,.1f} MB in {elapsed:.1f} s", flush=True)
    return {"path": path, "rows": rows, "bytes": written, "generate_s": elapsed}


CONVERT_ROWS = 5_000
"""Rows per parquet shard / arrow record batch when converting (memory stays flat in the file size)."""


def convert(data: dict[str, Any], kind: str, *, keep_jsonl: bool) -> dict[str, Any]:
    """The JSONL rewritten as a dataset dir of parquet shards with a README `configs:` section (as on the Hub),
    or as one .arrow IPC stream file (as `datasets` writes them), in chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source: Path = data["path"]
    target = source.with_name(source.stem + (".dir" if kind == "parquet-dir" else ".arrow"))
    started = time.perf_counter()
    schema = writer = None
    shard = 0
    if kind == "parquet-dir":
        (target / "data").mkdir(parents=True)
        (target / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                          "    path: data/*.parquet\n---\n", encoding="utf-8")
    with source.open("rb") as file:
        while chunk := list(islice(file, CONVERT_ROWS)):
            table = pa.Table.from_pylist([json.loads(line) for line in chunk], schema=schema)
            schema = table.schema
            if kind == "parquet-dir":
                pq.write_table(table, target / "data" / f"train-{shard:05d}.parquet")
            else:
                writer = writer or pa.ipc.new_stream(str(target), schema)
                writer.write_table(table)
            shard += 1
    if writer is not None:
        writer.close()
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) if target.is_dir() else target.stat().st_size
    elapsed = time.perf_counter() - started
    print(f"converted to {target}: {size / 1e6:,.1f} MB in {elapsed:.1f} s", flush=True)
    if not keep_jsonl:
        source.unlink(missing_ok=True)
    return {**data, "path": target, "bytes": size, "jsonl_bytes": data["bytes"], "convert_s": elapsed}


def remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer_dir = TOKENIZERS / args.tokenizer
    tokenizer = str(tokenizer_dir) if tokenizer_dir.is_dir() else args.tokenizer
    data = prepare_data(args)
    label = args.label or (f"{args.size_gb:g} GB" if args.size_gb else f"{data['rows']:,} conversations")
    label += f"{' (tools)' if args.kind == 'tools' else ''} / {args.tokenizer} / {args.template}"
    label += "" if args.reader == "jsonl" else f" / {args.reader}"
    if args.reader != "jsonl":
        data = convert(data, args.reader, keep_jsonl=args.data is not None or args.keep)
    trees = [None] if args.baseline is None else [str(args.baseline.resolve()), None] * args.rounds
    results = []
    try:
        for number, src in enumerate(trees):
            with tempfile.TemporaryDirectory(prefix="bench-encode-cache-") as cache_dir:
                spec = BuildSpec(str(data["path"]), tokenizer, args.template, args.max_seq_len,
                                 cache_dir if args.cache else None, args.stages,
                                 str(args.profile) if args.profile else None, src, args.workers)
                result = summarize(args, data, build_in_fresh_process(spec))
            name = label if args.baseline is None else f"{label} / {'baseline' if src else 'this'} {number // 2 + 1}"
            print_table(name, result)
            save(name, result, args.output)
            results.append((src, result))
    finally:
        if args.data is None and not args.keep:
            remove(data["path"])
    if args.baseline is not None:
        print_comparison(results)
    print(f"saved to {args.output}")


def print_comparison(results: list[tuple[str | None, dict[str, Any]]]) -> None:
    """Median conversations/s (wall and per CPU-second) and peak RSS of the baseline and of this tree."""
    for name, tree in (("baseline", True), ("this tree", False)):
        runs = [r for src, r in results if bool(src) == tree]
        wall = statistics.median(r["conversations_per_s"] for r in runs)
        cpu = statistics.median(r["rows"] / r["build_cpu_s"] for r in runs)
        peak = max(r["peak_rss_mib"] for r in runs)
        print(f"{name:<10} {wall:,.0f} conversations/s, {cpu:,.0f} per CPU-second, peak RSS {peak:,.0f} MiB "
              f"(median of {len(runs)})")


if __name__ == "__main__":
    main()
