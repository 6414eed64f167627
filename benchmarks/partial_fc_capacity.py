"""Partial FC capacity: identities per GiB of process growth, per storage dtype.

For each ``weight_dtype/state_dtype`` pair, a fresh world of gloo processes (ArcFace, SGD with
momentum 0.9 and weight decay, random embeddings standing in for the backbone) builds the
classifier and runs a few training steps. Per rank it reads the resident memory before the
classifier exists (``VmRSS``, the baseline) and the peak over the training steps (``VmHWM``,
reset through ``/proc/self/clear_refs`` once the shard and its optimizer rows exist, so the
initialisation's temporaries are not counted); the process growth is peak − baseline, and
identities per GiB is the rank's classes over it. Next to it: the memory model
:func:`dist_train.partial_fc.estimate_memory_bytes` and its identities per GiB. Pairs whose
model exceeds ``--max-model-gib`` per rank are skipped (the machine is shared).

    OMP_NUM_THREADS=1 python benchmarks/partial_fc_capacity.py --out docs/bench_partial_fc.md
    OMP_NUM_THREADS=1 python benchmarks/partial_fc_capacity.py --classes 8000000 \\
        --dtypes bfloat16/bfloat16 --max-model-gib 9 --out docs/bench_partial_fc.md

Target (issue 16): ≥ 450K identities per GiB for 1M × 512 at sample rate 0.01 with bf16
weights and bf16 momentum; 8M × 512 on 2 CPU processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import heads  # noqa: E402
from benchmarks.partial_fc import _read_status, _reset_peak  # noqa: E402
from dist_train.distributed import all_gather_object  # noqa: E402
from dist_train.partial_fc import PartialFC, estimate_memory_bytes  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402


def _capacity_world(rank: int, world: int, cfg: dict) -> list[dict]:
    torch.manual_seed(rank)
    baseline = _read_status("VmRSS")
    t0 = time.perf_counter()
    pfc = PartialFC(
        heads.get_head("arcface"),
        cfg["dim"],
        cfg["classes"],
        sample_rate=cfg["rate"],
        weight_dtype=cfg["weight_dtype"],
        state_dtype=cfg["state_dtype"],
    )
    opt = pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    build_s = time.perf_counter() - t0
    built = _read_status("VmRSS")
    b_local = cfg["batch"] // world
    x = torch.randn(b_local, cfg["dim"], requires_grad=True)
    y = torch.randint(0, cfg["classes"], (b_local,))
    dist.barrier()
    reset_ok = _reset_peak()
    losses, times = [], []
    for _ in range(cfg["steps"]):
        t1 = time.perf_counter()
        loss = pfc(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        x.grad = None
        times.append(time.perf_counter() - t1)
        losses.append(loss.item())
    row = {
        "rank": rank,
        "num_local": pfc.num_local,
        "sampled": pfc.sampled_index.numel(),
        "baseline": baseline,
        "built": built,
        "peak": _read_status("VmHWM"),
        "reset_ok": reset_ok,
        "build_s": build_s,
        "step_s": sorted(times)[len(times) // 2],
        "losses": losses,
    }
    return all_gather_object(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--dtypes",
        default="float32/float32,bfloat16/float32,bfloat16/bfloat16,float16/float16",
        help="weight_dtype/state_dtype pairs, comma-separated",
    )
    ap.add_argument("--max-model-gib", type=float, default=4.0)
    ap.add_argument("--out", default="", help="markdown file to append the section to")
    args = ap.parse_args()

    lines = [
        "| weights / state | classes/rank | sampled/rank | baseline GiB | peak growth GiB "
        "| identities per GiB (measured) | model GiB | identities per GiB (model) "
        "| growth − model MiB | step s | losses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for pair in args.dtypes.split(","):
        weight_dtype, state_dtype = pair.split("/")
        model = estimate_memory_bytes(
            args.classes,
            args.world,
            embedding_size=args.dim,
            global_batch=args.batch,
            sample_rate=args.rate,
            weight_dtype=weight_dtype,
            state_dtype=state_dtype,
        )["total"]
        c_local = -(-args.classes // args.world)
        if model > args.max_model_gib * 2**30:
            lines.append(
                f"| {pair} | skipped: modelled {model / 2**30:.2f} GiB/rank > --max-model-gib "
                f"{args.max_model_gib} | | | | | | | | | |"
            )
            continue
        cfg = {
            **vars(args),
            "weight_dtype": weight_dtype,
            "state_dtype": state_dtype,
        }
        t0 = time.time()
        rows = run_distributed(_capacity_world, args.world, cfg, timeout_s=3600)[0]
        worst = max(rows, key=lambda r: r["peak"] - r["baseline"])
        growth = worst["peak"] - worst["baseline"]
        if not all(r["reset_ok"] for r in rows):
            pair += " (peak not reset: includes initialisation)"
        lines.append(
            f"| {pair} | {worst['num_local']:,} | {worst['sampled']:,} "
            f"| {worst['baseline'] / 2**30:.2f} | {growth / 2**30:.3f} "
            f"| **{worst['num_local'] / (growth / 2**30):,.0f}** | {model / 2**30:.3f} "
            f"| {c_local / (model / 2**30):,.0f} | {(growth - model) / 2**20:+.0f} "
            f"| {worst['step_s']:.3f} | {', '.join(f'{v:.2f}' for v in worst['losses'])} |"
        )
        print(f"{pair}: {time.time() - t0:.0f} s, growth {growth / 2**30:.3f} GiB", flush=True)

    text = (
        f"\n## Capacity: {args.classes:,} × {args.dim} classifier, rate {args.rate}, "
        f"{args.world} gloo processes\n\n"
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/partial_fc_capacity.py "
        f"{' '.join(sys.argv[1:])}`\n\n"
        f"Global batch {args.batch}, ArcFace, SGD with momentum 0.9 and weight decay, "
        f"{args.steps} training steps; the rank with the largest growth is shown. Torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
