"""How fast bad input fails: `sftlab train` on broken input, timed to its non-zero exit, in a fresh process.

Not a unit test. Cases: a data file of N conversations (default 90,000) whose last row has a typo in a
role, an unknown config key, and a model dir whose weights file is truncated. Each runs `python -m sftlab
train` as a user would and reports the wall seconds to the error, with the process's own start-up (Python,
torch and transformers imports: `python -c "import sftlab.train.setup"`) shown apart. For scale it also
times what the errors spare: encoding the same file without the typo (the work a late error would waste)
and loading the model's weights. The model is SmolLM2-135M (the GGUF `make fixtures` fetches, converted once
into the sftlab cache); with a bigger model the load that the early errors avoid only grows.

Memory: one giant row (default 200 MB: one assistant message of that many characters) among 2,000 good rows,
`sftlab train` for one step with data.on_bad_row=skip (the row is rejected unread; training goes on) and
with the default error (exit naming file:line), each one's peak RSS (getrusage of a fresh wrapper process's
children) beside the same file without the giant row. Before the row limit this ran into the OOM killer.

    python benchmarks/bench_fail_fast.py            # 90,000 rows, and the 200 MB row
    python benchmarks/bench_fail_fast.py --rows 500000
    python benchmarks/bench_fail_fast.py --giant-only --giant-mb 200

Results: a table on stdout and benchmarks/results/bench_fail_fast.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / ".cache" / "fixtures" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ROW = {"messages": [{"role": "system", "content": "You are Brightwell Home's support agent. Answer briefly."},
                    {"role": "user", "content": "When is the store open on Sundays, and on public holidays?"},
                    {"role": "assistant", "content": "Sundays from 10 am to 4 pm; on public holidays we are closed."}]}
TYPO = {"messages": [{"role": "user", "content": "Hi"}, {"role": "asistant", "content": "Hello."}]}


def timed(args: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    return time.perf_counter() - started, done


def train(config: Path, *overrides: str) -> tuple[float, str, int]:
    seconds, done = timed([sys.executable, "-m", "sftlab", "train", str(config), *overrides])
    message = next((line for line in done.stderr.splitlines() if line.startswith("error:")), done.stderr[-300:])
    return seconds, message, done.returncode


MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(rc)")


def peak_train(config: Path, *overrides: str) -> dict[str, object]:
    """`sftlab train` in a fresh wrapper process: seconds, exit status, peak RSS (MB), the error line."""
    seconds, done = timed([sys.executable, "-c", MEASURE, sys.executable, "-m", "sftlab", "train", str(config),
                           *overrides])
    peak_kb = int(done.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    message = next((line for line in done.stderr.splitlines() if line.startswith("error:")), "")
    return {"seconds": round(seconds, 2), "exit": done.returncode, "peak_rss_mb": round(peak_kb / 1024, 1),
            "message": message[:200]}


def giant_row(root: Path, model: Path, megabytes: int, good_rows: int = 2000) -> dict[str, object]:
    """Peak RSS of training on good rows with and without one `megabytes` MB row in their middle."""
    plain, giant = root / "plain.jsonl", root / "giant.jsonl"
    line = (json.dumps(ROW) + "\n").encode()
    plain.write_bytes(line * good_rows)
    with giant.open("wb") as file:  # written in pieces: the benchmark itself never holds the row
        file.write(line * (good_rows // 2))
        file.write(b'{"messages": [{"role": "user", "content": "Summarise this."}, {"role": "assistant", "content": "')
        for _ in range(megabytes):
            file.write(b"x" * (1 << 20))
        file.write(b'"}]}\n' + line * (good_rows - good_rows // 2))
    config = root / "giant-config.yaml"
    config.write_text("method: lora\ndata:\n  cache: false\ntrain:\n  max_steps: 1\n  micro_batch_size: 1\n",
                      encoding="utf-8")
    common = (f"model={model}",)
    runs = {
        "without the row": peak_train(config, *common, f"data.train={plain}", f"output_dir={root / 'g0'}",
                                      "data.on_bad_row=skip"),
        "with it, on_bad_row=skip": peak_train(config, *common, f"data.train={giant}", f"output_dir={root / 'g1'}",
                                               "data.on_bad_row=skip"),
        "with it, on_bad_row=error": peak_train(config, *common, f"data.train={giant}", f"output_dir={root / 'g2'}"),
    }
    rejects = root / "g1" / "rejects.jsonl"
    base = runs["without the row"]["peak_rss_mb"]
    return {"row_mb": megabytes, "good_rows": good_rows, "giant_file_mb": round(giant.stat().st_size / 2**20, 1),
            "runs": runs, "peak_rss_above_without_mb": {name: round(run["peak_rss_mb"] - base, 1)
                                                       for name, run in runs.items()},
            "rejects": [json.loads(r)["reason"] + " @ " + json.loads(r)["where"].rsplit(":", 1)[-1]
                        for r in rejects.read_text(encoding="utf-8").splitlines()] if rejects.is_file() else []}


def print_giant(result: dict[str, object]) -> None:
    print(f"\none {result['row_mb']} MB row among {result['good_rows']:,} good rows "
          f"({result['giant_file_mb']} MB file), sftlab train, 1 step:")
    print(f"{'run':<28} {'exit':>5} {'peak RSS MB':>12} {'above without':>14} {'s':>7}  message")
    for name, run in result["runs"].items():
        print(f"{name:<28} {run['exit']:>5} {run['peak_rss_mb']:>12.1f} "
              f"{result['peak_rss_above_without_mb'][name]:>14.1f} {run['seconds']:>7.1f}  {run['message'][:80]}")
    print(f"rejects.jsonl of the skip run: {result['rejects']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=90_000)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "bench_fail_fast.json")
    parser.add_argument("--giant-mb", type=int, default=200, help="size of the giant row (0: leave the case out)")
    parser.add_argument("--giant-only", action="store_true", help="run only the giant-row memory case")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from sftlab.models.gguf import model_dir_for

    model = Path(model_dir_for(str(GGUF)))
    results: dict[str, object] = {"rows": args.rows, "machine": f"{platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                                  "load_average": os.getloadavg()[0]}
    if args.giant_only:
        with tempfile.TemporaryDirectory(prefix="bench-fail-fast-") as tmp:
            results["giant_row"] = giant_row(Path(tmp), model, args.giant_mb)
        print_giant(results["giant_row"])
        save(results, args.output)
        return
    with tempfile.TemporaryDirectory(prefix="bench-fail-fast-") as tmp:
        root = Path(tmp)
        good, bad = root / "good.jsonl", root / "bad.jsonl"
        lines = json.dumps(ROW) + "\n"
        good.write_text(lines * args.rows, encoding="utf-8")
        bad.write_text(lines * (args.rows - 1) + json.dumps(TYPO) + "\n", encoding="utf-8")
        config = root / "config.yaml"
        config.write_text("method: lora\ndata:\n  cache: false\n", encoding="utf-8")
        broken_model = root / "broken-model"
        shutil.copytree(model, broken_model)
        weights = broken_model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        common = (f"model={model}", f"output_dir={root / 'run'}")
        startup, _ = timed([sys.executable, "-c", "import sftlab.train.setup"])
        cases = {
            f"typo on line {args.rows:,} of {args.rows:,}": train(config, *common, f"data.train={bad}"),
            "unknown config key": train(config, *common, f"data.train={bad}", "train.lrr=1e-4"),
            "truncated model.safetensors": train(config, f"model={broken_model}", f"output_dir={root / 'run2'}",
                                                 f"data.train={good}"),
        }
        # What a late error wastes: the whole file encoded, and the weights loaded.
        _, done = timed([sys.executable, "-c", (
            "import sys, time; sys.argv=['x']; from sftlab.config import load_config; "
            "from sftlab.data.dataset import build_dataset; from sftlab.data.encode import Encoder; "
            "from sftlab.data.templates import load_template; from sftlab.models.load import load_tokenizer; "
            f"cfg = load_config(overrides=['model={model}', 'data.cache=false']); "
            "tok = load_tokenizer(cfg.model.path); t = time.perf_counter(); "
            "build_dataset(" + repr(str(good)) + ", cfg.data, Encoder(tok, load_template('auto', tok), "
            "max_seq_len=2048)); print(time.perf_counter() - t)")])
        _, loaded = timed([sys.executable, "-c", (
            "import time; from sftlab.config import ModelConfig; from sftlab.models.load import load_model; "
            f"t = time.perf_counter(); import torch; "
            f"load_model(ModelConfig(path={str(model)!r}), device=torch.device('cpu')); "
            "print(time.perf_counter() - t)")])
        if args.giant_mb:
            results["giant_row"] = giant_row(root, model, args.giant_mb)
    results["startup_s"] = round(startup, 2)
    results["cases"] = {name: {"seconds": round(s, 2), "exit": code, "message": message[:160]}
                        for name, (s, message, code) in cases.items()}
    results["encode_good_file_s"] = (round(float(done.stdout.strip().splitlines()[-1]), 2)
                                     if done.returncode == 0 else None)
    results["load_weights_s"] = (round(float(loaded.stdout.strip().splitlines()[-1]), 2)
                                 if loaded.returncode == 0 else None)
    print(f"{'case':<40} {'s to exit':>10} {'exit':>5}  message")
    for name, case in results["cases"].items():
        print(f"{name:<40} {case['seconds']:>10.2f} {case['exit']:>5}  {case['message'][:90]}")
    print(f"process start-up (imports) alone: {results['startup_s']:.2f} s; encoding the good file: "
          f"{results['encode_good_file_s']} s; loading the weights: {results['load_weights_s']} s "
          f"(load average {results['load_average']:.2f})")
    if "giant_row" in results:
        print_giant(results["giant_row"])
    save(results, args.output)


def save(results: dict[str, object], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"saved to {output}")


if __name__ == "__main__":
    main()
