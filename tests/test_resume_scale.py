"""Resume at scale: a rank reads only the loss shard files, and rows, of its own classes.

Fast tests pin the selection and the chunked, memory-mapped reading of
:mod:`dist_train.sharded_state` and :class:`dist_train.checkpoint.ShardFile`. Slow tests run
real gloo processes: checkpoints of 2 and 3 ranks (bf16 and fp32 storage) load into 1, 2 and 3
ranks (fp32, bf16 and fp16 storage) through the files;
a rank never opens a file outside its classes; and a 2,000,000-identity checkpoint of 2 ranks
resumes into 2 and 3 ranks with each rank's peak resident memory about its own shard.
"""

from __future__ import annotations

import pytest
import torch

import heads
from dist_train import checkpoint as ckpt
from dist_train import sharded_state
from dist_train.center_loss import ShardedCenterLoss
from dist_train.config import load_config
from dist_train.distributed import all_gather_object, barrier
from dist_train.losses import build_loss
from dist_train.partial_fc import PartialFC
from dist_train.sharded_state import StoredState, make_state, owned_chunks, select_owned
from tests.dist_utils import proc_status as _status
from tests.dist_utils import run_distributed


def _rows(start: int, stop: int, d: int, sign: float = 1.0) -> torch.Tensor:
    """Rows that name their class: row of class c is sign · (c + [0, 1, …, D-1] / D)."""
    cls = torch.arange(start, stop, dtype=torch.float32)[:, None]
    return sign * (cls + torch.arange(d, dtype=torch.float32)[None, :] / d)


def _piece(start: int, stop: int, d: int = 3, c: int = 11) -> dict:
    return make_state(
        "partial_fc",
        num_classes=c,
        embedding_size=d,
        start=start,
        stop=stop,
        tensors={"weight": _rows(start, stop, d)},
        optimizer_rows={"momentum_buffer": _rows(start, stop, d, -1.0)},
        optimizer={"name": "sgd"},
    )


def _counted(state: dict, ranges, opened: list, name: str) -> StoredState:
    def open_state() -> dict:
        opened.append(name)
        return state

    return StoredState(open_state, ranges, name=name)


def test_select_owned_opens_no_file_and_chunks_open_only_overlapping_ones():
    opened: list[str] = []
    bounds = [(0, 4), (4, 8), (8, 11)]
    sources = [_counted(_piece(a, b), [(a, b)], opened, f"f{a}") for a, b in bounds]
    parts = select_owned(sources, 5, 10)
    assert opened == []  # the recorded ranges suffice to choose
    assert [(dst, src, s.name) for dst, src, s, _ in parts] == [
        (slice(0, 3), slice(1, 4), "f4"),
        (slice(3, 5), slice(0, 2), "f8"),
    ]
    shard = torch.zeros(5, 3)
    row_bytes = 2 * 3 * 4  # weight and momentum rows of one class
    chunks = list(owned_chunks(parts, chunk_bytes=row_bytes))
    for dst, src, piece in chunks:
        shard[dst] = piece["weight"][src]
    assert opened == ["f4"] * 3 + ["f8"] * 2  # one open per chunk of one row
    assert torch.equal(shard, _rows(5, 10, 3))


def test_stored_states_without_recorded_ranges_are_opened_for_them():
    opened: list[str] = []
    sources = [_counted(_piece(a, b), None, opened, f"f{a}") for a, b in [(0, 6), (6, 11)]]
    parts = select_owned(sources, 0, 5)
    assert sorted(opened) == ["f0", "f6"]  # an old checkpoint: every file is read for its range
    assert [(dst, src) for dst, src, _, _ in parts] == [(slice(0, 5), slice(0, 5))]


def test_overlapping_or_contradicted_ranges_raise_naming_them():
    with pytest.raises(ValueError, match=r"overlap: \[0, 6\) and \[4, 11\)"):
        select_owned([_piece(0, 6), _piece(4, 11)], 0, 11)
    wrong = StoredState(lambda: _piece(0, 5), [(0, 6)], name="shard X [partial_fc]")
    with pytest.raises(ValueError, match=r"shard X \[partial_fc\].*records \[\(0, 6\)\]"):
        list(owned_chunks(select_owned([wrong], 0, 6)))


def _trained_modules(c: int, d: int):
    torch.manual_seed(0)
    pfc = PartialFC(heads.get_head("arcface"), d, c, sample_rate=1.0)
    pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9)
    center = ShardedCenterLoss(c, d, weight=0.1)
    center.configure_optimizer("sgd", lr=0.5, momentum=0.9)
    x, y = torch.randn(8, d), torch.randint(0, c, (8,))
    (pfc(x, y) + center(x, y)).backward()
    pfc.optimizer.step()
    center.optimizer.step()
    return pfc, center


def _split(state: dict, bounds) -> list[dict]:
    """The one-piece state of a single process as the pieces ``bounds`` of another world."""
    (piece,) = state["pieces"]
    out = []
    for a, b in bounds:
        rows = {k: v[a:b] for k, v in piece["rows"].items()}
        name = "weight" if state["format"] == "partial_fc" else "centers"
        out.append(
            make_state(
                state["format"],
                num_classes=state["num_classes"],
                embedding_size=state["embedding_size"],
                start=a,
                stop=b,
                tensors={name: piece[name][a:b]},
                optimizer_rows=rows,
                optimizer=state["optimizer"],
            )
        )
    return out


@pytest.mark.parametrize("record_ranges", [True, False])
def test_partial_fc_and_center_loss_load_from_shard_files_a_chunk_at_a_time(
    tmp_path, monkeypatch, record_ranges
):
    c, d, bounds = 11, 4, [(0, 4), (4, 8), (8, 11)]
    pfc, center = _trained_modules(c, d)
    pfc_pieces = _split(pfc.shard_state(), bounds)
    center_pieces = _split(center.shard_state(), bounds)
    main = ckpt.checkpoint_path(tmp_path, 1)
    locals_ = [{"partial_fc": p, "center": q} for p, q in zip(pfc_pieces, center_pieces)]
    for r, local in enumerate(locals_):
        ckpt.atomic_save(local, ckpt.shard_path(main, r, 3))
    state = {"step": 1, "loss_shards": [ckpt.shard_path(main, r, 3).name for r in range(3)]}
    if record_ranges:
        state["loss_shard_ranges"] = [ckpt.shard_ranges(local) for local in locals_]
        assert state["loss_shard_ranges"][1] == {"partial_fc": [[4, 8]], "center": [[4, 8]]}
    ckpt.atomic_save(state, main)
    monkeypatch.setattr(sharded_state, "CHUNK_BYTES", 1)  # one class per chunk

    loaded = ckpt.load_checkpoint(main)
    files = ckpt.load_shards(main, loaded)
    assert not any(f.opened for f in files)
    pfc2 = PartialFC(heads.get_head("arcface"), d, c, sample_rate=1.0, seed=7)
    pfc2.load_shard_pieces([f.part("partial_fc") for f in files])  # rows wait for the optimizer
    pfc2.configure_optimizer("sgd", lr=0.1, momentum=0.9)
    center2 = ShardedCenterLoss(c, d, weight=0.1)
    center2.configure_optimizer("sgd", lr=0.5, momentum=0.9)
    center2.load_shard_pieces([f.part("center") for f in files])
    assert all(f.opened for f in files)
    assert torch.equal(pfc2.weight, pfc.weight)
    momentum = pfc.optimizer.rows["momentum_buffer"]
    assert torch.equal(pfc2.optimizer.rows["momentum_buffer"], momentum)
    assert torch.equal(center2.centers_shard, center.centers_shard)
    momentum = center.optimizer.state[center.centers_shard]["momentum_buffer"]
    assert torch.equal(center2.optimizer.state[center2.centers_shard]["momentum_buffer"], momentum)


def test_shard_files_are_written_in_a_format_mmap_loading_reads(tmp_path):
    path = tmp_path / "s.pt"
    ckpt.atomic_save({"partial_fc": _piece(0, 11)}, path)
    content = ckpt.ShardFile(path, None).open()  # torch.load(..., mmap=True, weights_only=True)
    assert torch.equal(content["partial_fc"]["pieces"][0]["weight"], _rows(0, 11, 3))


def test_main_file_with_a_wrong_number_of_ranges_raises_naming_the_key(tmp_path):
    state = {"step": 1, "loss_shards": ["a.pt", "b.pt"], "loss_shard_ranges": [{}]}
    with pytest.raises(RuntimeError, match="'loss_shard_ranges' has 1 entries for 2"):
        ckpt.load_shards(tmp_path / "step_00000001.pt", state)


# ------------------------------------------------------------------ gloo processes


# Storage dtypes (Partial FC rows, its momentum, the centres) of each world size: checkpoints
# are written at 2 ranks in bf16 and at 3 in fp32, and read into fp32 (1 rank), bf16 (2) and
# fp16 (3). The written rows (small multiples of 1/4) are exact in every one of them.
DTYPES = {
    1: ("float32", "float32", "float32"),
    2: ("bfloat16", "bfloat16", "bfloat16"),
    3: ("float16", "float16", "float16"),
}
WRITE_DTYPES = {2: DTYPES[2], 3: DTYPES[1]}


def _cfg(d: int, dtypes=DTYPES[1]):
    """Arcface in Partial FC (SGD with momentum rows) plus a sharded center loss."""
    weight, state, centers = dtypes
    return load_config(
        None,
        [
            f"backbone.embedding_size={d}",
            f"head.params={{center_loss_weight: 0.1, center_loss_centers_dtype: {centers}}}",
            f"partial_fc.weight_dtype={weight}",
            f"partial_fc.state_dtype={state}",
        ],
    )


def _expected(loss) -> dict[str, torch.Tensor]:
    """What the writers put in the rows of this rank's classes (see :func:`_write_worker`)."""
    pfc = loss.partial_fc
    a, b, d = pfc.class_start, pfc.class_stop, pfc.embedding_size
    return {
        "weight": _rows(a, b, d),
        "momentum": _rows(a, b, d, -1.0),
        "centers": _rows(a, b, d, 2.0),
    }


def _loaded(loss) -> dict[str, torch.Tensor]:
    return {
        "weight": loss.partial_fc.weight,
        "momentum": loss.partial_fc.optimizer.rows["momentum_buffer"],
        "centers": loss.center.centers_shard,
    }


def _write_worker(rank: int, world: int, run_dir: str, c: int, d: int, dtypes=DTYPES[1]) -> None:
    """Fills this rank's rows with :func:`_expected`, then saves as the Checkpointer does."""
    loss = build_loss(_cfg(d, dtypes), c, torch.device("cpu"))
    with torch.no_grad():
        for key, value in _expected(loss).items():
            _loaded(loss)[key].copy_(value)
    main = ckpt.checkpoint_path(run_dir, 1)
    local = loss.local_state()
    ckpt.atomic_save(local, ckpt.shard_path(main, rank, world))
    ranges = all_gather_object(ckpt.shard_ranges(local))
    barrier()
    if rank == 0:
        names = [ckpt.shard_path(main, r, world).name for r in range(world)]
        ckpt.atomic_save({"step": 1, "loss_shards": names, "loss_shard_ranges": ranges}, main)
    barrier()


def _read_worker(rank: int, world: int, run_dirs: list[str], c: int, d: int) -> list:
    """Per run directory: (rows equal the written ones in the reader's :data:`DTYPES`, which
    files were opened) or the error."""
    out = []
    for run_dir in run_dirs:
        loss = build_loss(_cfg(d, DTYPES[world]), c, torch.device("cpu"))
        main = ckpt.checkpoint_path(run_dir, 1)
        files = ckpt.load_shards(main, ckpt.load_checkpoint(main))
        try:
            loss.load_pieces(files)
        except RuntimeError as exc:
            out.append(str(exc))
            continue
        want, got = _expected(loss), _loaded(loss)
        dtypes = [getattr(torch, name) for name in DTYPES[world]]
        equal = {k: got[k].dtype == t and torch.equal(got[k].float(), want[k])
                 for k, t in zip(want, dtypes)}  # fmt: skip
        out.append((equal, [f.opened for f in files]))
    return out


def _overlaps(c: int, old_world: int, rank: int, world: int) -> list[bool]:
    from dist_train.distributed import shard_range

    a, b = shard_range(c, rank, world)
    bounds = [shard_range(c, r, old_world) for r in range(old_world)]
    return [max(a, lo) < min(b, hi) for lo, hi in bounds]


C_SMALL, D_SMALL = 11, 4


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Checkpoints of C_SMALL classes written by 2 and by 3 ranks."""
    out = {}
    for world in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"w{world}")
        run_distributed(_write_worker, world, str(run_dir), C_SMALL, D_SMALL, WRITE_DTYPES[world])
        out[world] = run_dir
    return out


@pytest.mark.slow
def test_loss_shard_files_load_into_any_world_size_opening_only_overlapping_ones(written):
    runs = {2: [2, 3], 3: [2], 1: [2, 3]}  # new world -> old worlds
    for new_world, olds in runs.items():
        dirs = [str(written[w]) for w in olds]
        if new_world == 1:
            results = [_read_worker(0, 1, dirs, C_SMALL, D_SMALL)]
        else:
            results = run_distributed(_read_worker, new_world, dirs, C_SMALL, D_SMALL)
        for rank, per_dir in enumerate(results):
            for old, (equal, opened) in zip(olds, per_dir):
                where = f"{old} -> {new_world} ranks, rank {rank}"
                assert all(equal.values()), f"{where}: {equal}"
                assert opened == _overlaps(C_SMALL, old, rank, new_world), where


@pytest.mark.slow
def test_a_rank_never_opens_a_shard_file_outside_its_classes(written, tmp_path):
    import shutil

    dirs = {}
    for name, keep_ranges in (("recorded", True), ("old_format", False)):
        run_dir = tmp_path / name
        shutil.copytree(written[3], run_dir)
        main = ckpt.checkpoint_path(run_dir, 1)
        if not keep_ranges:  # a checkpoint written before the ranges were recorded
            state = torch.load(main, weights_only=False)
            del state["loss_shard_ranges"]
            ckpt.atomic_save(state, main)
        dirs[name] = str(run_dir)
    intact = str(tmp_path / "intact_old_format")
    shutil.copytree(dirs["old_format"], intact)
    for name in ("recorded", "old_format"):  # classes [8, 11): only rank 1 of 2 holds them
        ckpt.shard_path(ckpt.checkpoint_path(dirs[name], 1), 2, 3).write_bytes(b"garbage" * 9)
    r0, r1 = run_distributed(
        _read_worker, 2, [dirs["recorded"], dirs["old_format"], intact], C_SMALL, D_SMALL
    )
    # rank 0 (classes [0, 6)) never touches the corrupt file when the ranges are recorded
    assert r0[0] == ({"weight": True, "momentum": True, "centers": True}, [True, True, False])
    assert "shard002-of-003.pt is corrupt" in r1[0]
    # without them every rank opens every file (and an intact old checkpoint loads)
    assert "shard002-of-003.pt is corrupt" in r0[1] and "shard002-of-003.pt is corrupt" in r1[1]
    for res in (r0[2], r1[2]):
        assert all(res[0].values()) and res[1] == [True, True, True]


# ------------------------------------------------------------------ memory at 2M identities

C_BIG, D_BIG = 2_000_000, 16
SLACK = 48 * 2**20
"""Allowed beyond 1.3 × the own shard: one read chunk (CHUNK_BYTES) plus the allocator's and
the unpickler's small change."""


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _resume_memory_worker(rank: int, world: int, run_dir: str) -> dict:
    """Peak resident memory of a resume of the loss state, against this rank's own shard.

    ``baseline``: resident memory of the process with everything but the shard (a loss of 11
    classes was built and dropped: modules imported, allocator warm). The loss is built (its
    shard and optimizer rows resident), the peak is reset (``/proc/self/clear_refs`` 5 sets
    VmHWM to the current VmRSS), the shards are loaded, and VmHWM is read: the highest resident
    memory of the load, file pages mapped in by the memory-mapped reads included.
    """
    build_loss(_cfg(D_BIG), C_SMALL, torch.device("cpu"))  # then dropped
    baseline = _status("VmRSS")
    loss = build_loss(_cfg(D_BIG), C_BIG, torch.device("cpu"))
    own = _tensor_bytes(loss.local_state())
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    main = ckpt.checkpoint_path(run_dir, 1)
    loss.load_pieces(ckpt.load_shards(main, ckpt.load_checkpoint(main)))
    peak = _status("VmHWM")
    want, got = _expected(loss), _loaded(loss)
    probe = torch.arange(0, want["weight"].shape[0], 4099)
    equal = all(torch.equal(got[k][probe], want[k][probe]) for k in want)
    return {"baseline": baseline, "before": before, "peak": peak, "own": own, "equal": equal}


@pytest.mark.slow
def test_two_million_identities_resume_into_two_and_three_ranks_within_own_shard(tmp_path):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs to reset the peak resident memory")
    run_distributed(_write_worker, 2, str(tmp_path), C_BIG, D_BIG, timeout_s=600)
    for world in (2, 3):
        for rank, res in enumerate(
            run_distributed(_resume_memory_worker, world, str(tmp_path), timeout_s=600)
        ):
            assert res["equal"], f"2 -> {world} ranks, rank {rank}: rows differ"
            grown = res["peak"] - res["baseline"]
            assert grown <= 1.3 * res["own"] + SLACK, (
                f"2 -> {world} ranks, rank {rank}: peak - baseline {grown / 2**20:.0f} MiB, "
                f"own shard {res['own'] / 2**20:.0f} MiB (resume alone added "
                f"{(res['peak'] - res['before']) / 2**20:.0f} MiB)"
            )
