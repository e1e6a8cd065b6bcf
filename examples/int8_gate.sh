#!/usr/bin/env bash
# CI-style INT8 gate (docs/quantize.md): contract a trained expanded checkpoint, quantize it only if
# the accuracy holds. Trains a SmallNet CK+FC on scikit-learn's digits first (about a minute on one CPU
# thread) so that it runs anywhere; in a pipeline, start from your own best.pt.
#   PATH=.venv/bin:$PATH bash examples/int8_gate.sh [DIR]
set -euo pipefail
command -v jq >/dev/null || { echo "this script needs jq (apt-get install -y jq)" >&2; exit 2; }
DIR=${1:-int8-gate}
mkdir -p "$DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

expandctl expand --arch smallnet --arch-kwargs '{"in_channels":1,"image_size":8}' --strategy ck+fc --seed 0 \
    -o "$DIR/expanded.pt" --json | jq -e '.ok' >/dev/null
expandctl train "$DIR/expanded.pt" --data digits --epochs 20 --schedule cosine --lr 0.05 --seed 0 \
    --out "$DIR/run" --json | jq -r '"trained: best val accuracy \(.best_val_acc * 100 | round)%"'
expandctl contract "$DIR/run/best.pt" -o "$DIR/compact.pt" --json | jq -e '.passed' >/dev/null

# 1. The gate passes: exit 0 (set -e stops the script otherwise), the INT8 file exists.
expandctl quantize "$DIR/compact.pt" --data digits -o "$DIR/compact.int8.onnx" --max-drop 1.0 --json >"$DIR/int8.json"
jq -r '"INT8 passed the gate: float \(.float_eval.accuracy * 10000 | round / 100)%, INT8 \(.int8_eval.accuracy * 10000 | round / 100)%, drop \(.drop_points * 100 | round / 100) points (max \(.max_drop)), latency INT8/float \(.latency.ratio * 100 | round / 100), \(.float_bytes) -> \(.int8_bytes) bytes"' "$DIR/int8.json"
test -s "$DIR/compact.int8.onnx"

# 2. A bar the INT8 model does not reach (one point above its own accuracy): exit 1 and no file.
#    (--max-drop 0 would not do: INT8 can score as high as float, or higher, on a split this small.)
bar=$(jq -r '.int8_eval.accuracy * 100 + 1' "$DIR/int8.json")
rc=0
expandctl quantize "$DIR/compact.pt" --data digits -o "$DIR/strict.int8.onnx" --min-accuracy "$bar" --json \
    >"$DIR/strict.json" || rc=$?
test "$rc" -eq 1
test ! -e "$DIR/strict.int8.onnx"
jq -r '"refused (exit \(.exit_code)): \(.error)"' "$DIR/strict.json"
echo "gate ok"
