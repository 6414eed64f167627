"""Step time of each margin head inside Partial FC, relative to ArcFace, in one process.

One step = forward (gather, sampling, cosines, head, sharded cross-entropy), backward and the
sparse SGD step of the classifier, on a random batch of embeddings. The heads run
interleaved, round after round, so a drift of the machine's speed hits them alike; the
median per head is reported with its ratio to ArcFace's, in CPU time of the (one-thread)
process and in wall time. ``arcface_x{K}`` is ArcFace with K·C classes: the same matmul
shapes as Sub-center ArcFace with K sub-centres, its honest baseline.

    python benchmarks/margin_heads.py --classes 1000000 --rate 0.1 --batch 1024
    OMP_NUM_THREADS=1 python benchmarks/margin_heads.py --classes 200000 --batch 256 \
        --heads arcface,subcenter_arcface,arcface_x3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import heads
from dist_train.partial_fc import PartialFC

# ArcFace, the reference, then the heads of issue 15
HEADS = [
    "arcface",
    "adaface",
    "curricularface",
    "elasticface_arc",
    "elasticface_cos",
    "magface",
    "subcenter_arcface",
]


def build(name: str, dim: int, classes: int, rate: float) -> PartialFC:
    """The classifier of ``name``: a registered head, or ``arcface_x{K}`` (ArcFace, K·C)."""
    if name.startswith("arcface_x"):
        return PartialFC(heads.get_head("arcface"), dim, classes * int(name[9:]), rate)
    return PartialFC(heads.get_head(name), dim, classes, rate)


def step(pfc: PartialFC, x: torch.Tensor, y: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    loss = pfc(x, y)
    loss.backward()
    pfc.optimizer.step()
    pfc.optimizer.zero_grad()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=1024, help="global batch")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", default=",".join(HEADS), help="comma list; the first is the base")
    args = ap.parse_args()
    names = args.heads.split(",")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, args.dim, generator=gen) * 3).to(device)  # norms ~68
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
    pfcs = {}
    for name in names:
        pfc = build(name, args.dim, args.classes, args.rate).to(device)
        pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        step(pfc, x, y)  # warm-up
        pfcs[name] = pfc
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name, pfc in pfcs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step(pfc, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    base, base_cpu = statistics.median(times[names[0]]), statistics.median(cpu[names[0]])
    print(
        f"C={args.classes} rate={args.rate} batch={args.batch} D={args.dim} "
        f"device={device} threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    print(
        f"| head | CPU ms (median) | vs {names[0]} (CPU) | wall ms (median) "
        f"| vs {names[0]} (wall) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in names:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        print(
            f"| {name} | {med_cpu * 1e3:.1f} | {med_cpu / base_cpu:.2f}x | {med * 1e3:.1f} | "
            f"{med / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
