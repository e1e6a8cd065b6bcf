#!/usr/bin/env bash
# The whole pipeline on real data that ships with scikit-learn (1,797 8x8 handwritten digits), then
# the question it exists for, answered the way the project's evidence is: over several seeds.
#   1-4: expand the paper's SmallNet (7x7 kernels) with CK, train it, contract it to ONNX, verify it
#        and score the ONNX file with onnxruntime on the held-out split (one seed: the pipeline);
#   5:   an equivalence report on a torchvision ResNet-18 (expanded with ck+cl+fc, contracted);
#   6:   compact vs CK-expanded SmallNet 7x7, 5 seeds each, mean +- std of the contracted models
#        (examples/reproduce.py, the script behind results/; CK at 7x7 is the cell where the
#        committed 5-seed Fashion-MNIST runs show an effect, +0.73 points).
#   usage: examples/demo.sh [OUT_DIR]   (default demo-out/; expandctl must be on PATH)
#   DEMO_EPOCHS (30) and DEMO_SEEDS (0,1,2,3,4) change the comparison's settings.
set -euo pipefail
here=$(dirname "$0")
out=${1:-demo-out}
epochs=${DEMO_EPOCHS:-30}
seeds=${DEMO_SEEDS:-0,1,2,3,4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$out" && mkdir -p "$out"
arch=(--arch smallnet --arch-kwargs '{"in_channels": 1, "image_size": 8, "num_classes": 10}' --input-shape 1,8,8)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. expand SmallNet (7x7 kernels) with CK, rate 4"
expandctl expand "${arch[@]}" --strategy ck --rate 4 --seed 0 -o "$out/expanded.pt"

step "2. train the expanded model on digits ($epochs epochs, paper schedule, fused kernels)"
expandctl train "$out/expanded.pt" --data digits --epochs "$epochs" --seed 0 --out "$out/run"

step "3. contract to ONNX (checked against the explicit chain in float64/float32 and in onnxruntime)"
expandctl contract "$out/run/best.pt" -o "$out/compact.onnx"

step "4. verify the ONNX file against the trained expanded checkpoint, and score it with onnxruntime"
expandctl verify "$out/run/best.pt" "$out/compact.onnx"
expandctl evaluate "$out/compact.onnx" --data digits

step "5. equivalence report: torchvision ResNet-18 expanded with ck+cl+fc, rate 4, and contracted"
python "$here/resnet18_equivalence.py"

step "6. does expansion help? compact vs CK SmallNet 7x7 on digits, seeds $seeds, $epochs epochs each"
# Two processes of one thread each share the run folder (each seed's run is its own file).
compare=(--data digits --kernels 7 --variants compact,ck --epochs "$epochs" --threads 1 --out "$out/seeds")
odd=$(echo "$seeds" | tr ',' '\n' | awk 'NR % 2 == 0' | paste -sd, -)
even=$(echo "$seeds" | tr ',' '\n' | awk 'NR % 2 == 1' | paste -sd, -)
pid=
if [ -n "$odd" ]; then
  python "$here/reproduce.py" "${compare[@]}" --seeds "$odd" > "$out/seeds-odd.log" &
  pid=$!
fi
python "$here/reproduce.py" "${compare[@]}" --seeds "$even" > "$out/seeds-even.log"
[ -z "$pid" ] || wait "$pid"
python "$here/reproduce.py" "${compare[@]}" --seeds "$seeds" --report-only > /dev/null
cat "$out"/seeds-*.log | grep -E '^\[' | sed 's/^\[[0-9]*\/[0-9]*\] /  /' | sort
# The two tables of the report: accuracy (mean +- std over seeds) and the difference to compact.
sed -n '/^\*\*Top-1/,/^\*\*Best per-epoch/p' "$out/seeds/results.md" | sed '$d'
cat <<'TXT'
What this shows: accuracy on the 360 held-out digits of the contracted SmallNet (7x7 kernels),
trained compact or trained CK-expanded and contracted back: the same 34,682-parameter model at
test time, only the training parametrisation differs. Each row is mean +- std over the seeds
above; one image is 0.28 points. Seed to seed, the same training moves by up to 1.7 points here,
more than the gap, so one run of each can land either way (compact seed 0, 98.61%, beats CK seed
2, 98.33%): that is why the comparison is over seeds. Measured on an idle 2-core machine (5
seeds): compact 97.72 +- 0.63, CK 98.78 +- 0.32, +1.06 points, Welch p = 0.016; with 10 seeds
+0.92, p = 0.0005, CK ahead on every seed. It agrees with the committed 5-seed Fashion-MNIST
runs (CK at 7x7: +0.88, p = 0.014; README.md "Results", results/figures), where CK+FC and FC
show no reliable effect. Step 4's one number (the best epoch of one run) shows the
pipeline working end to end, not evidence either way.
TXT
