"""Writes the synthetic face data set (the project's default data).

Example: ``python launch/make_synthetic.py --out data/synthetic --identities 500 --workers 2``
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402

from tqdm import tqdm  # noqa: E402

from dist_train.data.synthetic import SyntheticSpec, make_synthetic  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    d = SyntheticSpec()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--identities", type=int, default=d.num_identities)
    p.add_argument("--images-per-identity", type=int, default=d.images_per_identity)
    p.add_argument("--val-identities", type=int, default=d.val_identities)
    p.add_argument("--val-images-per-identity", type=int, default=d.val_images_per_identity)
    p.add_argument("--val-pairs", type=int, default=d.val_pairs)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument(
        "--difficulty",
        type=float,
        default=d.difficulty,
        help="per-image variation: 0 none, 0.6 default, 1 strong, 2 very hard",
    )
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=1, help="drawing processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    spec = SyntheticSpec(
        num_identities=a.identities,
        images_per_identity=a.images_per_identity,
        val_identities=a.val_identities,
        val_images_per_identity=a.val_images_per_identity,
        val_pairs=a.val_pairs,
        image_size=a.image_size,
        seed=a.seed,
        difficulty=a.difficulty,
        jpeg_quality=a.jpeg_quality,
    )
    start = time.perf_counter()
    total = spec.num_identities + (spec.val_identities if spec.val_pairs else 0)
    # progress on stderr: redrawn live on a terminal, a status every 30 s in a log file
    redraw_s = 0.1 if sys.stderr.isatty() else 30.0
    with tqdm(total=total, unit=" identities", disable=a.quiet, mininterval=redraw_s) as bar:
        summary = make_synthetic(a.out, spec, workers=a.workers, progress=bar.update)
    print(
        f"wrote {summary['num_images']} images of {summary['num_classes']} identities"
        f" and {summary.get('val_pairs', 0)} verification pairs to {a.out}"
        f" in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
