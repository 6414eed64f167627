"""Evaluate a face-recognition model on verification sets.

    python launch/eval.py --weights runs/demo/model.pt --network iresnet18 \
        --targets data/synthetic/val.bin,data/synthetic/val_pairs.csv --out runs/demo/eval
    torchrun --nproc_per_node=2 launch/eval.py --weights ... --targets lfw.bin,cfp_fp.bin

See ``python launch/eval.py --help`` and docs/evaluation.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
