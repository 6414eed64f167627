"""Loader throughput against the JPEG-decode limit, measured side by side in one run.

Measures images/s per worker on one RecordIO pack (default: a synthetic pack of 20,000
112x112 JPEG images, generated once into ``--data``):

  (a) ``cv2.imdecode`` alone on the records' JPEG bytes, already in memory: the decode limit;
  (b) our reader + decode (``RecordDataset.load``: mapped read, unpack, decode to RGB),
      random order;
  (c) the full training pipeline: ``build_train_data`` DataLoader with the recipes'
      augmentation (horizontal flip), uint8 batches, with 1 and 2 workers;
  (r) as (c) with the ThinResNet recipes' augmentation instead (random resized crop of area
      0.8-1, no flip: VGGFace2 pretraining, Korean-faces fine-tuning), 1 worker;
  (d) as (c) with random resized crop and colour jitter added, 1 worker;
  (p) the usual PyTorch structure for comparison (per-sample ``__getitem__``, ``np.stack``,
      torch's own shared-memory transport), 1 worker.

Prints the table and the ratios to (a) per worker (target: (c) >= 0.85 x (a)) and writes them
to ``--md`` (default ``docs/bench_data.md``). Each ratio uses an (a) measured just before and
just after its stage, so load from other processes hits both alike; the median and the best of
the rounds are reported.

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
import torch  # noqa: E402

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


def _decode_child(payloads, barrier, results) -> None:
    cv2.setNumThreads(1)
    barrier.wait()
    results.put(bench_decode(payloads))


def bench_decode_parallel(payloads: list[bytes], procs: int) -> float:
    """(a) in ``procs`` processes at once: the decode limit per worker when that many workers
    share the machine (cores, caches and memory bandwidth are shared)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(target=_decode_child, args=(payloads, barrier, results)) for _ in range(procs)
    ]
    for c in children:
        c.start()
    rates = [results.get() for _ in children]
    for c in children:
        c.join()
    return float(np.mean(rates))


def bench_decode_turbo(payloads: list[bytes]) -> float:
    """``simplejpeg.decode_jpeg`` alone: the decoder the pipeline uses for JPEGs."""
    from simplejpeg import decode_jpeg

    t = time.perf_counter()
    for p in payloads:
        decode_jpeg(p, "RGB")
    return len(payloads) / (time.perf_counter() - t)


def bench_reader(ds: RecordDataset, order: np.ndarray) -> float:
    t = time.perf_counter()
    for i in order.tolist():
        ds.load(i)
    return len(order) / (time.perf_counter() - t)


def bench_in_process(root: Path, order: np.ndarray) -> float:
    """(c0) a worker's work without the DataLoader: the batch fetch (decode, hflip, write)."""
    td = build_train_data(DataConfig(root=str(root), batch_size=128, hflip=True), DistInfo(), 0)
    fetch = td.loader.dataset
    items = [(int(i), 0, 0, k) for k, i in enumerate(order.tolist())]
    t = time.perf_counter()
    for j in range(0, len(items) - 127, 128):
        fetch.__getitems__(items[j : j + 128])
    return (len(items) // 128 * 128) / (time.perf_counter() - t)


def _stack(batch):
    return torch.from_numpy(np.stack([b[0] for b in batch])), torch.tensor([b[1] for b in batch])


def bench_per_sample(root: Path, batches: int) -> float:
    """(p) the usual PyTorch pipeline on the same data: per-sample ``__getitem__`` (decode +
    hflip), ``np.stack`` collate, torch's own per-batch shared-memory transport, 1 worker."""
    from torch.utils.data import DataLoader

    from dist_train.data.loader import worker_init

    td = build_train_data(DataConfig(root=str(root), batch_size=128, hflip=True), DistInfo(), 0)
    # the same (index, epoch, rank, position) seeds as the batch path, one tuple per sample
    order = [tuple(row) for batch in td.loader.batch_sampler for row in batch.tolist()]
    dl = DataLoader(
        td.dataset,
        batch_size=128,
        sampler=order,
        num_workers=1,
        collate_fn=_stack,
        drop_last=True,
        worker_init_fn=worker_init,
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


class _DecodeAlongside:
    """(a) measured *while* a loader runs: a thread of the consumer process decoding the same
    JPEG bytes in a loop (OpenCV releases the GIL, so it runs on the core the worker does not
    use). Host-side speed changes then hit (a) and (c) in the same seconds."""

    def __init__(self, payloads: list[bytes]):
        import threading

        self.payloads, self.count, self.stop = payloads, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
        n, pos = len(self.payloads), 0
        while not self.stop.is_set():
            for p in self.payloads[pos : pos + 100]:
                cv2.imdecode(np.frombuffer(p, np.uint8), flag)
            self.count += len(self.payloads[pos : pos + 100])
            pos = (pos + 100) % n

    def __enter__(self):
        self.t = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.rate = self.count / (time.perf_counter() - self.t)


AUGMENT = {
    "flip": {"hflip": True},  # InsightFace's recipes (ArcFace, CosFace, ... on 112x112 packs)
    "crop": {"hflip": False, "random_resized_crop": True},  # the ThinResNet recipes
    "all": {"hflip": True, "random_resized_crop": True, "color_jitter": 0.7},
}


def bench_loader(
    root: Path, workers: int, batches: int, augment: str = "flip", alongside=None
) -> tuple[float, float]:
    """Images/s the trainer process receives, and the CPU share (in cores) it used meanwhile."""
    cfg = DataConfig(root=str(root), batch_size=128, num_workers=workers, **AUGMENT[augment])
    td = build_train_data(cfg, DistInfo(), seed=0)
    it = iter(td.loader)
    for _ in range(8):  # start-up (workers, first prefetch, first use of each slot) excluded:
        next(it)  # a training run is in the steady state for hours
    n, t, cpu = 0, time.perf_counter(), time.process_time()
    if alongside is not None:
        alongside.__enter__()
    for _ in range(batches):
        images, _ = next(it)
        n += images.shape[0]
    wall = time.perf_counter() - t
    if alongside is not None:
        alongside.__exit__()
    consumer = (time.process_time() - cpu) / wall
    del it, td
    return n / wall, consumer


def main() -> None:
    p = argparse.ArgumentParser(description="data pipeline throughput")
    p.add_argument("--data", default="data/bench20k")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--sample", type=int, default=10000, help="distinct images per (a)/(b)")
    p.add_argument("--batches", type=int, default=100, help="batches of 128 per (c) measurement")
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

    def near(measure, ref):
        """A rate and its ratio to the reference rate measured just before and just after."""
        before = ref()
        rate = measure()
        return rate, rate / ((before + ref()) / 2)

    # the reference decodes as many distinct records as a loader measurement reads (not a
    # few hundred that stay in the CPU caches, which runs ~6% faster here)
    def one() -> float:
        return bench_decode(payloads)

    def two() -> float:
        return bench_decode_parallel(payloads, 2)

    cores = os.cpu_count() or 2
    rounds: list[dict[str, float]] = []
    ratios: list[dict[str, float]] = []
    for r in range(a.rounds):
        res, rat = {}, {}
        res["a"], rat["a"] = near(one, one)
        res["a_2"], rat["a_2"] = near(two, one)
        res["a2"], rat["a2"] = near(lambda: bench_decode_turbo(payloads), one)
        res["b"], rat["b"] = near(lambda: bench_reader(ds, order), one)
        res["i"], rat["i"] = near(lambda: bench_in_process(root, order), one)
        res["c1"], rat["c1"] = near(lambda: bench_loader(root, 1, a.batches)[0], one)
        ref = _DecodeAlongside(payloads)
        c1 = bench_loader(root, 1, a.batches, alongside=ref)[0]
        rat["c1/along"] = c1 / ref.rate
        refs = [one(), two()]
        c2, consumer = bench_loader(root, 2, a.batches)
        res["c2"] = c2 / 2
        refs += [two(), one()]
        rat["c2"] = res["c2"] / ((refs[0] + refs[3]) / 2)
        rat["c2/a_2"] = res["c2"] / ((refs[1] + refs[2]) / 2)  # 2 processes decoding at once
        # 2 workers on a 2-core machine: the consumer (trainer) process takes its share of the
        # cores, the physical limit per worker is the 2-process decode rate x the share left
        rat["c2/lim2"] = rat["c2/a_2"] / min(1.0, (cores - consumer) / 2)
        rat["m2"] = consumer
        res["r1"], rat["r1"] = near(lambda: bench_loader(root, 1, a.batches, "crop")[0], one)
        res["d1"], rat["d1"] = near(lambda: bench_loader(root, 1, a.batches, "all")[0], one)
        res["p"], rat["p"] = near(lambda: bench_per_sample(root, a.batches), one)
        rounds.append(res)
        ratios.append(rat)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k}={v:.0f}/s ({rat[k]:.2f})" for k, v in res.items())
            + f", c2 vs 2-process limit {rat['c2/a_2']:.2f}, consumer {consumer:.2f} core"
            + f", c1 vs (a) alongside {rat['c1/along']:.2f}",
            flush=True,
        )
    best = {k: max(r[k] for r in rounds) for k in rounds[0]}
    ratio = {k: float(np.median([r[k] for r in ratios])) for k in ratios[0]}
    top = {k: max(r[k] for r in ratios) for k in ratios[0]}
    consumer = ratio["m2"]
    rows = [
        ("a", "(a) cv2.imdecode alone (decode limit)", 1),
        ("a_2", "(a) cv2.imdecode alone, 2 processes at once (decode limit, 2 workers)", 2),
        ("a2", "(a2) simplejpeg.decode_jpeg alone (the pipeline's JPEG decoder)", 1),
        ("b", "(b) reader + decode (RecordDataset.load)", 1),
        ("i", "(c0) a worker's batch fetch in one process, no DataLoader", 1),
        ("c1", "(c) full pipeline, DataLoader, 1 worker", 1),
        ("c2", "(c) full pipeline, DataLoader, 2 workers", 2),
        ("r1", "(r) as (c), ThinResNet recipes' random resized crop instead of the flip", 1),
        ("d1", "(d) as (c) plus random resized crop + colour jitter", 1),
        ("p", "(p) usual PyTorch: per-sample getitem, np.stack, torch's transport", 1),
    ]
    lines = [
        "# Data pipeline throughput",
        "",
        f"Pack: {len(ds)} synthetic 112x112 JPEG images ({root}). Machine: {os.cpu_count()} CPU "
        f"cores, {platform.processor() or platform.machine()}, OpenCV {cv2.__version__}; "
        f"{a.rounds} rounds. Each ratio divides a measurement by the decode limit (a) measured "
        f"on the same {len(payloads)} distinct records' JPEG bytes (in memory) just before and "
        "just after it (the mean of the two), so slow phases of this shared machine hit both "
        "alike; the table gives the median and the best round (single rates move by 10-30% "
        "between rounds).",
        "",
        "(c) is the training pipeline of the InsightFace-style recipes (ArcFace, CosFace, ... "
        "on 112x112 packs; horizontal flip only): `build_train_data`'s DataLoader, per-sample "
        "seeded augmentation, batches of 128 uint8 images delivered to the trainer process. "
        "(r) is the ThinResNet recipes' augmentation (VGGFace2 pretraining, Korean-faces "
        "fine-tuning: random resized crop of area 0.8-1, then resize back to 112, no flip). "
        "(d) adds random resized crop and colour jitter 0.7 (factors in [0.3, 1.7]) to (c). "
        "(p) is (c)'s augmentation "
        "through the usual PyTorch structure (per-sample `__getitem__`, `np.stack` collate, "
        "torch's shared-memory transport), for comparison.",
        "",
        "| stage | workers | images/s per worker (best) | vs (a), median | vs (a), best |",
        "|---|---|---|---|---|",
    ]
    rows = [r for r in rows if r[0] in best]
    for key, name, w in rows:
        lines.append(f"| {name} | {w} | {best[key]:.0f} | {ratio[key]:.2f} | {top[key]:.2f} |")
    lines += [
        "",
        "Target (c) >= 0.85 x (a) per worker, medians of the rounds:",
        "",
        f"- 1 worker: **{ratio['c1/along']:.2f}** against (a) measured *at the same time* on the "
        "other core (a thread of the consumer process decoding the same JPEGs while the worker "
        "loads; the steadiest comparison on this machine, whose speed drifts by 10-30% within "
        f"seconds); {ratio['c1']:.2f} against (a) measured just before and after (row (a) "
        f"itself reads {ratio['a']:.2f} against its own neighbours: the size of the drift).",
        f"- 2 workers: {ratio['c2/a_2']:.2f} of the decode limit of 2 processes decoding at once "
        f"({ratio['c2']:.2f} of the 1-process one). Here the trainer process needs the same 2 "
        f"cores: it used {consumer:.2f} of a core (torch's DataLoader machinery per batch); "
        "against the 2-process limit scaled to the share left to each worker, "
        f"**{ratio['c2/lim2']:.2f}**.",
        f"- Heavier augmentation is extra work per image on top of the decode: (r) reads "
        f"{ratio['r1']:.2f} of (a), i.e. the crop adds {1 / ratio['r1'] - 1 / ratio['c1']:.2f} "
        "of a decode per image to (c) (OpenCV's bilinear resize back to 112, the crop's draws "
        "and its geometry in Python, the copy into the batch row); (d) "
        f"{ratio['d1']:.2f}, adding {1 / ratio['d1'] - 1 / ratio['c1']:.2f} (that resize and "
        "the colour jitter, one affine colour map: a mean and one OpenCV pass per image).",
        f"- Against the usual PyTorch structure (p): {ratio['c1'] / ratio['p']:.2f}x as fast "
        f"with 1 worker; against the pipeline's own decoder alone (a2): "
        f"{ratio['c1'] / ratio['a2']:.2f}.",
        "",
        "How: each worker builds a whole batch in one call (`LabelledImages.fill`: the batch's "
        "random draws vectorised, each record read in place from the worker's memory map of "
        "the .rec, every image decoded and flipped straight into its row of "
        "the batch array) and writes it into a slot of a shared-memory ring mapped once "
        "before the workers fork, sending only the slot number and labels "
        "(`dist_train/data/loader.py`). torch's own transport puts every batch in a fresh "
        "shared-memory segment, and first-touch page faults on those pages cost about half a "
        "decode per image on this machine; that and per-sample Python are the gap in (p). "
        f"Per image, (a) is {1e6 / best['a']:.0f} us; with 2 workers the two workers and the "
        "trainer process share the 2 cores.",
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
