"""Activation memory of a training step with and without gradient checkpointing.

For each backbone and each checkpointing mode ("none", "stage", "block") one fresh process
builds the network (train mode, seed 0), runs forward + backward on a fixed random batch, and
measures:

- **saved for backward** (CPU and CUDA; exact, device-independent): the bytes of the distinct
  tensor storages that autograd keeps from the forward pass for the backward pass, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` and excluding the parameters themselves. This
  is the activation memory alive at the end of the forward pass, which is the peak of a
  training step up to the transient memory of backward. Under checkpointing it counts what
  checkpointing keeps (each checkpointed unit's input); the activations it *recomputes* during
  backward exist only while one unit's backward runs and are not counted here, which is why
  the next two columns are also given.
- **peak RSS delta** (CPU): peak resident memory during forward + backward (``VmHWM``, reset
  through ``/proc/self/clear_refs``) minus the resident memory just before the forward, with
  the gradient buffers allocated beforehand so that they are not part of the delta. It
  includes the recomputation's transient memory and the allocator's slack.
- **peak allocated delta** (CUDA): ``torch.cuda.max_memory_allocated()`` during forward +
  backward minus ``memory_allocated()`` before it, gradient buffers allocated beforehand.

It also checks that the three modes give the same loss and the same gradient norm.

    OMP_NUM_THREADS=1 python benchmarks/memory.py --out docs/bench_trainer.md

Target (issue 5, point 2): at least 40% less activation memory for iresnet50 with "stage" or
"block" checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("none", "stage", "block")
NOTES = """

"Saved for backward" is exact and independent of the device: the activation memory a step holds
between its forward and its backward. Checkpointing keeps only each checkpointed unit's input
(a stage, or a block: per-block keeps more boundaries than per-stage, hence its larger number)
and recomputes the rest during backward; that recomputation briefly holds one unit's
activations plus their gradients, memory that this column does not count. The peak column
measures it: it includes the largest unit's recomputation and the activation gradients of
backward, so its savings are smaller than those of the first column. Each configuration runs in
a fresh process with glibc's mmap threshold fixed at 64 KiB, so freed activations leave the
resident set at once and RSS follows live memory (without it the peak also holds freed heap
blocks and the savings look smaller). On a GPU the same script
with `--device cuda` reports `torch.cuda.max_memory_allocated` instead of RSS.
"""
MIB = 2**20


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(name: str, mode: str, batch: int, size: int, device: str) -> dict:
    """One forward + backward of ``name`` under checkpointing ``mode``; the measurements."""
    import torch

    import backbones

    torch.manual_seed(0)
    dev = torch.device(device)
    model = backbones.get_backbone(name, embedding_size=512, checkpointing=mode).to(dev).train()
    x = torch.randn(batch, 3, size, size, device=dev)
    params = list(model.parameters())
    for p in params:  # allocated now, so the measured delta is activations only
        p.grad = torch.zeros_like(p)
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        base = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    seconds = time.perf_counter() - t0
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    return {
        "saved": sum(saved.values()),
        "peak": peak,
        "seconds": seconds,
        "loss": loss.item(),
        "grad_norm": grad_norm,
    }


def _run_child(name: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        mode,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--device",
        args.device,
    ]
    # glibc serves large blocks by mmap (returned to the OS on free) only below a threshold
    # that it raises as blocks are freed; fixing it low makes RSS follow live memory instead of
    # keeping freed activations resident in the heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_section(path: str, key: str, text: str) -> None:
    """Replaces the ``<!-- key -->`` ... ``<!-- /key -->`` block of ``path`` (appends it if
    absent), so that several benchmarks share one markdown file."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = open(path).read() if os.path.exists(path) else "# Trainer benchmarks\n\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default="iresnet50,iresnet18,mobilefacenet,efficientnet_b0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="markdown file to write the table to")
    p.add_argument("--child", nargs=2, metavar=("NETWORK", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.batch, args.size, args.device)))
        return

    peak_name = "peak allocated delta" if args.device.startswith("cuda") else "peak RSS delta"
    rows = [
        f"| network | checkpointing | saved for backward (MiB) | vs none | {peak_name} (MiB) "
        "| vs none | fwd+bwd (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    load_start = os.getloadavg()[0]
    for name in args.networks.split(","):
        results = {mode: _run_child(name, mode, args) for mode in MODES}
        ref = results["none"]
        for mode in MODES:
            r = results[mode]
            # recomputation must not change the maths (BN statistics are restored)
            if abs(r["grad_norm"] - ref["grad_norm"]) > 1e-4 * ref["grad_norm"] or abs(
                r["loss"] - ref["loss"]
            ) > 1e-5 * abs(ref["loss"]):
                raise RuntimeError(f"{name}/{mode}: loss or gradient differ from 'none': {r}")
            saved_ratio, peak_ratio = r["saved"] / ref["saved"], r["peak"] / ref["peak"]
            ratios[(name, mode)] = (saved_ratio, peak_ratio)
            rows.append(
                f"| {name} | {mode} | {r['saved'] / MIB:.1f} | {saved_ratio:.2f} | "
                f"{r['peak'] / MIB:.1f} | {peak_ratio:.2f} | {r['seconds']:.2f} |"
            )
            print(rows[-1], flush=True)
    load = (load_start, os.getloadavg()[0])
    header = (
        f"batch {args.batch} x 3 x {args.size} x {args.size}, fp32, train mode, device "
        f"{args.device}, torch {__import__('torch').__version__}; 1-min load average at start / "
        f"end {load[0]:.1f} / {load[1]:.1f}; loss and gradient norm equal across modes (checked)."
    )
    command = "OMP_NUM_THREADS=1 python benchmarks/memory.py " + " ".join(sys.argv[1:])
    lines = [
        "## Activation memory with gradient checkpointing",
        "",
        f"`{command}`",
        "",
        header,
        "",
        *rows,
        "",
    ]
    for mode in ("stage", "block"):
        if ("iresnet50", mode) in ratios:
            saved_ratio, peak_ratio = ratios[("iresnet50", mode)]
            verdict = "met" if saved_ratio <= 0.6 else "NOT met"
            lines.append(
                f"- iresnet50, {mode}: {1 - saved_ratio:.0%} less memory saved for backward "
                f"({1 - peak_ratio:.0%} less peak); target >= 40% less: {verdict}"
            )
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        write_section(args.out, "memory", text + NOTES)


if __name__ == "__main__":
    main()
