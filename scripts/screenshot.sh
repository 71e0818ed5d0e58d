#!/usr/bin/env bash
# Render a page of the built book to PNG with headless Chromium (Debian: apt-get install chromium),
# to look at what a reader sees: figures, formulas, folded solutions.
#
#   bash scripts/screenshot.sh _build/html/notebooks/00_model_and_machine.html out.png [1280,2000]
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,5p' "$0"; exit 2; fi
page=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1280,2000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then echo "screenshot.sh: no chromium found (apt-get install -y chromium)" >&2; exit 1; fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --virtual-time-budget lets MathJax typeset before the picture is taken.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --virtual-time-budget=10000 \
    --screenshot="$out" --window-size="$size" "file://$page" 2>/dev/null
test -s "$out" && echo "screenshot.sh: wrote $out"
