#!/usr/bin/env bash
# The quickstart's main job on the built-in data: synthetic dataset -> 2-process training with
# the sharded classifier -> evaluation of held-out identities -> summary.
# Usage: bash launch/demo.sh [VENV]   (env: NPROC=2 DEMO_DATA=data/synthetic DEMO_RUN=runs/demo-...)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY="$VENV/bin/python"
NPROC=${NPROC:-2}
DATA=${DEMO_DATA:-data/synthetic}
RUN=${DEMO_RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
CONFIG=launch/configs/demo.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$DATA/train.rec" ]; then
  echo "[demo] writing the synthetic dataset to $DATA"
  "$PY" launch/make_synthetic.py --out "$DATA" --identities 500 --images-per-identity 20 \
      --val-identities 100 --image-size 112 --difficulty 0.75 --seed 0 --workers 2
fi

echo "[demo] training: torchrun --nproc_per_node=$NPROC launch/train.py --config $CONFIG"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" launch/train.py \
    --config "$CONFIG" --set output_dir="$RUN" --set data.root="$DATA" \
    --set "eval.targets=[$DATA/val.bin,$DATA/val_pairs.csv]"

# The final training checkpoint carries the config (network, input size, normalisation).
CKPT=$(ls "$RUN"/checkpoints/step_????????.pt | tail -n 1)
echo "[demo] evaluating $CKPT with launch/eval.py"
"$PY" launch/eval.py --weights "$CKPT" --image-size 64 \
    --targets "$DATA/val.bin,$DATA/val_pairs.csv" --out "$RUN/eval"

"$PY" - "$RUN" <<'PYEOF'
import json, sys
run = sys.argv[1]
before = json.load(open(f"{run}/metrics_initial.json"))
report = json.load(open(f"{run}/eval/report.json"))["targets"]
print()
print(f"run directory: {run}")
for name, m in before.items():
    after = report[name]["metrics"]
    print(f"  {name}: 10-fold accuracy untrained {m['accuracy']:.4f} -> trained "
          f"{after['accuracy']:.4f} +- {after['accuracy_std']:.4f}, EER {after['eer']:.4f}, "
          f"AUC {after['auc']:.4f}")
print(f"TensorBoard: tensorboard --logdir {run}/tensorboard")
PYEOF
