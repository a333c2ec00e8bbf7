#!/usr/bin/env bash
# Download the wheels that benchmarks/bench_vs_trl.py needs beyond torch, transformers and sftlab's own
# dependencies (TRL, datasets, PEFT and what they pull in) for a machine without internet: by default CPython
# 3.12 on manylinux x86_64, the GPU machines. There, run
#     python benchmarks/bench_vs_trl.py --preset gpu --wheels DIR
# and the benchmark installs what is missing with `pip install --no-index --find-links DIR`.
#
#     bash benchmarks/fetch_bench_wheels.sh [DIR]          # DIR defaults to .cache/bench-wheels
#     SKIP="pyarrow pandas" bash benchmarks/fetch_bench_wheels.sh DIR   # the target has these already
#     ALL=1 bash benchmarks/fetch_bench_wheels.sh DIR      # everything but torch/CUDA (~100 MB)
#
# By default, what any machine with torch + transformers (+ huggingface_hub) has is left out; then the set is
# ~68 MB, 54 of them pyarrow and 12 pandas (datasets needs pyarrow >= 24). If pip on the target then says
# "No matching distribution" for something, fetch again with ALL=1.
# How: pip resolves the whole set for the target platform without installing anything (--dry-run --report),
# then each resolved package but the excluded ones is downloaded at its resolved version, without deps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR="${1:-.cache/bench-wheels}"
PYTHON="${PYTHON:-python3}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
ABI="cp${PYTHON_VERSION/./}"
# Keep in step with the `bench` extra of pyproject.toml.
REQUIREMENTS=("trl==1.16.0" "datasets>=3" "peft>=0.13")
# torch and CUDA: gigabytes, and installed wherever a GPU benchmark runs. Never downloaded.
EXCLUDE='torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|setuptools'
if [[ -z "${ALL:-}" ]]; then
    # What transformers, huggingface_hub and torch require, so present next to them.
    EXCLUDE+='|transformers|tokenizers|safetensors|numpy|regex|packaging|pyyaml|tqdm|filelock|fsspec|jinja2|markupsafe'
    EXCLUDE+='|typing[-_]extensions|huggingface[-_]hub|hf[-_]xet|httpx2?|httpcore2?|h11|anyio|idna|certifi|sniffio'
    EXCLUDE+='|truststore|click|typer|shellingham|rich|markdown-it-py|mdurl|pygments|annotated[-_]doc'
    EXCLUDE+='|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection'
fi
for name in ${SKIP:-}; do EXCLUDE+="|$name"; done
EXCLUDE="^($EXCLUDE)\$"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
TARGET=(--only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" --abi "$ABI" --abi abi3
        --abi none "${PLATFORMS[@]}" --platform any)

mkdir -p "$DIR"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

"$PYTHON" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --target "$scratch/target" \
    --report "$scratch/report.json" "${TARGET[@]}" "${REQUIREMENTS[@]}"

"$PYTHON" - "$scratch/report.json" "$EXCLUDE" > "$scratch/pins.txt" <<'EOF'
import json, re, sys
report, exclude = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not exclude.match(name.lower()):
        print(f"{name}=={version}")
EOF

"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --dest "$DIR" "${TARGET[@]}" -r "$scratch/pins.txt"
echo "$(wc -l < "$scratch/pins.txt") wheels in $DIR ($(du -sh "$DIR" | cut -f1)): $(tr '\n' ' ' < "$scratch/pins.txt")"
