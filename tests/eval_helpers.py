"""Shared helpers of the evaluator tests: a test-only backbone and small synthetic targets.

``_test_tiny`` (registered by the ``tiny_backbone`` fixture while a test runs) average-pools the
image to 4x4 and projects it with a seeded linear layer: no training needed, yet images of the
same synthetic identity land close together, so verification metrics are meaningful.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import backbones
from eval.targets import save_bin

TINY = "_test_tiny"
IMAGE_SIZE = 32


class TinyNet(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, D]``: 4x4 average pool then a linear projection."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(48, embedding_size)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            self.fc.weight.copy_(torch.randn(embedding_size, 48, generator=gen) / 7)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))

    def stages(self) -> list[nn.Module]:
        return [self.pool, self.fc]


def _tiny(*, embedding_size: int = 16, checkpointing: str = "none") -> TinyNet:
    return TinyNet(embedding_size)


@pytest.fixture
def tiny_backbone():
    """Registers ``_test_tiny`` for one test and removes it afterwards.

    Registering only while a test runs keeps it out of tests that parametrise over
    ``backbones.names()`` at collection time.
    """
    with backbones.BACKBONES.temporary(TINY, _tiny) as name:
        yield name


def identity_images(num_ids: int, per_id: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``[identity][k]`` RGB uint8 images: a per-identity colour pattern, jitter and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_ids):
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float64)
        base = cv2.resize(base, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_NEAREST)
        imgs = []
        for _ in range(per_id):
            img = base * rng.uniform(0.85, 1.15) + rng.normal(0, 20, base.shape)
            imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        out.append(imgs)
    return out


def encode(img: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def make_pairs(num_ids: int = 12, per_id: int = 4, seed: int = 0):
    """Returns ``(images[id][k], pairs [(id_a, k_a, id_b, k_b, same)])`` with both classes."""
    imgs = identity_images(num_ids, per_id, seed)
    rng = np.random.default_rng(seed + 1)
    pairs = []
    for i in range(num_ids):
        pairs.append((i, 0, i, 1 + i % (per_id - 1), True))
        j = (i + 1 + int(rng.integers(0, num_ids - 1))) % num_ids
        if j == i:
            j = (i + 1) % num_ids
        pairs.append((i, 2 % per_id, j, 3 % per_id, False))
    return imgs, pairs


def write_targets(directory: str, num_ids: int = 12, per_id: int = 4, seed: int = 0):
    """Writes ``val.bin``, ``val_pairs.csv`` (+ ``images/``) and ``test.csv`` with equal pairs.

    Returns:
        ``(bin_path, csv_path, test_path, issame)``.
    """
    imgs, pairs = make_pairs(num_ids, per_id, seed)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    for i, group in enumerate(imgs):
        os.makedirs(os.path.join(directory, "images", f"id{i}"), exist_ok=True)
        for k, img in enumerate(group):
            cv2.imwrite(
                os.path.join(directory, "images", f"id{i}", f"{k}.png"),
                cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
            )
    bins, issame, lines, test_lines = [], [], [], []
    for a, ka, b, kb, same in pairs:
        bins += [encode(imgs[a][ka]), encode(imgs[b][kb])]
        issame.append(same)
        lines.append(f"{int(same)},images/id{a}/{ka}.png,images/id{b}/{kb}.png")
        test_lines.append(f"images/id{a}/{ka}.png,images/id{b}/{kb}.png")
    bin_path = os.path.join(directory, "val.bin")
    save_bin(bin_path, bins, issame)
    csv_path = os.path.join(directory, "val_pairs.csv")
    with open(csv_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    test_path = os.path.join(directory, "test.csv")
    with open(test_path, "w") as f:
        f.write("\n".join(test_lines) + "\n")
    return bin_path, csv_path, test_path, np.array(issame)
