"""RecordIO tool: pack, inspect, verify, stats, unpack (InsightFace layout, no mxnet); make-bin;
overlap (training identities in verification sets).

Examples::

    python launch/rec.py pack faces/ --out data/mypack --workers 4 [--resize 112 --quality 95]
    python launch/rec.py pack photos/ --out data/mypack --align --detector yunet.onnx
    python launch/rec.py inspect data/mypack/train.rec --json --limit 5
    python launch/rec.py verify data/mypack/train.rec
    python launch/rec.py stats data/mypack
    python launch/rec.py unpack data/mypack/train.rec --out faces_again/
    python launch/rec.py make-bin --pairs lfw/pairs.txt --images lfw/aligned --out lfw.bin
    python launch/rec.py overlap --train data/mypack --targets lfw.bin cfp_fp.bin \
        --weights model.pt [--network iresnet50] [--centers step_00010000.pt] [--out overlap.json]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from dist_train.data import align, packing  # noqa: E402
from dist_train.data.datasets import DataError  # noqa: E402
from dist_train.data.recordio import RecordIOError  # noqa: E402
from eval.make_bin import ENCODINGS, make_bin, read_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="image folder identity/*.jpg or 'path,label' list -> pack")
    a.add_argument("source")
    a.add_argument("--out", required=True, help="directory for train.rec/train.idx/property")
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--resize", type=int, default=0, help="re-encode at this square size")
    a.add_argument("--quality", type=int, default=0, help="re-encode as JPEG of this quality")
    a.add_argument("--quiet", action="store_true")
    a.add_argument("--align", action="store_true", help="align faces first (docs/real_data.md)")
    a.add_argument("--detector", default=None, help="with --align: YuNet .onnx")
    a.add_argument("--size", type=int, default=112, help="with --align: aligned side")
    a.add_argument("--choose", choices=align.CHOICE_RULES, default="center")
    a.add_argument("--on-miss", choices=align.MISS_ACTIONS, default="skip")
    for name, text in [
        ("inspect", "one line per record"),
        ("verify", "report every problem"),
        ("stats", "identities, images, histogram"),
        ("unpack", "to a folder"),
    ]:
        s = sub.add_parser(name, help=text)
        s.add_argument("rec", help="a .rec file or a directory holding train.rec")
        s.add_argument("--idx", default=None, help="index file (default: beside the .rec)")
        if name == "inspect":
            s.add_argument("--json", action="store_true", help="one JSON object per line")
            s.add_argument("--limit", type=int, default=0, help="first N records only")
        if name == "verify":
            s.add_argument("--no-decode", action="store_true", help="skip image decoding")
        if name == "stats":
            s.add_argument("--json", action="store_true")
        if name == "unpack":
            s.add_argument("--out", required=True)
            s.add_argument("--quiet", action="store_true")
    m = sub.add_parser("make-bin", help="LFW pairs.txt or label,path1,path2 list -> .bin")
    m.add_argument("--pairs", required=True, help="LFW pairs.txt or a labelled pair list")
    m.add_argument("--images", default=None, help="images directory (default: beside --pairs)")
    m.add_argument("--out", required=True, help="the .bin to write")
    m.add_argument("--size", type=int, default=112, help="side of stored images (default 112)")
    m.add_argument(
        "--encode",
        choices=ENCODINGS,
        default="png",
        help="format of resized images (size x size JPEG/PNG files are stored as they are)",
    )
    m.add_argument("--quiet", action="store_true")
    o = sub.add_parser("overlap", help="flag test images close to a training class centre")
    o.add_argument("--train", required=True, help="training pack (folder with train.rec)")
    o.add_argument("--targets", nargs="+", required=True, help=".bin sets and pair lists")
    o.add_argument("--weights", required=True, help="checkpoint, weights file or .onnx model")
    o.add_argument("--network", default=None, help="backbone name (default: the checkpoint's)")
    o.add_argument("--embedding-size", type=int, default=None)
    o.add_argument(
        "--centers",
        default=None,
        help="class centres: a training checkpoint (its Partial FC classifier), a saved "
        "[C, D] / [C, K, D] tensor or dict with 'centers', or .npy (default: from the pack)",
    )
    o.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag above this cosine (default: the 99.9%% quantile of training images' "
        "cosines to the nearest other class's centre; docs/evaluation.md)",
    )
    o.add_argument("--calibration-images", type=int, default=10_000, help="sample for the rule")
    o.add_argument("--images-root", default=None, help="root of pair-list image paths")
    o.add_argument("--out", default=None, help="JSON report to write")
    o.add_argument("--batch-size", type=int, default=128)
    o.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    o.add_argument("--device", default="cpu")
    o.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (RecordIOError, DataError, ValueError) as exc:  # AlignError is a DataError
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _bar(total: int, quiet: bool, unit: str = " images") -> tqdm:
    """Progress on stderr: redrawn live on a terminal, a status every 30 s in a log file."""
    redraw_s = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, unit=unit, disable=quiet, mininterval=redraw_s)


def _run(args) -> int:
    if args.cmd == "pack":
        opts = None
        if args.detector and not args.align:
            raise ValueError("pack --detector is used only with --align")
        if args.align:
            if not args.detector:
                raise ValueError("pack --align needs --detector MODEL.onnx")
            opts = align.AlignOptions(
                detector=args.detector, size=args.size, choose=args.choose, on_miss=args.on_miss
            )
        total = len(packing.list_sources(args.source)[0])
        with _bar(total, args.quiet) as bar:
            summary = packing.pack_images(
                args.source,
                args.out,
                resize=args.resize,
                quality=args.quality,
                workers=args.workers,
                progress=bar.update,
                align=opts,
            )
        print(json.dumps(summary))
    elif args.cmd == "inspect":
        for row in packing.inspect_records(args.rec, args.idx, args.limit):
            if args.json:
                print(json.dumps(row))
            else:
                print(
                    f"key={row['key']} flag={row['flag']} label={row['label']} id={row['id']} "
                    f"id2={row['id2']} payload={row['payload_len']}B "
                    f"sha256={row['payload_sha256'][:16]}"
                )
    elif args.cmd == "verify":
        n, problems = packing.verify_pack(args.rec, args.idx, decode_images=not args.no_decode)
        for msg in problems:
            print(msg)
        print(f"{n} readable records, {len(problems)} problem(s)")
        return 1 if problems else 0
    elif args.cmd == "stats":
        st = packing.dataset_stats(args.rec, args.idx)
        if args.json:
            print(json.dumps(st))
        else:
            s = st["images_per_identity"]
            print(
                f"{st['file']}: {st['identities']} identities, {st['images']} images "
                f"(per identity min {s['min']} median {s['median']} mean {s['mean']} "
                f"max {s['max']})"
            )
            width = max(st["histogram"].values()) or 1
            for rng, n in st["histogram"].items():
                print(f"  {rng:>9} images: {n:8d} {'#' * round(40 * n / width)}")
    elif args.cmd == "unpack":
        st = packing.dataset_stats(args.rec, args.idx)
        with _bar(st["images"], args.quiet) as bar:
            print(json.dumps(packing.unpack_to_folder(args.rec, args.out, args.idx, bar.update)))
    elif args.cmd == "make-bin":
        total = len(read_pairs(args.pairs, args.images))
        with _bar(total, args.quiet, " pairs") as bar:
            summary = make_bin(
                args.pairs,
                args.out,
                args.images,
                size=args.size,
                encode=args.encode,
                progress=bar.update,
            )
        print(json.dumps(summary))
    elif args.cmd == "overlap":
        from eval import overlap

        report = overlap.run(
            args.weights,
            args.train,
            args.targets,
            network=args.network,
            embedding_size=args.embedding_size,
            batch_size=args.batch_size,
            flip=not args.no_flip,
            device=args.device,
            centers_file=args.centers,
            threshold=args.threshold,
            images_root=args.images_root,
            calibration_images=args.calibration_images,
            progress=not args.quiet,
        )
        print(f"threshold {report['threshold']:.4f}: {report['rule']}")
        for name, entry in report["targets"].items():
            print(overlap.summary_line(name, entry, report["threshold"]))
        if args.out:
            overlap.write_report(args.out, report)
            print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
