"""Datasets and build_train_data: layouts, labels, errors, loader batches, workers, resume."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from dist_train.config import ConfigError, DataConfig
from dist_train.data import (
    DataError,
    RecordDataset,
    build_train_data,
    folder_dataset,
    list_dataset,
)
from dist_train.data.recordio import IRHeader, RecordIOError, RecordIOWriter, pack, read_index
from dist_train.distributed import DistInfo
from eval.targets import load_bin, read_pair_list


def _jpeg(value: int, size: int = 24) -> bytes:
    img = np.full((size, size, 3), value, np.uint8)
    img[: size // 2, :, 2] = 255 - value  # top half differs in red (BGR order on disk)
    return cv2.imencode(".png", img)[1].tobytes()  # lossless: exact pixels in tests


def _write_pack(path, labels, *, header=True, array_labels=False, payload=None):
    rec, idx = path / "train.rec", path / "train.idx"
    n = len(labels)
    classes = sorted(set(labels))
    with RecordIOWriter(rec, idx) as w:
        if header:
            w.write(pack(IRHeader(2, [n + 1, n + 1 + len(classes)], 0, 0), b""), key=0)
        first = 1 if header else 0
        for i, lab in enumerate(labels):
            label = [float(lab), 7.0] if array_labels else float(lab)
            data = payload(i) if payload else _jpeg(10 * i % 250)
            w.write(pack(IRHeader(0, label, i + first, 0), data), key=i + first)
        if header:
            for j, _ in enumerate(classes):
                w.write(pack(IRHeader(2, [0, 0], 0, 0), b""), key=n + 1 + j)
    return rec


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("array_labels", [True, False])
def test_record_dataset_layouts(tmp_path, header, array_labels):
    labels = [0, 0, 1, 2, 2, 2]
    rec = _write_pack(tmp_path, labels, header=header, array_labels=array_labels)
    ds = RecordDataset(rec)
    assert ds.has_header == header
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds.labels.tolist() == labels
    img, label = ds[3]
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8 and label == 2
    # decoded to RGB: channel 0 (red) of the top half is 255 - value
    assert img[0, 0, 0] == 255 - 30 and img[0, 0, 2] == 30 and img[-1, 0, 0] == 30


def test_record_dataset_remaps_sparse_labels(tmp_path):
    rec = _write_pack(tmp_path, [5, 5, 9, 100])
    ds = RecordDataset(rec)
    assert ds.labels.tolist() == [0, 0, 1, 2] and ds.classes.tolist() == [5, 9, 100]


def test_record_dataset_bad_payload_and_label(tmp_path):
    rec = _write_pack(
        tmp_path, [0, 1, 1], payload=lambda i: b"not an image" if i == 1 else _jpeg(0)
    )
    ds = RecordDataset(rec)
    off = read_index(tmp_path / "train.idx")[1][2]
    with pytest.raises(
        DataError, match=rf"train\.rec key 2 at byte offset {off}: .*not a decodable"
    ):
        ds[1]
    (tmp_path / "b").mkdir()
    _write_pack(tmp_path / "b", [0, -1])
    with pytest.raises(DataError, match="key 2: label -1"):
        RecordDataset(tmp_path / "b" / "train.rec")


def test_record_dataset_header_pointing_past_index(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write(pack(IRHeader(2, [10, 12], 0, 0), b""), key=0)
        w.write(pack(IRHeader(0, 0.0, 1, 0), _jpeg(1)), key=1)
    with pytest.raises(DataError, match="image keys 1..9 but key"):
        RecordDataset(rec)


def test_record_dataset_truncated_file(tmp_path):
    rec = _write_pack(tmp_path, [0, 1, 1])
    rec.write_bytes(rec.read_bytes()[: -(2 * 40 + 10)])  # identity records + 10 bytes
    with pytest.raises(RecordIOError, match="train.rec key"):
        RecordDataset(rec)


def _folder(tmp_path):
    root = tmp_path / "faces"
    for name, n in [("bob", 2), ("alice", 3), ("carol", 1)]:
        (root / name).mkdir(parents=True)
        for j in range(n):
            (root / name / f"{j}.png").write_bytes(_jpeg(20 * j))
    (root / "alice" / "notes.txt").write_text("ignored")
    return root


def test_folder_and_list_datasets(tmp_path):
    root = _folder(tmp_path)
    ds = folder_dataset(root)
    assert ds.class_names == ["alice", "bob", "carol"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert ds[4][0].shape == (24, 24, 3)
    lst = tmp_path / "list.csv"
    lst.write_text("path,label\nfaces/bob/0.png,4\nfaces/alice/1.png,2\nfaces/carol/0.png,4\n")
    ds = list_dataset(lst)
    assert ds.labels.tolist() == [1, 0, 1] and ds.num_classes == 2
    assert ds[1][0].shape == (24, 24, 3)
    lst.write_text("faces/bob/0.png,1\nfaces/bob/1.png,x\n")
    with pytest.raises(DataError, match="list.csv line 2"):
        list_dataset(lst)
    lst.write_text("faces/bob/missing.png,0\n")
    with pytest.raises(DataError, match="missing.png: cannot read"):
        list_dataset(lst)[0]


def test_pair_lists_and_bin(tmp_path):
    (tmp_path / "p.csv").write_text("1,a/1.jpg,a/2.jpg\n0,a/1.jpg,b/1.jpg\n")
    pairs, issame = read_pair_list(tmp_path / "p.csv")
    assert issame.tolist() == [True, False] and pairs[1][1] == tmp_path / "b/1.jpg"
    (tmp_path / "u.csv").write_text("a/1.jpg,a/2.jpg\n")
    pairs, issame = read_pair_list(tmp_path / "u.csv", root="/data")
    assert issame is None and str(pairs[0][0]) == "/data/a/1.jpg"
    (tmp_path / "bad.csv").write_text("1,a\n2,b,c,d\n")
    with pytest.raises(DataError, match="bad.csv:2"):
        read_pair_list(tmp_path / "bad.csv")
    with open(tmp_path / "v.bin", "wb") as f:
        pickle.dump(([b"x", b"y", b"z", b"w"], [True, False]), f)
    bins, issame = load_bin(tmp_path / "v.bin")
    assert bins[2] == b"z" and issame.tolist() == [True, False]
    with open(tmp_path / "v.bin", "wb") as f:
        pickle.dump(([b"x"], [True]), f)
    with pytest.raises(DataError, match="1 images for 1 pairs"):
        load_bin(tmp_path / "v.bin")


def _cfg(root, **kw):
    base = dict(root=str(root), batch_size=4, num_workers=0, image_size=24, hflip=True)
    base.update(kw)
    return DataConfig(**base)


def test_build_train_data_batches_and_config_checks(tmp_path):
    labels = [i // 3 for i in range(30)]
    _write_pack(tmp_path, labels)
    td = build_train_data(_cfg(tmp_path), DistInfo(), seed=0)
    assert (td.num_classes, td.num_images, len(td.loader)) == (10, 30, 7)
    batches = list(td.loader)
    assert len(batches) == 7
    x, y = batches[0]
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 24, 24)
    assert x.is_contiguous(memory_format=torch.channels_last)
    img, label = td.dataset[td.sampler.rank_indices(0)[0]]  # unaugmented: maybe flipped below
    first = x[0].permute(1, 2, 0).numpy()
    assert np.array_equal(first, img) or np.array_equal(first, img[:, ::-1])
    assert y[0] == label
    assert y.dtype == torch.int64 and y.shape == (4,)
    with pytest.raises(ConfigError, match="data.num_classes=11 .* holds 10 identities"):
        build_train_data(_cfg(tmp_path, num_classes=11), DistInfo(), 0)
    with pytest.raises(ConfigError, match="data.num_images=3 .* holds 30 images"):
        build_train_data(_cfg(tmp_path, num_images=3), DistInfo(), 0)
    assert build_train_data(_cfg(tmp_path, num_classes=10, num_images=30), DistInfo(), 0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_data(_cfg(tmp_path, batch_size=64), DistInfo(), 0)
    with pytest.raises(DataError, match="does not exist"):
        build_train_data(_cfg(tmp_path / "nope"), DistInfo(), 0)


def test_folder_root_auto_format(tmp_path):
    td = build_train_data(_cfg(_folder(tmp_path), batch_size=2), DistInfo(), 0)
    assert td.num_classes == 3 and td.num_images == 6 and len(td.loader) == 3


def _all(td, epoch):
    td.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in td.loader]


def test_workers_do_not_change_batches_and_resume(tmp_path):
    labels = [i // 4 for i in range(48)]
    _write_pack(tmp_path, labels)
    cfg = _cfg(tmp_path, random_resized_crop=True, color_jitter=0.5)
    ref = _all(build_train_data(cfg, DistInfo(), 1), 1)
    cfg2 = _cfg(tmp_path, random_resized_crop=True, color_jitter=0.5, num_workers=2)
    td2 = build_train_data(cfg2, DistInfo(), 1)
    got = _all(td2, 1)
    assert len(got) == len(ref) == 12
    for (a, la), (b, lb) in zip(ref, got):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # mid-epoch resume: a fresh loader continues with exactly the remaining batches
    state = td2.sampler.state_dict(batches_consumed=5)
    td3 = build_train_data(cfg, DistInfo(), 1)
    td3.sampler.load_state_dict(state)
    rest = _all(td3, 1)
    assert len(rest) == 7
    for (a, la), (b, lb) in zip(ref[5:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(_all(td3, 2)[0][0], ref[0][0])  # next epoch: new order


def test_two_ranks_split_the_epoch(tmp_path):
    labels = [i // 2 for i in range(40)]
    _write_pack(tmp_path, labels, payload=lambda i: _jpeg(i))
    seen = []
    for rank in range(2):
        td = build_train_data(_cfg(tmp_path, hflip=False), DistInfo(rank, rank, 2), seed=3)
        assert len(td.loader) == 5
        for x, _ in td.loader:
            seen += x[:, 1, -1, -1].tolist()  # green channel holds the image's own value
    assert sorted(seen) == sorted(_jpeg_values(40))


def _jpeg_values(n):
    return [cv2.imdecode(np.frombuffer(_jpeg(i), np.uint8), 1)[-1, -1, 1] for i in range(n)]


def test_dataset_pickles_for_spawned_workers(tmp_path):
    rec = _write_pack(tmp_path, [0, 1, 1, 2])
    ds = RecordDataset(rec)
    first = ds[2][0]  # opens a handle here; the copy must open its own
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._fd is None
    assert np.array_equal(clone[2][0], first) and clone.labels.tolist() == [0, 1, 1, 2]


# --- the batch path: TurboJPEG decoding, fill(), the shared-memory ring -----------------------


def _photo(seed: int, size: int = 24, **params) -> bytes:
    """A real (lossy) JPEG of smooth random content; ``params`` are cv2.IMWRITE_* pairs."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (size, size))
    flags = [cv2.IMWRITE_JPEG_QUALITY, 90]
    for k, v in params.items():
        flags += [getattr(cv2, k), v]
    return cv2.imencode(".jpg", img, flags)[1].tobytes()


def _opencv_rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), 4)


def test_turbojpeg_decoding_is_pixel_identical_to_opencv():
    from dist_train.data.datasets import decode_rgb

    gray = cv2.imencode(".jpg", np.arange(24 * 24, dtype=np.uint8).reshape(24, 24))[1].tobytes()
    cases = {
        "4:2:0": _photo(1),
        "4:4:4": _photo(2, IMWRITE_JPEG_SAMPLING_FACTOR=cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
        "progressive": _photo(3, IMWRITE_JPEG_PROGRESSIVE=1),
        "odd size": _photo(4, size=23),
        "gray": gray,
    }
    for name, data in cases.items():
        want = _opencv_rgb(data)
        for got in (
            decode_rgb(data),
            decode_rgb(memoryview(data)),
            decode_rgb(np.frombuffer(data, np.uint8)),
        ):
            assert got.shape == want.shape and np.array_equal(got, want), name
        row = np.zeros((24, 24, 3), np.uint8)
        into = decode_rgb(data, row)
        assert np.array_equal(into, want), name
        if want.shape == row.shape:  # decoded in place
            assert np.shares_memory(into, row) and np.array_equal(row, want), name
    # larger than the buffer offered: decoded anyway; not an image: None
    big = _photo(5, size=40)
    assert np.array_equal(decode_rgb(big, np.zeros((24, 24, 3), np.uint8)), _opencv_rgb(big))
    assert decode_rgb(b"\xff\xd8 not really a jpeg") is None
    assert decode_rgb(b"") is None
    png = _jpeg(7)
    assert np.array_equal(decode_rgb(png), _opencv_rgb(png))


def _mixed_pack(path, n=40):
    """JPEGs at the training size (24), larger, smaller, gray and a PNG among them."""

    def payload(i):
        if i % 10 == 3:
            return _photo(i, size=32)
        if i % 10 == 5:
            return _photo(i, size=16)
        if i % 10 == 7:
            return _jpeg(i)  # PNG
        if i % 10 == 9:
            return cv2.imencode(".jpg", np.full((24, 24), 2 * i, np.uint8))[1].tobytes()
        return _photo(i)

    return _write_pack(path, [i // 4 for i in range(n)], payload=payload)


@pytest.mark.parametrize(
    "augment",
    [{}, {"hflip": False}, {"random_resized_crop": True, "color_jitter": 0.5, "low_light": True}],
    ids=["flip", "none", "heavy"],
)
def test_fill_equals_per_sample_getitem(tmp_path, augment):
    from dist_train.data.transforms import TrainTransform

    rec = _mixed_pack(tmp_path)
    ds = RecordDataset(rec, transform=TrainTransform(24, **{"hflip": True, **augment}))
    ds.base_seed = 11
    items = [(i, 2, 1, 100 + i) for i in range(40)]
    want = np.stack([ds[t][0] for t in items])
    for order in (items, np.array(items)):
        out = np.full((40, 24, 24, 3), 77, np.uint8)
        labels = ds.fill(order, out)
        assert np.array_equal(out, want) and labels.tolist() == [i // 4 for i in range(40)]
    # plain indices use __getitem__'s default seed
    out = np.zeros((3, 24, 24, 3), np.uint8)
    ds.fill([4, 0, 8], out)
    assert np.array_equal(out, np.stack([ds[i][0] for i in (4, 0, 8)]))


def test_fill_names_the_damaged_record(tmp_path):
    from dist_train.data.transforms import TrainTransform

    rec = _write_pack(
        tmp_path, [0, 0, 1, 1], payload=lambda i: b"\xff\xd8garbage" if i == 2 else _photo(i)
    )
    ds = RecordDataset(rec, transform=TrainTransform(24))
    off = read_index(tmp_path / "train.idx")[1][3]
    with pytest.raises(DataError, match=rf"train\.rec key 3 at byte offset {off}: .*decodable"):
        ds.fill([0, 1, 2, 3], np.zeros((4, 24, 24, 3), np.uint8))


def test_mapped_and_pread_reads_agree_and_a_file_truncated_while_open_is_named(tmp_path):
    from dist_train.data.transforms import TrainTransform

    rec = _write_pack(tmp_path, [0, 0, 1, 1, 2, 2], payload=_photo)
    ds = RecordDataset(rec, transform=TrainTransform(24))
    rows = np.stack([np.arange(6), np.arange(6)], 1)
    mapped = np.zeros((6, 24, 24, 3), np.uint8)
    ds.fill(rows, mapped)
    assert ds.mapped_view() is not None  # the fast path really used the memory map
    ds.memory_map = False  # as where mmap is unavailable: one pread per record
    read = np.zeros_like(mapped)
    ds.fill(rows, read)
    np.testing.assert_array_equal(mapped, read)
    with pytest.raises(ValueError, match="C-contiguous"):  # rows are written through views
        ds.fill(rows, np.zeros((6, 24, 48, 3), np.uint8)[:, :, ::2])
    assert "_mapped" not in pickle.loads(pickle.dumps(ds)).__dict__  # spawned workers map again
    # truncated after the dataset opened it: an error naming the file, not a SIGBUS
    ds2 = RecordDataset(rec, transform=TrainTransform(24))
    ds2.fill(rows, read)
    with open(rec, "r+b") as f:
        f.truncate(rec.stat().st_size // 2)
    with pytest.raises(RecordIOError, match=r"train\.rec: file shrank from \d+ to \d+ bytes"):
        ds2.fill(rows, read)


def test_ring_transport_equals_in_process_batches_and_frees_its_slots(tmp_path):
    import gc

    _mixed_pack(tmp_path, n=96)
    cfg = _cfg(tmp_path, batch_size=4)
    ref = _all(build_train_data(cfg, DistInfo(), 5), 0)  # in-process: no ring
    td = build_train_data(_cfg(tmp_path, batch_size=4, num_workers=2), DistInfo(), 5)
    ring = td.loader.dataset.ring
    assert ring is not None and ring.flags.sum() == 0
    held = list(td.loader)  # 24 batches held at once: more than the 12 slots, so some are
    assert len(held) == len(ref) == 24  # fresh arrays; none may be overwritten
    for (a, la), (b, lb) in zip(ref, held):
        assert torch.equal(a, b) and torch.equal(la, lb)
    in_ring = sum(np.shares_memory(x.numpy(), ring.slots) for x, _ in held)
    assert 0 < in_ring <= ring.flags.size
    del held, a, b, la, lb
    gc.collect()
    assert ring.flags.sum() == 0  # every slot released with its tensor
    for _ in range(2):  # the slots are reused across epochs
        for (a, la), (b, lb) in zip(ref, _all(td, 0)):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_loader_without_ring_uses_torch_transport(tmp_path):
    _mixed_pack(tmp_path, n=24)
    ref = _all(build_train_data(_cfg(tmp_path), DistInfo(), 2), 0)
    td = build_train_data(_cfg(tmp_path, num_workers=1), DistInfo(), 2, shared_ring=False)
    assert td.loader.dataset.ring is None
    for (a, la), (b, lb) in zip(ref, _all(td, 0)):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_folder_dataset_batch_path(tmp_path):
    from dist_train.data.transforms import TrainTransform

    root = tmp_path / "faces"
    for c in range(3):
        (root / f"id{c}").mkdir(parents=True)
        for j in range(4):
            data = _photo(10 * c + j, size=24 if j < 3 else 30)
            (root / f"id{c}" / f"{j}.jpg").write_bytes(data)
    (root / "id1" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    ds = folder_dataset(root, transform=TrainTransform(24))
    items = [(i, 0, 0, i) for i in range(len(ds)) if not ds.paths[i].endswith("broken.jpg")]
    out = np.zeros((len(items), 24, 24, 3), np.uint8)
    ds.fill(items, out)
    assert np.array_equal(out, np.stack([ds[t][0] for t in items]))
    bad = [i for i, p in enumerate(ds.paths) if p.endswith("broken.jpg")]
    with pytest.raises(DataError, match=r"broken\.jpg: 3-byte file is not a decodable image"):
        ds.fill([(bad[0], 0, 0, 0)], out)
