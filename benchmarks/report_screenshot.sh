#!/usr/bin/env bash
# The first screen of the demo's report.html, as committed in results/report_first_screen.png (issue 11):
# runs the demo (about 2 minutes on 2 cores), then a headless Chromium screenshot at 1280 x 900.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/brainvae-demo}
.venv/bin/brainvae demo --out "$OUT" --force --quiet
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
    --screenshot=benchmarks/results/report_first_screen.png "file://$(realpath "$OUT")/report.html"
