"""Embedding extraction for verification: batching, flip TTA, autocast, rank shards.

Owns turning prepared images into one embedding per image. Each rank embeds a contiguous
shard of the images (``dist_train.distributed.shard_range``) and the shards are gathered
with ``all_gather_object`` so every rank ends with the full matrix; at world size 1 the
helpers are no-ops. Normalisation and autocast are training's own
(``dist_train.data.transforms.normalize``, ``dist_train.precision``). It does not read or
prepare images (crop, resize and low light happen in :mod:`eval.targets` through the training
evaluation transform) nor compute metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dist_train.data.transforms import (
    low_light,  # noqa: F401 - also re-exported for eval users
    normalize,
)
from dist_train.distributed import all_gather_object, get_rank, get_world_size, shard_range
from dist_train.precision import autocast
from eval.options import EvalOptions


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper.

    Evaluation must not run a DDP forward: ranks embed different numbers of batches, and DDP's
    buffer broadcast in ``forward`` would then wait for ranks that never come.
    """
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


@dataclass
class Embeddings:
    """Embeddings of every image of a target.

    Attributes:
        embeddings: ``[N, D]`` float32 (sum over the original and mirrored image with flip TTA;
            not normalised).
        norms: ``[N, V]`` float64 L2 norm of each single-view embedding (V = 2 with flip TTA:
            original, mirrored), from which XNorm is computed.
    """

    embeddings: np.ndarray
    norms: np.ndarray

    @property
    def xnorm(self) -> float:
        """Mean single-view embedding norm over the images (each image counted once)."""
        return float(self.norms.mean())


@torch.no_grad()
def embed_batch(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    options: EvalOptions | None = None,
    *,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds one batch.

    Args:
        model: backbone in eval mode (``[B, 3, H, W]`` float -> ``[B, D]``).
        images: ``[B, 3, H, W]`` uint8 RGB, already prepared (:meth:`EvalOptions.transform`).
        options: ``flip``, ``mean``/``std`` and ``amp`` are used here (default: the defaults).
        device: where the forward pass runs.

    Returns:
        ``([B, D] float32 embeddings, [B, V] float64 single-view norms)``, V = 2 with flip.
    """
    options = options or EvalOptions()
    # uint8 travels to the device; the float conversion happens there.
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    x = normalize(x, options.mean, options.std)
    with autocast(device, options.amp):
        out = model(x).float()
        views = [out]
        if options.flip:
            views.append(model(torch.flip(x, dims=[3])).float())
    norms = torch.stack([v.double().norm(dim=1) for v in views], dim=1)
    total = views[0] if len(views) == 1 else views[0] + views[1]
    # .cpu() is a device sync point, once per batch.
    return total.cpu().numpy(), norms.cpu().numpy()


def extract_embeddings(
    model: nn.Module,
    load_images: Callable[[int, int], np.ndarray],
    num_images: int,
    options: EvalOptions | None = None,
    *,
    device: torch.device,
    progress: str | None = None,
) -> Embeddings:
    """Embeds ``num_images`` images, spreading contiguous shards over the ranks.

    Every rank must call this (it gathers across ranks when a process group exists); every
    rank returns the full, identical result.

    Args:
        model: backbone (a DDP wrapper is unwrapped); put in eval mode during the call and
            restored to its previous mode after.
        load_images: ``(start, stop) -> [stop - start, 3, H, W]`` uint8 RGB, prepared.
        num_images: N.
        options: ``batch_size`` (images per forward pass, per view) and those of
            :func:`embed_batch`.
        device: where the forward passes run.
        progress: a tqdm bar with this label over rank 0's shard (None: no bar).
    """
    options = options or EvalOptions()
    batch_size = options.batch_size
    net = unwrap(model) if isinstance(model, nn.Module) else model
    was_training = isinstance(net, nn.Module) and net.training
    if isinstance(net, nn.Module):
        net.eval()
    rank, world = get_rank(), get_world_size()
    start, stop = shard_range(num_images, rank, world)
    chunks: list[np.ndarray] = []
    norm_chunks: list[np.ndarray] = []
    error: BaseException | None = None
    batches = [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]
    bar = tqdm(
        total=stop - start,
        desc=progress,
        unit=" images",
        disable=progress is None or rank != 0,
        mininterval=1.0,
    )
    # One background thread decodes the next batch while this one runs through the model
    # (OpenCV releases the GIL while decoding).
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pending = pool.submit(load_images, *batches[0]) if batches else None
            for i in range(len(batches)):
                images = pending.result()
                if i + 1 < len(batches):
                    pending = pool.submit(load_images, *batches[i + 1])
                emb, norms = embed_batch(net, images, options, device=device)
                chunks.append(emb)
                norm_chunks.append(norms)
                bar.update(len(images))
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        finally:
            bar.close()
            if was_training:
                net.train()
    if error is not None and world == 1:
        raise error
    local = None
    if chunks and error is None:
        local = (np.concatenate(chunks), np.concatenate(norm_chunks))
    # Every rank reaches this gather even when one failed, so a bad image on one rank stops
    # all of them with its message instead of leaving the others waiting forever.
    # Shards are contiguous and gathered in rank order, so concatenation restores image order.
    message = None if error is None else f"rank {rank}: {type(error).__name__}: {error}"
    gathered = all_gather_object((local, message))
    failures = [g[1] for g in gathered if g[1] is not None]
    if failures:
        raise RuntimeError("embedding failed on " + "; ".join(failures)) from error
    parts = [g[0] for g in gathered if g[0] is not None]
    if not parts:
        raise ValueError("no images to embed")
    embeddings = np.concatenate([p[0] for p in parts])
    norms = np.concatenate([p[1] for p in parts])
    if embeddings.shape[0] != num_images:
        raise RuntimeError(f"gathered {embeddings.shape[0]} embeddings for {num_images} images")
    return Embeddings(embeddings, norms)
