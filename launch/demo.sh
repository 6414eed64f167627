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
  "$PY" launch/make_synthetic.py --out "$DATA" --identities 400 --images-per-identity 24 \
      --val-identities 100 --image-size 112 --seed 0
fi

echo "[demo] training: torchrun --nproc_per_node=$NPROC launch/train.py --config $CONFIG"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" launch/train.py \
    --config "$CONFIG" --set output_dir="$RUN" --set data.root="$DATA" \
    --set "eval.targets=[$DATA/val.bin,$DATA/val_pairs.csv]" --set eval.at_start=true

echo "[demo] evaluating $RUN/model.pt"
"$PY" launch/eval.py --weights "$RUN/model.pt" --config "$RUN/config.yaml" \
    --targets "$DATA/val.bin,$DATA/val_pairs.csv" --out "$RUN/eval" --json "$RUN/eval/results.json"

"$PY" - "$RUN" <<'PYEOF'
import json, sys
run = sys.argv[1]
before = json.load(open(f"{run}/metrics_initial.json"))
after = json.load(open(f"{run}/eval/results.json"))
print()
print(f"run directory: {run}")
for name, m in before.items():
    a = after.get(name, {})
    acc = a.get("accuracy", a.get("metrics", {}).get("accuracy"))
    print(f"  {name}: untrained accuracy {m['accuracy']:.4f} -> trained {acc}")
print(f"TensorBoard: tensorboard --logdir {run}/tensorboard")
PYEOF
