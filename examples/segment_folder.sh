#!/usr/bin/env bash
# Shell pipelines around `deeplab segment`: find | segment | summarise the JSON lines, without jq.
#
#   examples/segment_folder.sh [IMAGES_DIR] [OUT_DIR]
#
# IMAGES_DIR defaults to ../shared/images beside the repository; OUT_DIR to a new temporary folder.
# DEEPLAB_MODEL picks the model (default: the small float model, quick on a CPU).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
images="${1:-$here/../../shared/images}"
out="${2:-$(mktemp -d)}"
model="${DEEPLAB_MODEL:-deeplabv3-mnv2-dm05-voc}"
records="$out/records.jsonl"
mkdir -p "$out"
# The `deeplab` command, or the module when the console script is not on PATH.
if command -v deeplab > /dev/null; then deeplab=(deeplab); else deeplab=(python -m deeplab_cli); fi

# 1. Every photo under the folder (not the expected masks), one path per line, into `deeplab segment -`.
#    Masks mirror the folder structure under $out/masks; --skip-existing makes a rerun resume.
find "$images" -type f \( -iname '*.jpg' -o -iname '*.png' -o -iname '*.bmp' \) ! -iname '*mask*' ! -iname '*golden*' \
  | sort \
  | "${deeplab[@]}" segment - -o "$out/masks" --model "$model" --json --skip-existing --quiet > "$records"

# 2. JSON lines -> tab-separated rows (input, class, fraction) with python -c ...
python -c '
import json, sys
for line in sys.stdin:
    record = json.loads(line)
    for c in record.get("classes", []):
        print(record["input"], c["name"], c["fraction"], sep="\t")
' < "$records" > "$out/classes.tsv"

# 3. ... and awk for the summary: in how many images each class covers more than 5% of the pixels.
echo "images segmented: $(grep -c '"status": "ok"' "$records" || true), failed: $(grep -c '"status": "failed"' "$records" || true)"
awk -F'\t' '$3 > 0.05 { n[$2]++ } END { for (c in n) printf "%-14s %d\n", c, n[c] }' "$out/classes.tsv" | sort

# 4. The masks are palette PNGs whose pixel values are class indices:
find "$out/masks" -name '*.png' | sort | head -n 3
