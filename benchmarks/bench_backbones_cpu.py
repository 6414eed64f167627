"""CPU training throughput of the small backbones, side by side, for choosing the CPU demo net.

    OMP_NUM_THREADS=1 python benchmarks/bench_backbones_cpu.py [--batch 16] [--iters 3]

Measures forward + backward (train mode, fp32, 112x112, one thread as in a 2-process run on
2 cores) in samples/s, prints a table with the ratio to iresnet18 and writes it to
docs/bench_backbones_cpu.md. Timings on a shared machine are noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import backbones  # noqa: E402
from backbones.info import human, model_info  # noqa: E402

CONFIGS = [
    ("iresnet18", {}),
    ("iresnet18", {"width_mult": 0.5}),
    ("iresnet18", {"width_mult": 0.25}),
    ("mobilefacenet", {}),
    ("mobilefacenet", {"width_mult": 0.5}),
    ("thin_resnet34", {}),
    ("efficientnet_b0", {}),
]


def samples_per_s(name: str, kwargs: dict, batch: int, iters: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = backbones.get_backbone(name, **kwargs).train()
    x = torch.randn(batch, 3, 112, 112)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model(x).square().mean().backward()  # warm-up: allocator and kernel selection
    start = time.perf_counter()
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_backbones_cpu.md"),
    )
    args = parser.parse_args()
    rows = []
    for name, kwargs in CONFIGS:
        for channels_last in (False, True):
            sps = samples_per_s(name, kwargs, args.batch, args.iters, channels_last)
            info = model_info(name, **kwargs)
            label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
            rows.append((label, channels_last, info.params, info.macs, sps))
            print(
                f"{label:<32} channels_last={channels_last!s:<5} {sps:8.1f} samples/s", flush=True
            )
    base = rows[0][4]
    lines = [
        f"CPU forward+backward, fp32, 112x112, batch {args.batch}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {args.iters} timed "
        "iterations after one warm-up (shared machine: compare ratios, not absolutes).",
        "",
        "| network | channels_last | params | MACs | samples/s | vs iresnet18 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, cl, params, macs, sps in rows:
        lines.append(
            f"| {label} | {cl} | {params:,} | {human(macs)} | {sps:.1f} | {sps / base:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text("# Backbone CPU training throughput\n\n" + text)


if __name__ == "__main__":
    main()
