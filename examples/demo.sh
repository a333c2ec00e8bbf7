#!/usr/bin/env bash
# `make demo`, for now: the data pipeline on a real tokenizer (Qwen2.5's, with its own chat template).
# The fine-tuning demo (a real model turned into a support agent) lands with the training engine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SFTLAB=".venv/bin/sftlab"
MODEL=".cache/fixtures/tokenizers/qwen2_5"
DATA="examples/data/chat.jsonl"
echo "== sftlab check: what would training learn from $DATA?"
mkdir -p runs/demo
"$SFTLAB" check "$DATA" --model "$MODEL" --rejects runs/demo/rejects.jsonl || true
echo
echo "== sftlab inspect: trained tokens marked [[...]]"
"$SFTLAB" inspect "$DATA" --model "$MODEL" -n 4 --no-color data.on_bad_row=skip
echo
echo "== an HTML view: runs/demo/inspect.html"
mkdir -p runs/demo
"$SFTLAB" inspect "$DATA" --model "$MODEL" -n 4 --format html --output runs/demo/inspect.html data.on_bad_row=skip
