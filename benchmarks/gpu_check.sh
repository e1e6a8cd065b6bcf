#!/usr/bin/env bash
# GPU check of fused training (issue 9): run from the repository root on a machine with a GPU.
#
#   bash benchmarks/gpu_check.sh            # needs a visible CUDA device; exits 2 if there is none
#   DEVICE=cpu bash benchmarks/gpu_check.sh # dry run of the same steps on the CPU (small sizes)
#
# 1. composition on the device: float32 kernel and gradient errors of the new (Toom-Cook) and old
#    (direct) composition against a float64 reference, and their speed, on the wide network's chains;
# 2. a few training steps with `expandctl train --device cuda` (bf16 autocast), plain and with
#    --accumulate 2; contraction of the result checked with `expandctl verify`;
# 3. the step benchmark on the device (old and new composition, ratios to the compact model);
# 4. with more than one visible GPU: DDP with nccl under torchrun, then verify.
set -euo pipefail

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/expandctl_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# One line from `expandctl verify --json`: passed, and the worst relative error per dtype.
verify_summary() {
    "$PY" -c "
import json, sys
r = json.load(sys.stdin)
worst = {}
for c in r.get('checks', []):
    for o in c.get('outputs', []):
        worst[c['dtype']] = max(worst.get(c['dtype'], 0.0), o['max_rel'])
print('  verify $1: passed' if r.get('passed') else '  verify $1: FAILED', {k: f'{v:.1e}' for k, v in worst.items()})
"
}

if [ "$DEVICE" = cuda ]; then
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    if [ "$GPUS" -lt 1 ]; then
        echo "gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False);" >&2
        echo "gpu_check: run it on a GPU machine, or DEVICE=cpu for a dry run of the same steps" >&2
        exit 2
    fi
    "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
    STEPS=30 EPOCHS=1 CHANNELS="[32, 64, 128]" BENCH=(--batch 128 64)
else  # dry run: the smallest sizes that still go through every step
    GPUS=0 STEPS=2 EPOCHS=1 CHANNELS="[8, 16, 32]" BENCH=(--batch 64 --variants paper)
fi

echo "== 1. composition on $DEVICE: float32 errors vs a float64 reference, speed (fwd+bwd)"
"$PY" - "$DEVICE" <<'EOF'
import statistics, sys, time
import torch
from expandctl import algebra

device = torch.device(sys.argv[1])
torch.manual_seed(0)

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

for m, n in [(3, 32), (32, 64), (64, 128), (16, 32)]:
    h1, h2 = algebra.hidden_width(m, 4), algebra.hidden_width(n, 4)
    shapes = [(h1, m, 3, 3), (h2, h1, 3, 3), (n, h2, 3, 3)]
    w64 = [torch.randn(s, dtype=torch.float64, device=device) / (s[1] * 9) ** 0.5 for s in shapes]
    upstream = torch.randn(n, m, 7, 7, dtype=torch.float64, device=device)
    ref = algebra.compose_chain(w64)[0]
    w64g = [w.clone().requires_grad_() for w in w64]
    ref_grads = torch.autograd.grad(algebra.compose_chain(w64g)[0], w64g, upstream)
    line, times = [], {}
    for method in ("direct", "toom"):
        w32 = [w.float().requires_grad_() for w in w64]
        k = algebra.compose_chain_fast(w32, None, 1, None, method)[0]
        grads = torch.autograd.grad(k, w32, upstream.float())
        gerr = max(rel(g, r) for g, r in zip(grads, ref_grads))
        line.append(f"{method}: kernel {rel(k, ref):.1e} grad {gerr:.1e}")
        ts = []
        for r in range(12):
            sync(); t0 = time.perf_counter()
            k = algebra.compose_chain_fast(w32, None, 1, None, method)[0]
            k.backward(upstream.float())
            sync(); ts.append(time.perf_counter() - t0)
        times[method] = statistics.median(ts[2:]) * 1e3
    auto = algebra.composition_method(tuple(shapes))
    print(f"  {m}->{h1}->{h2}->{n}: {'; '.join(line)}; direct {times['direct']:.2f} ms, toom "
          f"{times['toom']:.2f} ms, x{times['direct'] / times['toom']:.2f}; auto picks {auto}")
EOF

echo "== 2. a few training steps with --device $DEVICE (bf16 autocast on cuda), then verify"
"$PY" - "$WORK/src.pt" "$CHANNELS" <<'EOF'
import json, sys
import torch
import expandctl
from expandctl.checkpoint import save
from expandctl.models import SmallNet
kw = {"kernel_size": 7, "channels": json.loads(sys.argv[2])}
torch.manual_seed(0)
model = expandctl.expand(SmallNet(**kw), strategy="ck", rate=4, seed=0)
save(model, sys.argv[1], arch="smallnet", arch_kwargs=kw, input_shape=(3, 32, 32))
EOF
for acc in 1 2; do
    "$PY" -m expandctl train "$WORK/src.pt" --data synthetic:3x32x32 --epochs "$EPOCHS" --batch-size 64 --lr 0.05 \
        --device "$DEVICE" --accumulate "$acc" --out "$WORK/run_acc$acc" --quiet --json \
        | "$PY" -c "import json,sys; s=json.load(sys.stdin); print('  accumulate $acc:', {k: s.get(k) for k in ('ok','device','epochs_run','best_val_acc','seconds')})"
    "$PY" -m expandctl verify "$WORK/run_acc$acc/last.pt" --json | verify_summary "accumulate $acc"
done

echo "== 3. step benchmark on $DEVICE (ratios to the compact model of the same run)"
"$PY" benchmarks/train_step.py --device "$DEVICE" --threads 1 "${BENCH[@]}" --steps "$STEPS"

if [ "$GPUS" -gt 1 ]; then
    echo "== 4. DDP with nccl on $GPUS GPUs"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m expandctl.commands.train \
        "$WORK/src.pt" --data synthetic:3x32x32 --epochs 1 --batch-size 64 --accumulate 2 --device cuda \
        --out "$WORK/ddp" --json \
        | "$PY" -c "import json,sys; s=json.load(sys.stdin); print('  ddp:', {k: s.get(k) for k in ('ok','world_size','epochs_run','best_val_acc')})"
    "$PY" -m expandctl verify "$WORK/ddp/last.pt" --json | verify_summary ddp
else
    echo "== 4. DDP with nccl: skipped ($GPUS GPUs visible, needs 2 or more)"
fi
echo "gpu_check: done"
