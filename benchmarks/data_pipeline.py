"""Loader throughput against the JPEG-decode limit, measured side by side in one run.

Measures images/s per worker on one RecordIO pack (default: a synthetic pack of 20,000
112x112 JPEG images, generated once into ``--data``):

  (a) ``cv2.imdecode`` alone on the records' JPEG bytes, already in memory: the decode limit;
  (b) our reader + decode (``RecordDataset.load``: pread, unpack, decode to RGB), random order;
  (c) the full training pipeline: ``build_train_data`` DataLoader with the recipes'
      augmentation (horizontal flip), uint8 batches, with 1 and 2 workers;
  (d) as (c) with random resized crop and colour jitter added, 1 worker.

Prints the table and the ratios (b)/(a) and (c)/(a) per worker (target: (c) >= 0.85 x (a)),
and writes them to ``--md`` (default ``docs/bench_data.md``). The rounds alternate (a), (b),
(c) so that load from other processes hits all of them alike; the best round is reported.

    python benchmarks/data_pipeline.py [--data data/bench20k] [--images 20000] [--rounds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from dist_train.config import DataConfig  # noqa: E402
from dist_train.data.datasets import RecordDataset  # noqa: E402
from dist_train.data.loader import build_train_data  # noqa: E402
from dist_train.data.recordio import unpack  # noqa: E402
from dist_train.data.synthetic import SyntheticSpec, make_synthetic  # noqa: E402
from dist_train.distributed import DistInfo  # noqa: E402


def ensure_pack(root: Path, images: int, workers: int) -> None:
    if (root / "train.rec").is_file():
        return
    per = 20
    spec = SyntheticSpec(
        num_identities=max(2, images // per), images_per_identity=per, val_pairs=0, image_size=112
    )
    t = time.perf_counter()
    make_synthetic(root, spec, workers=workers)
    print(f"generated {spec.num_identities * per} images in {time.perf_counter() - t:.0f}s")


def bench_decode(payloads: list[bytes]) -> float:
    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
    t = time.perf_counter()
    for p in payloads:
        cv2.imdecode(np.frombuffer(p, np.uint8), flag)
    return len(payloads) / (time.perf_counter() - t)


def bench_reader(ds: RecordDataset, order: np.ndarray) -> float:
    t = time.perf_counter()
    for i in order.tolist():
        ds.load(i)
    return len(order) / (time.perf_counter() - t)


def bench_in_process(ds: RecordDataset, order: np.ndarray) -> float:
    """(c) without the DataLoader: per-sample getitem with the hflip transform, then collate."""
    from dist_train.data.loader import _collate
    from dist_train.data.transforms import TrainTransform

    saved, ds.transform = ds.transform, TrainTransform(112, hflip=True)
    t = time.perf_counter()
    items = [ds[(int(i), 0, 0, k)] for k, i in enumerate(order.tolist())]
    for j in range(0, len(items), 128):
        _collate(items[j : j + 128])
    ds.transform = saved
    return len(order) / (time.perf_counter() - t)


class _Blank:
    """A dataset that returns one ready image: what the DataLoader's transport alone costs."""

    def __init__(self, n: int):
        self.n, self.img = n, np.zeros((112, 112, 3), np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.img.copy(), 0


def bench_transport(batches: int) -> float:
    from torch.utils.data import DataLoader

    from dist_train.data.loader import _collate

    dl = DataLoader(
        _Blank(10**6),
        batch_size=128,
        num_workers=1,
        collate_fn=_collate,
        persistent_workers=True,
        prefetch_factor=4,
    )
    it = iter(dl)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * 128 / (time.perf_counter() - t)
    del it, dl
    return rate


def bench_loader(root: Path, workers: int, batches: int, heavy: bool = False) -> float:
    cfg = DataConfig(
        root=str(root),
        batch_size=128,
        num_workers=workers,
        hflip=True,
        random_resized_crop=heavy,
        color_jitter=0.7 if heavy else 0.0,
    )
    td = build_train_data(cfg, DistInfo(), seed=0)
    it = iter(td.loader)
    next(it)  # start-up (worker creation, first prefetch) is not throughput
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        n += images.shape[0]
    rate = n / (time.perf_counter() - t)
    del it, td
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description="data pipeline throughput")
    p.add_argument("--data", default="data/bench20k")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--sample", type=int, default=3000, help="images per (a)/(b) measurement")
    p.add_argument("--batches", type=int, default=24, help="batches of 128 per (c) measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--md", default="docs/bench_data.md")
    a = p.parse_args()
    cv2.setNumThreads(1)  # per-worker numbers: one thread per process everywhere
    root = Path(a.data)
    ensure_pack(root, a.images, workers=os.cpu_count() or 1)
    ds = RecordDataset(root / "train.rec")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))[: a.sample]
    payloads = [unpack(ds.reader.read(int(ds.keys[i])))[1] for i in order]
    best: dict[str, float] = {}
    for r in range(a.rounds):
        res = {
            "a": bench_decode(payloads),
            "b": bench_reader(ds, order),
            "p": bench_in_process(ds, order),
            "t": bench_transport(a.batches),
            "c1": bench_loader(root, 1, a.batches),
            "c2": bench_loader(root, 2, a.batches) / 2,
            "d1": bench_loader(root, 1, a.batches, heavy=True),
        }
        for k, v in res.items():
            best[k] = max(best.get(k, 0.0), v)
        print(f"round {r + 1}: " + ", ".join(f"{k}={v:.0f}/s" for k, v in res.items()), flush=True)
    rows = [
        ("(a) cv2.imdecode alone (decode limit)", 1, best["a"]),
        ("(b) reader + decode (RecordDataset.load)", 1, best["b"]),
        ("(c0) pipeline in one process (getitem + hflip + collate), no DataLoader", 1, best["p"]),
        ("(c) full pipeline, DataLoader, 1 worker", 1, best["c1"]),
        ("(c) full pipeline, DataLoader, 2 workers", 2, best["c2"]),
        ("(d) as (c) plus random resized crop + colour jitter", 1, best["d1"]),
        ("(t) DataLoader transport alone (worker returns a ready image)", 1, best["t"]),
    ]
    lines = [
        "# Data pipeline throughput",
        "",
        f"Pack: {len(ds)} synthetic 112x112 JPEG images ({root}). Machine: {os.cpu_count()} CPU "
        f"cores, {platform.processor() or platform.machine()}, OpenCV {cv2.__version__}; "
        f"best of {a.rounds} interleaved rounds; other processes were running, so single "
        "numbers move by up to +-30% between rounds (compare rows of one run only).",
        "",
        "(c) is the training pipeline of the shipped recipes (InsightFace's: horizontal flip "
        "only): DataLoader, per-sample seeded augmentation, batches of 128 uint8 images. (d) "
        "adds random resized crop (area 0.8-1) and colour jitter 0.7 (factors in [0.3, 1.7]).",
        "",
        "| stage | workers | images/s per worker | vs (a) |",
        "|---|---|---|---|",
    ]
    for name, w, v in rows:
        lines.append(f"| {name} | {w} | {v:.0f} | {v / best['a']:.2f} |")
    lines += [
        "",
        f"Target (c) >= 0.85 x (a) per worker: 1 worker {best['c1'] / best['a']:.2f}, "
        f"2 workers {best['c2'] / best['a']:.2f}.",
        "",
        f"Where the time goes: our reader plus decode runs at {best['b'] / best['a']:.2f} x the "
        f"bare decode ({1e6 / best['a']:.0f} us per image); the whole per-sample "
        f"pipeline in one process runs at {best['p'] / best['a']:.2f} x (a). Moving batches "
        "from a worker to the main process (row t: torch's per-batch shared memory, worker "
        f"doing nothing else) runs at {best['t'] / best['a']:.2f} x (a) here, and with 2 cores "
        "shared by the worker(s), the main process and other jobs the stages compete for the "
        "same cores: that is the gap between (c0) and (c). A reused shared-memory ring in place "
        "of torch's transport was tried and measured no faster (within noise), so it was not "
        "kept.",
        "",
        "Command: `python benchmarks/data_pipeline.py` "
        f"(`--data {a.data} --images {a.images} --rounds {a.rounds}`).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(a.md).parent.mkdir(parents=True, exist_ok=True)
    Path(a.md).write_text(text)


if __name__ == "__main__":
    main()
