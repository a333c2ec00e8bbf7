#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py, which opens a run's report.html in it. Debian's package,
# installed only when no Chromium is on PATH and apt-get can run as root; quiet on success. Elsewhere it
# says how to install one and leaves the decision to you (the test then fails with the same advice).
set -euo pipefail

for name in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$name" >/dev/null && exit 0
done

hint="install it (Debian/Ubuntu: apt-get install chromium; macOS: brew install --cask chromium)"
if ! command -v apt-get >/dev/null; then
  echo "install_chromium: no Chromium found and no apt-get; $hint" >&2
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "install_chromium: no Chromium found; apt-get needs root: sudo apt-get install -y chromium" >&2
  exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "install_chromium: installing Debian's chromium (headless browser for tests/test_report.py)" >&2
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
       apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install_chromium: apt-get install chromium failed; $hint" >&2
  exit 1
fi
