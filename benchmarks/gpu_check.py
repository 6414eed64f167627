"""One prepared GPU check of the trainer: speed, host syncs, fp16 resume, Partial FC at 10M
identities, memory format, loader throughput and the failing-rank exit. Writes docs/bench_gpu.md.

    python benchmarks/gpu_check.py --out docs/bench_gpu.md          # one H100/H200, <= 8 min
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke.md  # every section, tiny, CPU

Sections (each prints its table as it finishes; a failing section is reported and the others
still run):

1. **trainer**: the real :class:`dist_train.trainer.Trainer` (iresnet50, bf16, ArcFace in
   Partial FC) in a NCCL process group of world size 1 with the backbone DDP-wrapped as in a
   multi-GPU run; batches already in host memory (pinned), so the figure is the step, not the
   loader. Samples/s and model FLOPs utilisation: 3 x 2 x MACs per sample
   (:func:`backbones.info.model_info`, conv + linear) over the GPU's dense bf16 peak.
2. **host syncs**: ``torch.cuda.set_sync_debug_mode("warn")`` during steps without a log line;
   the warnings per step are the synchronising calls.
3. **fp16 resume**: fp16 with GradScaler, deterministic; a run stopped at step k and resumed
   against the same run without a stop: losses and loss scale after the resume.
4. **Partial FC alone**: 10M identities x 512 on one GPU, global batch 1024: sparse and dense
   updates, TF32 on and off, bf16 storage; step time and peak memory per identity against
   :func:`dist_train.partial_fc.estimate_memory_bytes`.
5. **memory format and cudnn.benchmark**: iresnet50 bf16 forward + backward + SGD step with
   model and input NCHW / channels_last (and the mismatch), ``cudnn.benchmark`` off / on.
6. **loader**: images/s of the real RecordIO loader with 4, 8 and 12 workers.
7. **failing rank**: ``torchrun --nproc_per_node=2 launch/train.py`` where one rank reads a
   corrupt record; the job must end non-zero within the time limit. It runs on gloo (one GPU
   cannot host two NCCL ranks); the exit path is the same code.

``--cpu-smoke`` (automatic without CUDA) runs every section on CPU with tiny sizes and gloo in
well under a minute, so that the script cannot rot (``tests/test_gpu_check.py``); its figures
say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks (SXM unless named), matched as substrings of the GPU name."""


@dataclasses.dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    network: str
    params: str
    image_size: int
    identities: int
    images_per_identity: int
    batch: int
    steps: int
    warmup: int
    pfc_classes: int
    pfc_dim: int
    pfc_batch: int
    pfc_steps: int
    loader_workers: tuple[int, ...]
    loader_batches: int
    resume_steps: int
    fail_limit_s: float


GPU = Sizes(
    network="iresnet50", params="{}", image_size=112, identities=1000, images_per_identity=20,
    batch=256, steps=30, warmup=10, pfc_classes=10_000_000, pfc_dim=512, pfc_batch=1024,
    pfc_steps=10, loader_workers=(4, 8, 12), loader_batches=60, resume_steps=6,
    fail_limit_s=120.0,
)  # fmt: skip
SMOKE = Sizes(
    network="iresnet18", params="{width_mult: 0.25, input_size: 32}", image_size=32,
    identities=24, images_per_identity=6, batch=8, steps=3, warmup=1, pfc_classes=20_000,
    pfc_dim=32, pfc_batch=64, pfc_steps=2, loader_workers=(1, 2), loader_batches=6,
    resume_steps=2, fail_limit_s=15.0,
)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(sz: Sizes, run_dir: Path, data_root: Path, *extra: str):
    from dist_train.config import load_config

    return load_config(
        None,
        [
            f"output_dir={run_dir}",
            f"data.root={data_root}",
            f"data.image_size={sz.image_size}",
            f"data.batch_size={sz.batch}",
            "data.num_workers=0",
            f"backbone.name={sz.network}",
            "backbone.embedding_size=512",
            f"backbone.params={sz.params}",
            "head.name=arcface",
            "head.params={s: 64.0, m: 0.5}",
            "scheduler.name=constant",
            "optim.lr=0.02",
            "checkpoint.at_epoch_end=false",
            "tensorboard=false",
            "log_every_steps=1000000",
            "max_steps=1000000",
            *extra,
        ],
    )


class InMemoryLoader:
    """An epoch of pre-made ``(images uint8 [B,3,H,W], labels int64 [B])`` batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _trainer(cfg, device: torch.device, *, in_memory: int = 0):
    """A Trainer in the world-size-1 process group, its backbone DDP-wrapped as with W > 1."""
    from dist_train.data import build_train_data
    from dist_train.distributed import DistInfo
    from dist_train.model_setup import allreduce_sum_hook, wrap_ddp
    from dist_train.trainer import Trainer

    info = DistInfo(device=device)
    data = None
    if in_memory:
        real = build_train_data(cfg.data, info, cfg.seed)
        gen = torch.Generator().manual_seed(0)
        size, b = cfg.data.image_size, cfg.data.batch_size
        batches = []
        for _ in range(in_memory):
            images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=gen)
            images = images.permute(0, 3, 1, 2)  # the loader's channels_last-strided view
            labels = torch.randint(0, real.num_classes, (b,), generator=gen)
            if device.type == "cuda":
                images, labels = images.pin_memory(), labels.pin_memory()
            batches.append((images, labels))
        data = dataclasses.replace(real, loader=InMemoryLoader(batches))
    trainer = Trainer(cfg, info, data=data)
    # what Trainer does when W > 1 (DistInfo.is_distributed), here in a group of one
    trainer.model = wrap_ddp(trainer.backbone, device)
    trainer.model.register_comm_hook(None, allreduce_sum_hook)
    trainer.train_step.model = trainer.model
    return trainer


def _run_steps(trainer, steps: int) -> None:
    trainer.total_steps = trainer.step + steps
    trainer.fit(finish=False)


# ------------------------------------------------------------------------------------------
def section_trainer(sz: Sizes, device: torch.device, tmp: Path, data: Path, peak: float) -> str:
    from backbones.info import model_info

    cfg = _config(sz, tmp / "speed", data, "amp=bf16")
    trainer = _trainer(cfg, device, in_memory=sz.warmup + sz.steps)
    _run_steps(trainer, sz.warmup)
    _sync(device)
    t0 = time.perf_counter()
    _run_steps(trainer, sz.steps)
    _sync(device)
    elapsed = time.perf_counter() - t0
    rate = sz.steps * sz.batch / elapsed
    kw = {"width_mult": 0.25} if "width_mult" in sz.params else {}
    macs = model_info(sz.network, (sz.image_size, sz.image_size), 512, **kw).macs
    flops = 6.0 * macs * rate
    mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak > 0 else "n/a (no peak for this device)"
    return (
        "| network | input | batch | amp | samples/s | model TFLOP/s (6 x MACs) | MFU |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {sz.network} | {sz.image_size}x{sz.image_size} | {sz.batch} | bf16 | {rate:,.1f} "
        f"| {flops / 1e12:.2f} | {mfu} |\n"
    )


def section_syncs(sz: Sizes, device: torch.device, tmp: Path, data: Path) -> str:
    cfg = _config(sz, tmp / "syncs", data, "amp=bf16")
    trainer = _trainer(cfg, device, in_memory=sz.warmup + sz.steps)
    _run_steps(trainer, sz.warmup)
    _sync(device)
    cuda = device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            _run_steps(trainer, sz.steps)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    per_step = len(syncs) / sz.steps
    value = f"{per_step:.1f}" if cuda else "n/a (CUDA sync debug mode; CPU run)"
    lines = [
        "| steps | synchronising calls per step | target |",
        "|---|---|---|",
        f"| {sz.steps} | {value} | <= 1 |",
        "",
    ]
    if where:
        lines += ["| call site | calls per step |", "|---|---|"]
        lines += [f"| {k} | {v / sz.steps:.1f} |" for k, v in sorted(where.items())]
    return "\n".join(lines) + "\n"


def section_fp16_resume(sz: Sizes, device: torch.device, tmp: Path, data: Path) -> str:
    k = sz.resume_steps
    extra = ("amp=fp16", "deterministic=true", f"checkpoint.every_steps={k}", "data.num_workers=2")

    def run(run_dir: Path, stop_at: int | None, *more: str) -> tuple[list[float], float]:
        cfg = _config(sz, run_dir, data, *extra, *more)
        trainer = _trainer(cfg, device)
        losses: list[float] = []
        trainer.total_steps = stop_at if stop_at is not None else 2 * k
        trainer.fit(on_step=losses.append, finish=False)
        return losses, trainer.scaler.get_scale()

    try:
        straight, scale_straight = run(tmp / "fp16_straight", None)
        first, scale_stop = run(tmp / "fp16_resumed", k)
        resumed, scale_resumed = run(tmp / "fp16_resumed", None, "checkpoint.resume=auto")
    finally:
        # deterministic=true is process-wide: the sections after this one time the defaults
        torch.use_deterministic_algorithms(False)
        from dist_train.device_setup import apply_backend_flags, backend_flags

        apply_backend_flags(backend_flags(device.type, tf32=True, deterministic=False))
    diffs = [abs(a - b) for a, b in zip(resumed, straight[k:])]
    same = len(resumed) == k and all(d == 0 for d in diffs)
    return (
        "| steps | losses after resume | same run without a stop | max abs difference "
        "| loss scale at stop / end (resumed, straight) | identical |\n"
        "|---|---|---|---|---|---|\n"
        f"| {k} + {k} | {', '.join(f'{x:.4f}' for x in resumed)} "
        f"| {', '.join(f'{x:.4f}' for x in straight[k:])} | {max(diffs, default=float('nan')):.2e} "
        f"| {scale_stop:g} / {scale_resumed:g}, {scale_straight:g} | {'yes' if same else 'no'} |\n"
    )


def section_partial_fc(sz: Sizes, device: torch.device) -> str:
    import heads
    from dist_train.device_setup import apply_backend_flags, backend_flags
    from dist_train.partial_fc import PartialFC, estimate_memory_bytes

    cuda = device.type == "cuda"
    c, d, n = sz.pfc_classes, sz.pfc_dim, sz.pfc_batch
    rows = []
    # One shard, initialised once (10M rows take a minute on the host), then cast to bf16;
    # updates and TF32 are switched on it. Rate 1 at 10M would need [B, C] logits (~40 GB).
    plan = [
        ("float32", [("sparse", 0.1, True), ("sparse", 0.1, False), ("dense", 0.1, True),
                     ("dense", 0.1, False)]),
        ("bfloat16", [("sparse", 0.1, True), ("dense", 0.1, True)]),
    ]  # fmt: skip
    t0 = time.perf_counter()
    pfc = PartialFC(heads.get_head("arcface"), d, c).to(device)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=gen).to(device)
    for storage, configs in plan:
        if storage != "float32":
            pfc.optimizer = None
            pfc.weight = pfc.weight.to(getattr(torch, storage))
            pfc.weight_dtype = pfc.weight.dtype
        opt = pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        held = pfc.weight.nbytes + sum(v.nbytes for v in opt.rows.values())
        for update, rate, tf32 in configs:
            apply_backend_flags(backend_flags(device.type, tf32=tf32, deterministic=False))
            pfc.update = update
            pfc.sample_rate, pfc.num_sample = rate, int(rate * pfc.num_local)
            if cuda:
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device) - held  # all but the classifier
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for step in range(sz.pfc_steps + 1):
                _sync(device)
                t1 = time.perf_counter()
                loss = pfc(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                x.grad = None
                _sync(device)
                if step:  # the first step allocates the chunk buffers
                    times.append(time.perf_counter() - t1)
            model = estimate_memory_bytes(
                c, 1, embedding_size=d, global_batch=n, sample_rate=rate, weight_dtype=storage
            )["total"]
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) - base
                measured = f"{peak / c:,.0f}"
            else:
                measured = "n/a (CPU run)"
            rows.append(
                f"| {c:,} | {storage} | {update} | {rate} | {'on' if tf32 else 'off'} "
                f"| {1e3 * statistics.median(times):.1f} | {measured} | {model / c:,.0f} |"
            )
    del pfc, x, y
    apply_backend_flags(backend_flags(device.type, tf32=True, deterministic=False))
    return (
        f"Shard initialised in {build_s:.1f} s (host) and moved to {device}; global batch {n}, "
        f"D = {d}, SGD with momentum.\n\n"
        "| identities | storage | update | sample rate | TF32 | step ms (median) "
        "| peak classifier bytes per identity (measured) | model bytes per identity |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def section_memory_format(sz: Sizes, device: torch.device) -> str:
    import backbones

    amp = torch.bfloat16
    rows = []
    kw = {"width_mult": 0.25, "input_size": sz.image_size} if "width_mult" in sz.params else {}
    combos = [
        ("NCHW", "NCHW"),
        ("channels_last", "channels_last"),
        ("NCHW", "channels_last (the loader's view)"),
    ]
    for bench in (False, True):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bench
        for model_fmt, input_fmt in combos:
            model = backbones.get_backbone(sz.network, embedding_size=512, **kw).to(device)
            mf = torch.channels_last if model_fmt == "channels_last" else torch.contiguous_format
            model.to(memory_format=mf)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(sz.batch, 3, sz.image_size, sz.image_size, device=device)
            if input_fmt.startswith("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            times = []
            for step in range(sz.warmup + sz.steps):
                _sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=amp):
                    out = model(x)
                out.float().square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                if step >= sz.warmup:
                    times.append(time.perf_counter() - t0)
            rows.append(
                f"| {model_fmt} | {input_fmt} | {'on' if bench else 'off'} "
                f"| {sz.batch / statistics.median(times):,.1f} |"
            )
            del model, opt, x
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return (
        "| model | input | cudnn.benchmark | samples/s (median step) |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + ("\n" if device.type == "cuda" else "\n\n(CPU run: cudnn.benchmark does nothing.)\n")
    )


def section_loader(sz: Sizes, data: Path) -> str:
    from dist_train.config import DataConfig
    from dist_train.data import build_train_data
    from dist_train.distributed import DistInfo

    rows = []
    for workers in sz.loader_workers:
        cfg = DataConfig(
            root=str(data), image_size=sz.image_size, batch_size=sz.batch, num_workers=workers
        )
        loader = build_train_data(cfg, DistInfo(), 0).loader
        it = iter(loader)
        for _ in range(min(workers, sz.loader_batches // 2)):  # workers started and warm
            next(it)
        n, t0 = 0, time.perf_counter()
        for _ in range(sz.loader_batches):
            try:
                images, _labels = next(it)
            except StopIteration:
                break
            n += images.shape[0]
        elapsed = time.perf_counter() - t0
        del it, loader
        rows.append(f"| {workers} | {sz.batch} | {n} | {n / elapsed:,.0f} |")
    cores = os.cpu_count()
    return (
        f"Real RecordIO loader (decode + flip), {sz.image_size}x{sz.image_size}, {cores} CPU "
        "cores.\n\n| workers | batch | images timed | images/s |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def _corrupt_one_record(data: Path, index: int) -> str:
    """Overwrites the start of record ``index``'s JPEG payload; returns where."""
    offsets = {}
    for line in (data / "train.idx").read_text().split("\n"):
        if line.strip():
            i, off = line.split("\t")
            offsets[int(i)] = int(off)
    off = offsets[index]
    with open(data / "train.rec", "r+b") as f:
        f.seek(off + 8)
        flag = int.from_bytes(f.read(4), "little")
        f.seek(off + 8 + 24 + 4 * flag)  # magic, length, IRHeader, flag label floats
        f.write(b"\0" * 16)
    return f"record {index} at offset {off}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [*_descendants(int(child)), int(child)]
    return found


def section_failing_rank(sz: Sizes, tmp: Path, data: Path) -> str:
    import shutil

    from dist_train.distributed import free_port

    bad = tmp / "corrupt_data"
    shutil.copytree(data, bad)
    where = _corrupt_one_record(bad, index=max(2, sz.identities * sz.images_per_identity // 3))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(ROOT / "launch/train.py"),
        "--config", str(ROOT / "launch/configs/demo.yaml"),
        "--set", f"output_dir={tmp / 'failing'}", "--set", f"data.root={bad}",
        "--set", f"data.image_size={sz.image_size}", "--set", "data.num_workers=0",
        "--set", "data.batch_size=8", "--set", "device=cpu",
        "--set", f"backbone.params={{width_mult: 0.25, input_size: {sz.image_size}}}",
        "--set", "eval.targets=[]", "--set", "eval.at_start=false",
        "--set", "eval.every_epoch=false", "--set", "tensorboard=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log_path = tmp / "failing.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:  # a file, not a pipe: orphaned workers cannot block us
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code: int | str = proc.wait(timeout=sz.fail_limit_s)
        except subprocess.TimeoutExpired:
            # the agent and the workers it started (they run in sessions of their own)
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            code = f"still running after {sz.fail_limit_s:.0f} s (killed)"
    out = log_path.read_text(errors="replace")
    elapsed = time.perf_counter() - t0
    ok = isinstance(code, int) and code != 0 and elapsed < sz.fail_limit_s
    named = [ln.strip() for ln in out.splitlines() if "decodable" in ln or "train.rec" in ln]
    return (
        f"2 gloo processes, {where} overwritten.\n\n"
        "| exit status | seconds to exit | limit | ends non-zero in time | first line naming "
        "the record |\n|---|---|---|---|---|\n"
        f"| {code} | {elapsed:.1f} | {sz.fail_limit_s:.0f} | {'yes' if ok else 'NO'} "
        f"| {(named[0][:160] if named else '(none)').replace('|', '/')} |\n"
    )


# ------------------------------------------------------------------------------------------
def _peak_tflops(device: torch.device, override: float) -> float:
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return value
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (automatic "
                   "without CUDA)")  # fmt: skip
    p.add_argument("--out", default="", help="markdown file to write (e.g. docs/bench_gpu.md)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for the MFU")
    p.add_argument("--only", default="", help="comma-separated section names to run")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    sz = SMOKE if smoke else GPU
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1 if smoke else min(8, os.cpu_count() or 1))

    from dist_train.data.synthetic import SyntheticSpec, make_synthetic
    from dist_train.device_setup import apply_backend_flags, backend_flags, describe_device

    apply_backend_flags(backend_flags(device.type, tf32=True, deterministic=False))
    started = time.perf_counter()
    sections: list[tuple[str, str, Callable[[], str]]] = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        t0 = time.perf_counter()
        make_synthetic(
            data,
            SyntheticSpec(
                num_identities=sz.identities,
                images_per_identity=sz.images_per_identity,
                val_pairs=0,
                image_size=sz.image_size,
            ),
            workers=1 if smoke else min(16, os.cpu_count() or 1),
        )
        data_s = time.perf_counter() - t0
        dist.init_process_group(
            "gloo" if smoke else "nccl",
            init_method=f"file://{tmp / 'rendezvous'}",
            rank=0,
            world_size=1,
            **({} if smoke else {"device_id": device}),
        )
        header = describe_device(device, 1)
        peak = _peak_tflops(device, args.peak_tflops)
        sections = [
            ("trainer", "1. Trainer throughput and MFU",
             lambda: section_trainer(sz, device, tmp, data, peak)),
            ("syncs", "2. Host synchronisations per step",
             lambda: section_syncs(sz, device, tmp, data)),
            ("fp16_resume", "3. fp16 + GradScaler across a resume",
             lambda: section_fp16_resume(sz, device, tmp, data)),
            ("partial_fc", "4. Partial FC alone",
             lambda: section_partial_fc(sz, device)),
            ("memory_format", "5. Memory format and cudnn.benchmark",
             lambda: section_memory_format(sz, device)),
            ("loader", "6. Loader throughput", lambda: section_loader(sz, data)),
            ("failing_rank", "7. Failing-rank exit",
             lambda: section_failing_rank(sz, tmp, data)),
        ]  # fmt: skip
        only = {s for s in args.only.split(",") if s}
        results = []
        failed = 0
        try:
            for key, title, fn in sections:
                if only and key not in only:
                    continue
                t0 = time.perf_counter()
                try:
                    text = fn()
                except Exception:  # noqa: BLE001 - reported in the page; the others still run
                    failed += 1
                    text = "FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```\n"
                secs = time.perf_counter() - t0
                results.append(f"## {title}\n\n{text}\n({secs:.1f} s)\n")
                print(results[-1], flush=True)
        finally:
            dist.destroy_process_group()
    total = time.perf_counter() - started
    command = "python benchmarks/gpu_check.py" + (" --cpu-smoke" if smoke else "")
    if smoke:
        what = (
            "**No GPU was available to this run**: this is the CPU smoke mode (tiny sizes, "
            "gloo), which only shows that every section runs; its figures say nothing about "
            "GPU speed. The GPU figures are measured with `python benchmarks/gpu_check.py "
            "--out docs/bench_gpu.md` on one H100/H200 (at most 8 minutes)."
        )
    else:
        what = "One GPU, NCCL process group of world size 1."
    page = (
        f"# GPU check\n\n`{command} --out docs/bench_gpu.md` ({time.strftime('%Y-%m-%d')}): "
        f"{header}.\n\n{what} Data set: {sz.identities} x {sz.images_per_identity} synthetic "
        f"images, made in {data_s:.1f} s; all sections {total:.0f} s.\n\n" + "\n".join(results)
    )
    if args.out:
        Path(args.out).write_text(page)
    print(f"gpu_check: {len(results)} sections, {failed} failed, {total:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
