"""Identity overlap between a training pack and verification targets (issue 14, point 5).

Fast tests pin the maths of :mod:`eval.overlap` on synthetic vectors. The real-face tests pack
the photos of 13 people (``../shared/realfaces/photos``, aligned with YuNet) leaving out one
photo per person, then check targets built from those held-out photos (the same people: to be
flagged) and from the face crops and ORL (other people: not flagged), with the released
MobileFaceNet imported into the registered ``mobilefacenet``. The expected cosines are
recomputed independently with onnxruntime on the ONNX file and numpy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from eval import overlap
from eval.targets import TargetError, VerificationTarget

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("REALFACES", ROOT.parent / "shared" / "realfaces"))
YUNET = REAL / "models" / "face_detection_yunet.onnx"
MFN = REAL / "models" / "mobilefacenet_512.onnx"


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# The maths on synthetic vectors


def test_nearest_centers_takes_the_best_sub_centre_and_leaves_out_a_class():
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(5, 3, 8)))
    emb = _unit(centers[[2, 4, 0], [1, 0, 2]] + 0.05 * rng.normal(size=(3, 8)))
    cls, cos = overlap.nearest_centers(emb, centers)
    assert cls.tolist() == [2, 4, 0]
    full = np.einsum("nd,ckd->nck", emb, centers).max(axis=2)
    np.testing.assert_allclose(cos, full.max(axis=1), atol=1e-6)
    cls2, cos2 = overlap.nearest_centers(emb, centers, exclude=np.array([2, 4, 0]))
    for i, own in enumerate([2, 4, 0]):
        others = np.delete(full[i], own)
        assert cos2[i] == pytest.approx(others.max(), abs=1e-6) and cls2[i] != own


def test_calibrate_rule_is_the_impostor_quantile_and_a_fixed_threshold_wins():
    rng = np.random.default_rng(1)
    c, per, d = 20, 6, 32
    centers = overlap.TrainCenters(
        _unit(rng.normal(size=(c, 1, d))), [str(i) for i in range(c)], "x"
    )
    labels = np.repeat(np.arange(c), per)
    emb = _unit(centers.centers[labels, 0] + 0.1 * rng.normal(size=(c * per, d)))
    cal = overlap.calibrate(emb, labels, centers)
    sims = emb @ centers.centers[:, 0].T
    own = sims[np.arange(len(labels)), labels]
    sims[np.arange(len(labels)), labels] = -np.inf
    assert cal.threshold == pytest.approx(np.quantile(sims.max(axis=1), 0.999), abs=1e-6)
    np.testing.assert_allclose(cal.genuine, own, atol=1e-6)
    assert cal.genuine.min() > cal.threshold  # these classes are separable
    fixed = overlap.calibrate(emb, labels, centers, threshold=0.3)
    assert fixed.threshold == 0.3 and fixed.rule == "fixed cosine 0.3"


def test_check_target_flags_images_identities_and_the_pairs_touching_them():
    rng = np.random.default_rng(2)
    centers = overlap.TrainCenters(_unit(rng.normal(size=(4, 1, 16))), ["a", "b", "c", "d"], "x")
    # images 0, 1 belong to class c (folder "bob"), images 2, 3 to nobody (folder "eve")
    emb = np.stack(
        [
            _unit(centers.centers[2, 0] + 0.1 * rng.normal(size=16)),
            _unit(centers.centers[2, 0] + 0.1 * rng.normal(size=16)),
            _unit(rng.normal(size=16)),
            _unit(rng.normal(size=16)),
        ]
    )
    names = [("bob/1.jpg", "eve/1.jpg"), ("eve/1.jpg", "eve/2.jpg"), ("bob/2.jpg", "bob/1.jpg")]
    target = VerificationTarget(
        "t", "t.csv", ["p0", "p1", "p2", "p3"], np.array([[0, 2], [2, 3], [1, 0]]),
        np.array([False, True, True]), pair_names=names,
    )  # fmt: skip
    entry = overlap.check_target(target, emb, centers, threshold=0.8)
    assert entry["images"] == 4 and entry["flagged_images"] == 2
    assert {f["image"] for f in entry["flagged"]} == {"bob/1.jpg", "bob/2.jpg"}
    assert all(f["class_name"] == "c" and f["cosine"] > 0.8 for f in entry["flagged"])
    assert entry["pairs_touching_flagged"] == 2
    assert [p["pair"] for p in entry["flagged_pairs"]] == [0, 2]
    assert entry["flagged_pairs"][0] == {
        "pair": 0,
        "images": ["bob/1.jpg", "eve/1.jpg"],
        "same": False,
    }
    assert entry["identities"] == 2
    assert entry["flagged_identities"] == [
        {"identity": "bob", "images": 2, "flagged": 2, "nearest_classes": ["c"]}
    ]
    line = overlap.summary_line("t", entry, 0.8)
    assert line.startswith("t: 2 of 4 images flagged (1 of 2 identities), 2 of 3 pairs touch them")


def test_read_centers_formats_and_errors(tmp_path):
    m = np.arange(24, dtype=np.float32).reshape(3, 8)
    np.save(tmp_path / "c.npy", m)
    torch.save(torch.from_numpy(m), tmp_path / "c.pt")
    torch.save({"centers": torch.from_numpy(m).view(3, 1, 8)}, tmp_path / "d.pt")
    for name in ("c.npy", "c.pt", "d.pt"):
        got = overlap.read_centers(str(tmp_path / name))
        assert got.shape == (3, 1, 8) and np.array_equal(got[:, 0], m)
    with pytest.raises(overlap.DataError, match="nowhere.pt: class centres file does not exist"):
        overlap.read_centers(str(tmp_path / "nowhere.pt"))
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(overlap.DataError, match="bad.pt: a dict without key 'centers'"):
        overlap.read_centers(str(tmp_path / "bad.pt"))
    np.save(tmp_path / "v.npy", np.zeros(4, np.float32))
    with pytest.raises(overlap.DataError, match=r"v.npy: class centres must be .* \[4\]"):
        overlap.read_centers(str(tmp_path / "v.npy"))


# --------------------------------------------------------------------------------------------
# Real faces


def _rec(*args) -> tuple[int, str, str]:
    from launch.rec import main as rec_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rec_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _link_tree(pairs: list[tuple[Path, Path]]) -> None:
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """The pack (12 people's photos but one each), the held-out photos, strangers, weights."""
    if not MFN.is_file():
        pytest.skip(f"real face data not found at {REAL}")
    import backbones
    from backbones.importers import import_onnx
    from backbones.weights import save_safetensors
    from dist_train.data.align import AlignOptions, align_folder
    from dist_train.data.packing import pack_images
    from eval.make_bin import make_bin

    work = tmp_path_factory.mktemp("overlap")
    train, held = [], []
    for person in sorted(p for p in (REAL / "photos").iterdir() if p.is_dir()):
        files = sorted(person.glob("*.jpg"))
        train += [(f, work / "train_src" / person.name / f.name) for f in files[:-1]]
        held.append((files[-1], work / "held_src" / person.name / files[-1].name))
    strangers = [
        (f, work / "strangers_src" / group / person.name / f.name)
        for group, people in (("crops", 8), ("orl", 6))
        for person in sorted(p for p in (REAL / group).iterdir() if p.is_dir())[:people]
        for f in sorted(person.iterdir())[:2]
    ]
    _link_tree(train + held + strangers)
    opts = AlignOptions(detector=str(YUNET))
    pack_images(work / "train_src", work / "pack", align=opts)
    align_folder(work / "held_src", work / "held", opts)
    align_folder(
        work / "strangers_src",
        work / "strangers",
        AlignOptions(detector=str(YUNET), on_miss="center"),
    )
    held_imgs = sorted(str(p.relative_to(work)) for p in (work / "held").glob("*/*.jpg"))
    crops = sorted(str(p.relative_to(work)) for p in (work / "strangers" / "crops").glob("*/*"))
    orl = sorted(str(p.relative_to(work)) for p in (work / "strangers" / "orl").glob("*/*"))
    ring = [f"0,{a},{b}" for a, b in zip(held_imgs, held_imgs[1:] + held_imgs[:1])]
    (work / "held.csv").write_text("\n".join(ring) + "\n")
    mixed = ring[:6] + [f"1,{a},{b}" for a, b in zip(crops[::2], crops[1::2])]
    (work / "mixed.csv").write_text("\n".join(mixed) + "\n")
    (work / "orl.csv").write_text(
        "\n".join(f"1,{a},{b}" for a, b in zip(orl[::2], orl[1::2])) + "\n"
    )
    make_bin(work / "held.csv", work / "held.bin", work)
    net = backbones.get_backbone("mobilefacenet", embedding_size=512)
    import_onnx(MFN, net)
    weights = work / "mobilefacenet_512.safetensors"
    save_safetensors(net, weights)
    return {"work": work, "weights": weights, "held": held_imgs, "crops": crops, "orl": orl}


def _ort_embed(images: list[np.ndarray]) -> np.ndarray:
    """The ONNX model run directly: RGB uint8 [112, 112, 3] -> normalised [N, 512], no flip."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(MFN), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = []
    for img in images:
        x = ((img.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        out.append(session.run(None, {name: x})[0][0])
    return _unit(np.stack(out))


@pytest.fixture(scope="module")
def reference(faces):
    """Centres, impostor threshold and held-out cosines computed without eval.overlap."""
    from dist_train.data import RecordDataset

    data = RecordDataset(faces["work"] / "pack" / "train.rec")
    emb = _ort_embed([data[i][0] for i in range(len(data))])
    labels = np.asarray(data.labels)
    centers = _unit(np.stack([emb[labels == c].mean(axis=0) for c in range(data.num_classes)]))
    sims = emb @ centers.T
    sims[np.arange(len(labels)), labels] = -np.inf
    held = _ort_embed(
        [cv2.cvtColor(cv2.imread(str(faces["work"] / p)), cv2.COLOR_BGR2RGB) for p in faces["held"]]
    )
    return {
        "centers": centers,
        "threshold": float(np.quantile(sims.max(axis=1), 0.999)),
        "held_cosine": (held @ centers.T).max(axis=1),
    }


def _overlap(faces, *extra):
    work = faces["work"]
    code, out, err = _rec(
        "overlap", "--train", work / "pack",
        "--targets", work / "mixed.csv", work / "held.bin", work / "orl.csv",
        "--weights", faces["weights"], "--network", "mobilefacenet", "--embedding-size", "512",
        "--no-flip", "--batch-size", "32", "--quiet", "--out", work / "report.json", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads((work / "report.json").read_text()), out


@pytest.mark.slow
def test_held_out_photos_of_training_people_are_flagged_and_strangers_are_not(faces, reference):
    rep, printed = _overlap(faces)
    assert rep["num_classes"] == 13 and rep["centers"] == "pack"
    assert rep["calibration"]["images"] == 48
    assert rep["threshold"] == pytest.approx(reference["threshold"], abs=2e-3)
    mixed, held, orl = rep["targets"]["mixed"], rep["targets"]["held"], rep["targets"]["orl"]
    members = faces["held"][:7]  # the first 6 ring pairs of mixed.csv
    # every held-out photo is flagged, and its nearest class is the person's own folder
    assert held["images"] == 13 and held["flagged_images"] == 13
    assert held["pairs_touching_flagged"] == held["pairs"] == 13
    assert mixed["images"] == len(members) + 16
    assert {f["image"] for f in mixed["flagged"]} == set(members)
    assert all(f["class_name"] == f["image"].split("/")[1] for f in mixed["flagged"])
    assert [i["identity"] for i in mixed["flagged_identities"]] == sorted(
        {os.path.dirname(m) for m in members}
    )
    assert all(
        i["nearest_classes"] == [i["identity"].split("/")[1]] for i in mixed["flagged_identities"]
    )
    assert mixed["identities"] == len(members) + 8
    # the crop pairs (strangers on both sides) touch no flagged image
    assert mixed["pairs_touching_flagged"] == 6
    assert all(p["images"][0] in members for p in mixed["flagged_pairs"])
    assert orl["images"] == 12 and orl["flagged_images"] == 0
    # the cosines are those of the model and centres computed independently
    want = dict(zip(faces["held"], reference["held_cosine"]))
    for f in mixed["flagged"]:
        assert f["cosine"] == pytest.approx(want[f["image"]], abs=2e-3)
    lines = printed.splitlines()
    assert lines[0].startswith(f"threshold {rep['threshold']:.4f}: 99.9% quantile of 48")
    assert lines[1].startswith("mixed: 7 of 23 images flagged (7 of 15 identities), 6 of 14 pairs")
    assert lines[3].startswith("orl: 0 of 12 images flagged (0 of 6 identities), 0 of 6 pairs")
    print(
        f"\nthreshold {rep['threshold']:.3f}; held-out members min cosine "
        f"{min(f['cosine'] for f in held['flagged']):.3f}; ORL max {orl['max_cosine']:.3f}"
    )


@pytest.mark.slow
def test_centres_from_a_partial_fc_export_give_the_same_flags(faces, reference, tmp_path):
    import heads
    from dist_train.partial_fc import PartialFC, export_class_centers

    # a Sub-center ArcFace classifier: sub-centre 0 of each class is the class centre (scaled,
    # as trained rows are), the two others are random directions
    pfc = PartialFC(heads.get_head("subcenter_arcface", s=16.0, m=0.3, k=3), 512, 13)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(13, 3, 512)).astype(np.float32)
    rows[:, 0] = reference["centers"] * rng.uniform(2, 5, size=(13, 1))
    with torch.no_grad():
        pfc.weight.copy_(torch.from_numpy(rows).view(13 * 3, 512))
    path = tmp_path / "centers.pt"
    torch.save(export_class_centers(pfc), path)
    rep, _ = _overlap(faces, "--centers", path)
    assert rep["centers"] == str(path) and rep["sub_centers"] == 3
    assert rep["threshold"] == pytest.approx(reference["threshold"], abs=2e-3)
    assert rep["targets"]["held"]["flagged_images"] == 13
    assert rep["targets"]["orl"]["flagged_images"] == 0
    # a fixed threshold replaces the rule; a centres file for other classes is refused
    rep, printed = _overlap(faces, "--centers", path, "--threshold", "0.95")
    assert rep["rule"] == "fixed cosine 0.95" and rep["targets"]["held"]["flagged_images"] == 0
    np.save(tmp_path / "twelve.npy", reference["centers"][:12])
    code, _, err = _rec(
        "overlap", "--train", faces["work"] / "pack", "--targets", faces["work"] / "orl.csv",
        "--weights", faces["weights"], "--network", "mobilefacenet", "--centers",
        tmp_path / "twelve.npy",
    )  # fmt: skip
    assert code == 2 and f"{tmp_path / 'twelve.npy'}: 12 class centres, the training pack" in err


def test_missing_pack_or_target_is_named(tmp_path):
    if MFN.is_file():  # the command line: the model loads, then the pack is opened
        code, _, err = _rec(
            "overlap", "--train", tmp_path / "nopack", "--targets", tmp_path / "x.bin",
            "--weights", MFN,
        )  # fmt: skip
        assert code == 2 and f"{tmp_path / 'nopack'}: training pack does not exist" in err
    (tmp_path / "pack" / "a").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "pack" / "a" / "1.png"), np.full((112, 112, 3), 128, np.uint8))
    with pytest.raises(TargetError, match="x.bin: verification target does not exist"):
        overlap.find_overlap(
            torch.nn.Identity(), str(tmp_path / "pack"), [str(tmp_path / "x.bin")],
            overlap.EvalOptions(),
        )  # fmt: skip


def test_a_training_checkpoint_gives_its_partial_fc_class_centres(tiny_data, tmp_path):
    from dist_train.config import load_config
    from dist_train.distributed import DistInfo
    from dist_train.partial_fc import export_class_centers
    from dist_train.trainer import Trainer
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    sets = tiny_overrides(tiny_data, run, **{"max_steps": 2, "checkpoint.every_steps": 2})
    trainer = Trainer(load_config(None, sets), DistInfo())
    trainer.fit()
    want = export_class_centers(trainer.loss.partial_fc).float().numpy()
    got = overlap.read_centers(str(run / "checkpoints" / "step_00000002.pt"))
    assert got.shape == (12, 1, 16)
    np.testing.assert_array_equal(got[:, 0], want)


def test_pack_centres_are_the_mean_of_normalised_embeddings_a_chunk_at_a_time(
    tmp_path, monkeypatch
):
    from eval.extract import extract_embeddings
    from tests.eval_helpers import TinyNet, identity_images

    for c, group in enumerate(identity_images(4, 3, seed=5)):
        (tmp_path / "faces" / f"id{c}").mkdir(parents=True)
        for k, img in enumerate(group):
            cv2.imwrite(str(tmp_path / "faces" / f"id{c}" / f"{k}.png"), img[:, :, ::-1])
    pack = str(tmp_path / "faces")
    options = overlap.EvalOptions(batch_size=4)
    data = overlap.open_pack(pack, options)
    net = TinyNet(16)
    every = extract_embeddings(
        net, lambda a, b: np.stack([data[i][0] for i in range(a, b)]).transpose(0, 3, 1, 2),
        len(data), options, device=torch.device("cpu"),
    ).embeddings  # fmt: skip
    every = _unit(every)
    labels = np.asarray(data.labels)
    want = _unit(np.stack([every[labels == c].mean(axis=0) for c in range(4)]))
    sample = np.array([1, 5, 6, 11])
    monkeypatch.setattr(overlap, "PACK_CHUNK", 5)  # three passes over the 12 images
    centers, emb = overlap.pack_centers(
        net, data, pack, options, sample, device=torch.device("cpu"), progress=False
    )
    np.testing.assert_allclose(centers.centers[:, 0], want, atol=1e-6)
    np.testing.assert_allclose(emb, every[sample], atol=1e-6)
    assert centers.names == ["id0", "id1", "id2", "id3"] and centers.source == "pack"
