"""Face alignment: a folder of photos -> 5-point aligned crops (ArcFace template) + a report.

Examples::

    python launch/align.py photos/ --out aligned/ --detector face_detection_yunet.onnx --workers 4
    python launch/align.py photos/ --out aligned/ --landmarks marks.csv --on-miss center

DST mirrors SRC's tree (same relative paths and suffixes); DST/align_report.json lists every
file (found / missed / unreadable, the chosen box and score, or the reason). See
docs/real_data.md "Aligning faces".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from tqdm import tqdm  # noqa: E402

from dist_train.data import align  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="folder of identity subfolders, or a flat folder of images")
    p.add_argument("--out", required=True, help="output folder (mirrors SRC)")
    p.add_argument("--detector", default=None, help="YuNet .onnx (cv2.FaceDetectorYN)")
    p.add_argument("--size", type=int, default=112, help="output side; template scaled by /112")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--landmarks", default=None, help="CSV path,x1,y1..x5,y5 or InsightFace .lst")
    p.add_argument("--on-miss", choices=align.MISS_ACTIONS, default="skip")
    p.add_argument("--choose", choices=align.CHOICE_RULES, default="center")
    p.add_argument("--score-threshold", type=float, default=0.6)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        opts = align.AlignOptions(
            detector=args.detector,
            size=args.size,
            choose=args.choose,
            on_miss=args.on_miss,
            score_threshold=args.score_threshold,
        )
        total = len(align.list_images(args.src))
        start = time.perf_counter()
        bar = tqdm(total=total, unit=" images", disable=args.quiet, mininterval=0.5)
        with bar:
            report = align.align_folder(
                args.src, args.out, opts, landmarks_file=args.landmarks,
                workers=args.workers, progress=bar.update,
            )  # fmt: skip
    except align.AlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(json.dumps({**report["counts"], "seconds": round(seconds, 2), "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
