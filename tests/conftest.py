"""Shared fixtures: a tiny synthetic dataset and a tiny BN-free test backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import backbones


class TinyConvNet(nn.Module):
    """A BN-free conv net for trainer tests (exact accumulation/resume comparisons)."""

    def __init__(self, embedding_size: int = 16, checkpointing: str = "none") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, embedding_size)

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.body, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


if "_test_tinyconv" not in backbones.BACKBONES:

    @backbones.register("_test_tinyconv")
    def _test_tinyconv(*, embedding_size: int = 16, checkpointing: str = "none") -> TinyConvNet:
        return TinyConvNet(embedding_size, checkpointing)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12 training identities x 8 images and 6 held-out identities, 32x32 pixels."""
    from dist_train.data.synthetic import SyntheticSpec, make_synthetic

    out = tmp_path_factory.mktemp("tiny_data")
    make_synthetic(
        out,
        SyntheticSpec(
            num_identities=12,
            images_per_identity=8,
            val_identities=6,
            val_images_per_identity=4,
            val_pairs=40,
            image_size=32,
            seed=3,
        ),
    )
    return out


def tiny_overrides(data: Path, run: Path, **extra) -> list[str]:
    """``--set`` overrides of a small single-process CPU run on ``tiny_data``."""
    sets = {
        "output_dir": str(run),
        "data.root": str(data),
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.image_size": 32,
        "backbone.name": "_test_tinyconv",
        "backbone.embedding_size": 16,
        "head.name": "arcface",
        "head.params": "{s: 16.0, m: 0.2}",
        "optim.lr": 0.05,
        "scheduler.name": "constant",
        "num_epochs": 1,
        "log_every_steps": 1,
        "tensorboard": False,
        "checkpoint.at_epoch_end": False,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm (munged, slurmctld, slurmd) for the session, stopped at its end
    (tests/slurm_cluster.py). Skips, naming the reason, when the daemons cannot run here."""
    from tests.slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster()
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm: {e} (.ci/run installs slurmctld slurmd slurm-client munge)")
    try:
        yield cluster
    finally:
        cluster.stop()
