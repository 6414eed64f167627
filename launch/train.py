"""Train a face-recognition network.

    torchrun --nproc_per_node=N launch/train.py --config launch/configs/demo.yaml \
        [--set section.key=value ...]

Also runs as a single process (``python launch/train.py ...``) and under SLURM ``srun`` (one
task per GPU). Parses arguments, builds the trainer, trains; nothing else lives here. Exit
status: 0 done, 2 a user error (one line naming the key, file or record), 1 anything else
(see :mod:`dist_train.failures`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_train.config import load_config  # noqa: E402
from dist_train.distributed import init_distributed  # noqa: E402
from dist_train.failures import exit_process, run_guarded  # noqa: E402
from dist_train.logging_utils import setup_logging  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see launch/configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.05 (repeatable)",
    )
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    info = init_distributed(timeout_s=cfg.dist_timeout_s, device=cfg.device)
    setup_logging(None, info.is_main, info.rank)  # the trainer adds run_dir/train.log
    from dist_train.trainer import Trainer

    Trainer(cfg, info).fit()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a failure: reported once, process group torn down without a collective, exit 1 or 2
    return run_guarded(lambda: train(args))


if __name__ == "__main__":
    exit_process(main())
