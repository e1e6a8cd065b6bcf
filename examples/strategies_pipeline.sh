#!/usr/bin/env bash
# Every parallel-branch strategy through the whole pipeline on pickled torchvision models:
# expand -> train one epoch on digits (adapted to 3x32x32) -> contract -> verify in float64 ->
# export ONNX -> verify the ONNX file; one line of exit codes per model and strategy, and whether
# the contracted ONNX graph has the compact model's op sequence.
#   bash examples/strategies_pipeline.sh [OUT_DIR]   (about 25 minutes on one core)
set -u
OUT=${1:-strategies-out}
mkdir -p "$OUT"
cd "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -c "import torch, torchvision
torch.save(torchvision.models.resnet18(num_classes=10), 'resnet18.pt')
torch.save(torchvision.models.mobilenet_v2(num_classes=10), 'mobilenet_v2.pt')"
status=0
for model in resnet18 mobilenet_v2; do
  expandctl export $model.pt --trust-pickle --input-shape 3,32,32 -o $model.onnx -q >/dev/null 2>&1
  for s in rep acb dbb orepa; do
    d=$model.$s; mkdir -p $d
    expandctl expand $model.pt --trust-pickle --strategy $s --input-shape 3,32,32 -o $d/exp.pt -q > $d/expand.log 2>&1; e1=$?
    expandctl train $d/exp.pt --data digits --channels 3 --image-size 32 --epochs 1 --batch-size 64 --out $d/run -q > $d/train.log 2>&1; e2=$?
    expandctl contract $d/run/last.pt -o $d/compact.pt -q > $d/contract.log 2>&1; e3=$?
    expandctl verify $d/run/last.pt $d/compact.pt --dtype float64 > $d/verify.log 2>&1; e4=$?
    expandctl export $d/compact.pt -o $d/compact.onnx -q > $d/export.log 2>&1; e5=$?
    expandctl verify $d/run/last.pt $d/compact.onnx > $d/verify_onnx.log 2>&1; e6=$?
    same=$(python -c "import onnx, sys; ops = lambda p: [n.op_type for n in onnx.load(p).graph.node]
print('same ops as compact' if ops(sys.argv[1]) == ops(sys.argv[2]) else 'OPS DIFFER')" $d/compact.onnx $model.onnx 2>&1)
    echo "$model $s: expand=$e1 train=$e2 contract=$e3 verify64=$e4 export=$e5 verify_onnx=$e6; $same"
    [ $((e1 + e2 + e3 + e4 + e5 + e6)) = 0 ] || status=1
  done
done
exit $status
