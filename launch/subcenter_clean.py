"""Sub-center ArcFace's offline step: dominant centres per class, images off them.

    python launch/subcenter_clean.py --checkpoint runs/sc/checkpoints/step_00010000.pt \
        --data data/train --out runs/sc/clean [--batch-size 256] [--device cuda]

Reads the run's ``[C, K, D]`` sub-centres and its backbone from the checkpoint, embeds every
image of ``--data`` (default: the run's ``data.root``; labels must be the run's classes), and
writes to ``--out``:

- ``dominant_centers.pt``: ``{"centers": [C, D], "dominant": [C], "counts": [C, K]}``, the
  dominant sub-centre of each class (non-dominant ones dropped);
- ``outliers.csv``: ``index,path,label,nearest,dominant,angle_deg``, one row per image whose
  nearest sub-centre of its class is not the dominant one (likely label noise), sorted by
  index.

Exit status: 0 done, 2 a user error (one line naming the file or option), 1 anything else.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dist_train.failures import exit_process, run_guarded  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, object]:
    from dist_train.data.datasets import open_train_dataset
    from dist_train.data.transforms import EvalTransform
    from dist_train.partial_fc.subcenters import checkpoint_sub_centers, clean_sub_centers
    from eval.extract import embed_batch
    from eval.options import EvalOptions
    from eval.runner import input_from, load_model, normalisation_from

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="main checkpoint file (step_*.pt)")
    parser.add_argument("--data", help="training data (default: the run's data.root)")
    parser.add_argument("--data-format", default="auto", help="auto, folder, list or recordio")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    centers, state = checkpoint_sub_centers(args.checkpoint)
    config = state.get("config") or {}
    model, _ = load_model(args.checkpoint)
    device = torch.device(args.device)
    model.to(device)
    root = args.data or (config.get("data") or {}).get("root")
    if not root:
        raise ValueError(f"{args.checkpoint}: no --data given and no data.root in its config")
    size = input_from(config)
    transform = EvalTransform(size.get("image_size", 112), center_crop=size.get("center_crop", 0))
    data = open_train_dataset(types.SimpleNamespace(root=root, format=args.data_format), transform)
    if data.num_classes != centers.shape[0]:
        raise ValueError(
            f"{root}: {data.num_classes} classes, the checkpoint {args.checkpoint} has "
            f"{centers.shape[0]}"
        )
    options = EvalOptions(batch_size=args.batch_size, flip=False, **normalisation_from(config))
    chunks = []
    for a in range(0, len(data), args.batch_size):
        images = np.stack([data[i][0] for i in range(a, min(a + args.batch_size, len(data)))])
        emb, _ = embed_batch(model, images.transpose(0, 3, 1, 2), options, device=device)
        chunks.append(torch.from_numpy(emb))
    labels = torch.as_tensor(np.asarray(data.labels), dtype=torch.long)
    result = clean_sub_centers(centers, torch.cat(chunks), labels)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"centers": result.centers, "dominant": result.dominant, "counts": result.counts},
        out / "dominant_centers.pt",
    )
    paths = getattr(data, "paths", None)
    with open(out / "outliers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "label", "nearest", "dominant", "angle_deg"])
        for i in result.outliers.tolist():
            label = int(labels[i])
            writer.writerow(
                [
                    i,
                    paths[i] if paths is not None else "",
                    label,
                    int(result.nearest[i]),
                    int(result.dominant[label]),
                    f"{float(result.angle_to_dominant[i]):.2f}",
                ]
            )
    print(
        f"{len(data)} images, {centers.shape[0]} classes x {centers.shape[1]} sub-centres: "
        f"{result.outliers.numel()} images nearest to a non-dominant sub-centre; wrote "
        f"{out / 'dominant_centers.pt'} and {out / 'outliers.csv'}"
    )
    return {"result": result, "out": out}


if __name__ == "__main__":
    exit_process(run_guarded(main))
