"""Partial FC step time (forward / backward / optimizer) and peak memory per rank.

Runs PartialFC (ArcFace, SGD with momentum 0.9 and weight decay, fp32 storage) on a world of
gloo processes for every combination of class count, sample rate and update mode, with
random embeddings standing in for the backbone (global batch 256, D 512). Each class count
and update mode gets its own process group; its sample rates run in it from the smallest
footprint to the largest, and the peak resident memory (VmHWM) is reset before each one
through ``/proc/self/clear_refs``, so the reported peak is that configuration's. Each row also
shows the rank's baseline (RSS before the classifier exists) and the memory model of
:func:`dist_train.partial_fc.estimate_memory_bytes`; configurations whose model exceeds
``--max-model-gib`` per rank are listed as skipped rather than run (this machine is shared).

Prints a markdown table and the target ratios and writes them to ``--out``::

    OMP_NUM_THREADS=1 python benchmarks/partial_fc.py --out docs/bench_partial_fc.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import heads  # noqa: E402
from dist_train.distributed import all_gather_object  # noqa: E402
from dist_train.partial_fc import PartialFC, estimate_memory_bytes, native  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402


def _read_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _bench_world(rank: int, world: int, num_classes: int, update: str, cfg: dict) -> list[dict]:
    torch.manual_seed(rank)
    b_local = cfg["batch"] // world
    baseline = _read_status("VmRSS")
    pfc = PartialFC(
        heads.get_head("arcface"), cfg["dim"], num_classes, sample_rate=1.0, update=update
    )
    pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    results = []
    for rate in cfg["rates"]:
        pfc.sample_rate, pfc.num_sample = rate, int(rate * pfc.num_local)
        x = torch.randn(b_local, cfg["dim"], requires_grad=True)
        y = torch.randint(0, num_classes, (b_local,))
        dist.barrier()
        reset_ok = _reset_peak()
        times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        for step in range(cfg["warmup"] + cfg["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            loss = pfc(x, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            pfc.optimizer.step()
            pfc.optimizer.zero_grad()
            x.grad = None
            t3 = time.perf_counter()
            if step >= cfg["warmup"]:
                times["forward"].append(t1 - t0)
                times["backward"].append(t2 - t1)
                times["optimizer"].append(t3 - t2)
        row = {k: sum(v) / len(v) for k, v in times.items()}
        row.update(
            sampled=pfc.sampled_index.numel(),
            peak_rss=_read_status("VmHWM"),
            baseline=baseline,
            reset_ok=reset_ok,
        )
        rows = all_gather_object(row)
        # The slowest rank sets the step time; memory is the largest rank's.
        merged = {k: max(r[k] for r in rows) for k in row if k != "reset_ok"}
        merged.update(
            classes=num_classes,
            rate=rate,
            update=update,
            loss=loss.item(),
            reset_ok=all(r["reset_ok"] for r in rows),
        )
        results.append(merged)
    return results


def _clocks() -> tuple[float, float]:
    """(wall, this thread's CPU time): the CPU time is what the shared machine's load moves
    least (it excludes time spent waiting for the core or for the other rank)."""
    return time.perf_counter(), time.thread_time()


def _ratio_world(rank: int, world: int, num_classes: int, cfg: dict) -> dict:
    """One rank of the speed ratios: the classifier's forward + backward against the three
    bare matmuls of the same shapes, and its optimizer step against one streaming pass over
    the sampled rows' weights and optimizer state, interleaved repeat by repeat."""
    import statistics

    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1000 + rank)
    n, d, b_local = cfg["batch"], cfg["dim"], cfg["batch"] // world
    weight_dtype, state_dtype = cfg["dtypes"].split("/")
    pfc = PartialFC(
        heads.get_head(cfg["head"]),
        d,
        num_classes,
        sample_rate=cfg["rate"],
        weight_dtype=weight_dtype,
        state_dtype=state_dtype,
    )
    opt = pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(b_local, d, generator=gen).mul_(3.0).requires_grad_(True)
    y = torch.randint(0, num_classes, (b_local,), generator=gen)
    s = pfc.sample_size(n)
    # The bare matmuls: logits [N, D]·[D, S], grad wrt embeddings [N, S]·[S, D], grad wrt the
    # sampled rows [S, N]·[N, D]; fp32 like the classifier's maths.
    x_hat = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    w_s = torch.randn(s, d, generator=gen)
    g_ns = torch.randn(n, s, generator=gen)
    # The stream: SGD with momentum over contiguous [S, D] tensors of the storage and state
    # dtypes: m ← g + μ·m (reads g, m; writes m), w ← w − lr·m (reads w, m; writes w).
    w_c = torch.randn(s, d, generator=gen).to(pfc.weight.dtype)
    m_c = torch.zeros(s, d, dtype=opt.state_dtype)
    g_c = torch.randn(s, d, generator=gen)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        w0, c0 = _clocks()
        fn()
        w1, c1 = _clocks()
        times.setdefault(name + "_wall", []).append(w1 - w0)
        times.setdefault(name + "_cpu", []).append(c1 - c0)

    def fwd_bwd() -> None:
        pfc(x, y).backward()

    def opt_step() -> None:
        opt.step()

    def opt_step_torch() -> None:
        # the same gradient once more through the torch path (gather, update, scatter in
        # chunks), which the compiled kernel replaces on CPU: both in one run
        opt.use_native = False
        opt.step()
        opt.use_native = True
        opt.zero_grad()
        x.grad = None

    def bare() -> None:
        x_hat @ w_s.t()
        g_ns @ w_s
        g_ns.t() @ x_hat

    # The same matmuls into outputs kept across repeats: the arithmetic alone. Fresh outputs
    # of this size (51 and 102 MB) are new mmap pages whose first write page-faults every
    # time, as the classifier's own buffers did before it kept them (kernels.Workspace).
    kept = (torch.empty(n, s), torch.empty(n, d), torch.empty(s, d))

    def bare_kept() -> None:
        torch.mm(x_hat, w_s.t(), out=kept[0])
        torch.mm(g_ns, w_s, out=kept[1])
        torch.mm(g_ns.t(), x_hat, out=kept[2])

    def stream() -> None:
        torch.add(g_c, m_c, alpha=0.9, out=m_c)
        w_c.add_(m_c, alpha=-0.1)

    for step in range(cfg["warmup"] + cfg["repeats"]):
        dist.barrier()
        timed("fwd_bwd", fwd_bwd)
        timed("optimizer", opt_step)
        timed("optimizer_torch", opt_step_torch)
        timed("matmuls", bare)
        timed("matmuls_kept", bare_kept)
        timed("stream", stream)
        if step < cfg["warmup"]:
            times.clear()
    out = {k: statistics.median(v) for k, v in times.items()}
    out["sampled"] = pfc.sampled_index.numel()
    out["compiled"] = float(native.library() is not None)
    return out


def speed_ratios(num_classes: int, cfg: dict) -> str:
    """Markdown lines of the two ratios of issue 16 (slowest rank's medians)."""
    ranks = run_distributed(_ratio_world, cfg["world"], num_classes, cfg, timeout_s=3600)
    med = {k: max(r[k] for r in ranks) for k in ranks[0]}
    path = "compiled kernel" if med["compiled"] else "torch path (no C compiler)"
    lines = [
        f"C = {num_classes:,}, rate {cfg['rate']}, {cfg['world']} gloo processes, global "
        f"batch {cfg['batch']}, D {cfg['dim']}, head {cfg['head']}, weights/state "
        f"{cfg['dtypes']}, {med['sampled']:,} sampled rows per rank; median of "
        f"{cfg['repeats']} interleaved repeats after {cfg['warmup']} warm-up, slowest rank; "
        f"optimizer step through the {path}, and through the torch path:",
        "",
        "| clock | fwd+bwd ms | 3 bare matmuls ms | **fwd+bwd / matmuls** | matmuls into kept "
        "outputs ms | fwd+bwd / those | optimizer step ms | stream ms | **step / stream** | "
        "torch-path step ms | torch-path step / stream |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clock in ("cpu", "wall"):
        fb, mm = med[f"fwd_bwd_{clock}"], med[f"matmuls_{clock}"]
        op, st = med[f"optimizer_{clock}"], med[f"stream_{clock}"]
        ot, mk = med[f"optimizer_torch_{clock}"], med[f"matmuls_kept_{clock}"]
        lines.append(
            f"| {clock} | {fb * 1e3:.1f} | {mm * 1e3:.1f} | **{fb / mm:.2f}×** | "
            f"{mk * 1e3:.1f} | {fb / mk:.2f}× | {op * 1e3:.1f} | {st * 1e3:.1f} | "
            f"**{op / st:.2f}×** | {ot * 1e3:.1f} | {ot / st:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def sampler_scaling(shards: list[int], sampled: int, batch: int, repeats: int) -> str:
    """Time of :meth:`PartialFC.sample` (one process, CPU time) on shards of different sizes
    with the same sampled count: flat when the sampling is O(S)."""
    import statistics

    lines = [
        "| shard rows (C_local) | sampled rows | sample() CPU ms (median) |",
        "|---:|---:|---:|",
    ]
    models = []
    for c_local in shards:
        pfc = PartialFC(heads.get_head("arcface"), 8, c_local, sample_rate=sampled / c_local)
        labels = torch.randint(0, c_local, (batch,), generator=torch.Generator().manual_seed(0))
        models.append((c_local, pfc, labels))
    times: dict[int, list[float]] = {c: [] for c in shards}
    for _ in range(repeats):
        for c_local, pfc, labels in models:
            t0 = time.thread_time()
            pfc.sample(labels)
            times[c_local].append(time.thread_time() - t0)
    for c_local in shards:
        med = statistics.median(times[c_local][1:])
        lines.append(f"| {c_local:,} | {sampled:,} | {med * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def optimizer_scaling(shards: list[int], sampled: int, dim: int, repeats: int) -> str:
    """Sparse and dense optimizer step on shards of different sizes, same sampled rows.

    One process, the shards built side by side, steps interleaved A, B, A, B, … and the
    median taken, so load from other processes hits both alike. The step is rank-local, so
    a world-size-1 shard of C_local rows times exactly what one rank of a larger world does.
    """
    import statistics

    lines = [
        "| shard rows (C_local) | sampled rows | sparse step ms (median) "
        "| dense step ms (median) |",
        "|---:|---:|---:|---:|",
    ]
    medians: dict[tuple[str, int], float] = {}
    for update in ("sparse", "dense"):
        models = []
        for c_local in shards:
            pfc = PartialFC(
                heads.get_head("arcface"),
                dim,
                c_local,
                sample_rate=sampled / c_local,
                update=update,
            )
            opt = pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
            index = torch.randperm(c_local)[:sampled].sort().values
            grad = torch.randn(sampled, dim)
            models.append((c_local, pfc, opt, index, grad))
        times: dict[int, list[float]] = {c: [] for c in shards}
        for _ in range(repeats):
            for c_local, _pfc, opt, index, grad in models:
                leaf = torch.zeros(sampled, dim, requires_grad=True)
                leaf.grad = grad.clone()
                opt.attach(leaf, index)
                t0 = time.perf_counter()
                opt.step()
                times[c_local].append(time.perf_counter() - t0)
        for c_local in shards:
            medians[(update, c_local)] = statistics.median(times[c_local][1:])
        del models
    for c_local in shards:
        lines.append(
            f"| {c_local:,} | {sampled:,} | {medians[('sparse', c_local)] * 1e3:.1f} | "
            f"{medians[('dense', c_local)] * 1e3:.1f} |"
        )
    a, b = shards[0], shards[-1]
    lines.append("")
    lines.append(
        f"- sparse step, {b:,} / {a:,} shard rows at {sampled:,} sampled rows: "
        f"{medians[('sparse', b)] / medians[('sparse', a)]:.2f}× (target ≤ 1.2×); dense: "
        f"{medians[('dense', b)] / medians[('dense', a)]:.2f}×"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="85742,1000000,2000000")
    ap.add_argument("--rates", default="1.0,0.3,0.1")
    ap.add_argument("--modes", default="sparse,dense")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="", help="markdown file to write the table to")
    ap.add_argument(
        "--max-model-gib",
        type=float,
        default=7.0,
        help="skip configurations whose modelled classifier memory per rank exceeds this",
    )
    ap.add_argument(
        "--scaling-only",
        action="store_true",
        help="run only the interleaved optimizer-step scaling comparison (appended to --out)",
    )
    ap.add_argument("--scaling-repeats", type=int, default=11)
    ap.add_argument(
        "--ratios-only",
        action="store_true",
        help="run only the speed ratios (fwd+bwd / bare matmuls, optimizer step / stream) at "
        "the first --classes and --rates values (appended to --out)",
    )
    ap.add_argument("--repeats", type=int, default=7, help="repeats of --ratios-only")
    ap.add_argument("--head", default="arcface", help="margin head of --ratios-only")
    ap.add_argument(
        "--dtypes",
        default="float32/float32",
        help="weight/state storage dtypes of --ratios-only (e.g. bfloat16/bfloat16)",
    )
    ap.add_argument(
        "--sampler-only",
        action="store_true",
        help="run only the sampling time against the shard size (appended to --out)",
    )
    args = ap.parse_args()
    if args.sampler_only:
        text = (
            "\n## Negative sampling against shard size (one process)\n\n"
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/partial_fc.py "
            f"{' '.join(sys.argv[1:])}`\n\n"
            + sampler_scaling([500000, 1000000, 5000000], 50000, args.batch, args.scaling_repeats)
        )
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text)
        return
    if args.ratios_only:
        c = int(float(args.classes.split(",")[0]))
        cfg = {
            "rate": float(args.rates.split(",")[0]),
            "batch": args.batch,
            "dim": args.dim,
            "world": args.world,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "head": args.head,
            "dtypes": args.dtypes,
        }
        text = (
            "\n## Speed against the hardware: fwd+bwd / bare matmuls, step / stream\n\n"
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/partial_fc.py "
            f"{' '.join(sys.argv[1:])}`\n\n" + speed_ratios(c, cfg)
        )
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text)
        return
    if args.scaling_only:
        text = (
            "\n## Optimizer step against shard size (interleaved, one process)\n\n"
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/partial_fc.py "
            f"{' '.join(sys.argv[1:])}`\n\n"
            + optimizer_scaling([500000, 1000000], 50000, args.dim, args.scaling_repeats)
        )
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text)
        return
    cfg = {
        "rates": [float(r) for r in args.rates.split(",")],
        "modes": args.modes.split(","),
        "batch": args.batch,
        "dim": args.dim,
        "warmup": args.warmup,
        "steps": args.steps,
        # 2M at rate 0.05 samples as many rows per rank as 1M at rate 0.1: the pair for the
        # "optimizer step independent of the shard size" target.
        "extra_sparse_rates": {2000000: [0.05]},
    }
    t_start = time.time()
    rows, skipped = [], []
    for c in (int(float(c)) for c in args.classes.split(",")):
        for update in cfg["modes"]:
            extra = cfg["extra_sparse_rates"].get(c, []) if update == "sparse" else []
            rates = []
            # Smallest footprint first: a larger earlier run would leave its heap behind.
            for rate in sorted(set(cfg["rates"] + extra)):
                model = estimate_memory_bytes(
                    c,
                    args.world,
                    embedding_size=args.dim,
                    global_batch=args.batch,
                    sample_rate=rate,
                )
                if model["total"] > args.max_model_gib * 2**30:
                    skipped.append((c, update, rate, model["total"]))
                else:
                    rates.append(rate)
            if not rates:
                continue
            t0 = time.time()
            part = run_distributed(
                _bench_world, args.world, c, update, {**cfg, "rates": rates}, timeout_s=3600
            )[0]
            for r in part:
                r["model"] = estimate_memory_bytes(
                    c,
                    args.world,
                    embedding_size=args.dim,
                    global_batch=args.batch,
                    sample_rate=r["rate"],
                )["total"]
            rows += part
            print(f"C={c} {update}: {time.time() - t0:.0f} s", flush=True)

    lines = [
        "| classes | mode | rate | sampled/rank | forward s | backward s | optimizer s | "
        "step s | peak RSS/rank GiB | baseline GiB | model GiB | peak − baseline − model |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step = r["forward"] + r["backward"] + r["optimizer"]
        r["step"] = step
        lines.append(
            f"| {r['classes']:,} | {r['update']} | {r['rate']} | {r['sampled']:,} | "
            f"{r['forward']:.3f} | {r['backward']:.3f} | {r['optimizer']:.4f} | {step:.3f} | "
            f"{r['peak_rss'] / 2**30:.2f} | {r['baseline'] / 2**30:.2f} | "
            f"{r['model'] / 2**30:.2f} | "
            f"{(r['peak_rss'] - r['baseline'] - r['model']) / 2**30:+.2f} |"
        )
    for c, update, rate, model in skipped:
        lines.append(
            f"| {c:,} | {update} | {rate} | skipped: modelled {model / 2**30:.1f} GiB/rank > "
            f"--max-model-gib {args.max_model_gib} | | | | | | | | |"
        )

    def find(c, update, rate):
        for r in rows:
            if r["classes"] == c and r["update"] == update and r["rate"] == rate:
                return r
        return None

    notes = []
    a, b = find(1000000, "sparse", 1.0), find(1000000, "sparse", 0.1)
    if a and b:
        notes.append(
            f"- 1M identities, sparse: step at rate 1.0 / rate 0.1 = {a['step'] / b['step']:.2f}× "
            "(target ≥ 5×)"
        )
    a, b = find(1000000, "sparse", 0.1), find(2000000, "sparse", 0.05)
    a2 = find(2000000, "sparse", 0.1)
    if a and b:
        notes.append(
            f"- sparse optimizer step, same sampled count ({a['sampled']:,} rows/rank): "
            f"2M (rate 0.05) / 1M (rate 0.1) = {b['optimizer'] / a['optimizer']:.2f}× "
            "(target ≤ 1.2×)"
        )
    d1, d2 = find(1000000, "dense", 0.1), find(2000000, "dense", 0.1)
    if a and a2:
        ratio = a2["optimizer"] / a["optimizer"]
        notes.append(f"- sparse optimizer step at rate 0.1 (2× the rows): 2M / 1M = {ratio:.2f}×")
    if d1 and d2:
        ratio = d2["optimizer"] / d1["optimizer"]
        notes.append(f"- dense optimizer step at rate 0.1 (2× the shard): 2M / 1M = {ratio:.2f}×")
    for c in sorted({r["classes"] for r in rows}):
        s, d = find(c, "sparse", 0.1), find(c, "dense", 0.1)
        if s and d:
            notes.append(
                f"- C={c:,}, rate 0.1: dense / sparse optimizer step = "
                f"{d['optimizer'] / s['optimizer']:.1f}×, step = {d['step'] / s['step']:.2f}×"
            )
    if not all(r["reset_ok"] for r in rows):
        notes.append("- /proc/self/clear_refs was not writable: peaks are cumulative per C")
    header = (
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/partial_fc.py {' '.join(sys.argv[1:])}`\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"{args.world} gloo processes, 1 thread each; ArcFace, SGD momentum 0.9, fp32 storage; "
        f"global batch {args.batch}, D {args.dim}; mean of {args.steps} steps after "
        f"{args.warmup} warm-up; time = slowest rank, memory = largest rank. "
        f"Total benchmark time {time.time() - t_start:.0f} s.\n"
    )
    text = header + "\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Partial FC benchmark\n\n" + text)


if __name__ == "__main__":
    main()
