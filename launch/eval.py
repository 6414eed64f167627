"""Evaluate a face-recognition model on verification sets.

    python launch/eval.py --weights runs/demo/model.pt --network iresnet18 \
        --targets data/synthetic/val.bin,data/synthetic/val_pairs.csv --out runs/demo/eval
    torchrun --nproc_per_node=2 launch/eval.py --weights ... --targets lfw.bin,cfp_fp.bin

See ``python launch/eval.py --help`` and docs/evaluation.md. Exit status: 0 done, 2 a user
error (one line naming the file or option), 1 anything else.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_train.failures import exit_process, run_guarded  # noqa: E402
from eval.cli import main  # noqa: E402

if __name__ == "__main__":
    # a failure: reported once (one line for a bad file or option), no collective, exit 1 or 2
    exit_process(run_guarded(main))
