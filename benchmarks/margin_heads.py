"""Step time of each margin head inside Partial FC, relative to ArcFace, in one process.

One step = forward (gather, sampling, cosines, head, sharded cross-entropy), backward and the
sparse SGD step of the classifier, on a random batch of unit-scale embeddings. The heads run
interleaved, round after round, so a drift of the machine's speed hits them alike; the
median per head is reported with its ratio to ArcFace's.

    python benchmarks/margin_heads.py --classes 1000000 --rate 0.1 --batch 1024
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
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, args.dim, generator=gen) * 3).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
    pfcs = {}
    for name in HEADS:
        pfc = PartialFC(heads.get_head(name), args.dim, args.classes, args.rate).to(device)
        pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        step(pfc, x, y)  # warm-up
        pfcs[name] = pfc
    times: dict[str, list[float]] = {n: [] for n in HEADS}
    for _ in range(args.rounds):
        for name, pfc in pfcs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(pfc, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["arcface"])
    print(
        f"C={args.classes} rate={args.rate} batch={args.batch} D={args.dim} "
        f"device={device} threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    print("| head | step (ms, median) | vs ArcFace |")
    print("|---|---|---|")
    for name in HEADS:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
