"""Train a face-recognition network.

    torchrun --nproc_per_node=N launch/train.py --config launch/configs/demo.yaml \
        [--set section.key=value ...]

Also runs as a single process (``python launch/train.py ...``) and under SLURM ``srun`` (one
task per GPU). Parses arguments, builds the trainer, trains; nothing else lives here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_train.config import ConfigError, load_config  # noqa: E402
from dist_train.distributed import cleanup, init_distributed  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    info = init_distributed(device=cfg.device)
    try:
        setup_logging(None, info.is_main, info.rank)  # the trainer adds run_dir/train.log
        from dist_train.trainer import Trainer

        Trainer(cfg, info).fit()
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
