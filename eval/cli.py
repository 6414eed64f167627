"""The evaluation command line (``launch/eval.py``): arguments -> model -> targets -> report.

Owns argument parsing, the order of the steps and whether an IJB run's cached features are
reused; the work is done by :mod:`eval.runner` (embedding, metrics), :mod:`eval.ijb` (IJB
meta, scoring, the feature cache files) and :mod:`eval.report` (table, JSON, figures). Runs as
a single process or under ``torchrun`` (every rank embeds its shard of each target; rank 0
scores IJB, prints and writes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from dist_train.distributed import all_gather_object, init_distributed
from eval import ijb, report
from eval.options import EvalOptions
from eval.runner import (
    TargetResult,
    evaluate_targets_full,
    extract_ijb_features,
    input_from,
    load_model,
    normalisation_from,
    score_ijb,
)
from eval.targets import TargetError, known_bins, load_target, write_scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/eval.py",
        description="Face verification: 10-fold accuracy, EER, AUC, TAR@FAR on .bin sets and "
        "pair lists; scores files for unlabelled test lists.",
    )
    p.add_argument(
        "--weights",
        required=True,
        help="training checkpoint, weights file (.pt/.safetensors) or .onnx model",
    )
    p.add_argument(
        "--network",
        default=None,
        help="registered backbone name (default: from the checkpoint's config)",
    )
    p.add_argument("--embedding-size", type=int, default=None, help="embedding size D")
    p.add_argument(
        "--targets",
        default="",
        help="comma-separated .bin sets and labelled pair lists (label,path1,path2)",
    )
    p.add_argument(
        "--bin-dir",
        default=None,
        help="directory of InsightFace .bin sets: evaluates every known one found there "
        "(lfw, cfp_fp, agedb_30, calfw, cplfw, cfp_ff, vgg2_fp) before --targets; the table "
        "ends with their mean over the standard five",
    )
    p.add_argument(
        "--test-list",
        default="",
        help="unlabelled lists (path1,path2); writes <out>/<name>_scores.csv",
    )
    p.add_argument(
        "--images-root",
        default=None,
        help="root of pair-list image paths, or a .rec pack (default: each list's directory)",
    )
    p.add_argument(
        "--ijb",
        default=None,
        metavar="DIR",
        help="IJB folder holding loose_crop/ and meta/ (InsightFace's --image-path)",
    )
    p.add_argument(
        "--ijb-target", default="IJBC", help="IJBC or IJBB: which meta files of --ijb to read"
    )
    p.add_argument(
        "--ijb-no-norm-score",
        action="store_true",
        help="IJB: L2-normalise each image feature before pooling (InsightFace "
        "use_norm_score=False; by default the feature norm weighs the image)",
    )
    p.add_argument(
        "--ijb-no-detector-score",
        action="store_true",
        help="IJB: do not weigh image features by the detector score "
        "(InsightFace use_detector_score=False)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory: report.json, PNG plots, scores, IJB feature cache",
    )
    p.add_argument("--json", default=None, help="JSON report path (default: <out>/report.json)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument(
        "--no-flip",
        action="store_true",
        help="disable flip test-time augmentation (IJB: image feature = f(crop) only, "
        "InsightFace use_flip_test=False)",
    )
    p.add_argument("--low-light", action="store_true", help="apply the low-light transform")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this side (default: the checkpoint config's data.image_size, "
        "else as stored)",
    )
    p.add_argument(
        "--center-crop",
        type=int,
        default=None,
        help="central square taken before resizing (default: the checkpoint config's "
        "data.center_crop, else none)",
    )
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast")
    p.add_argument(
        "--mean",
        type=float,
        default=None,
        help="input normalisation mean (default: checkpoint config, else 0.5)",
    )
    p.add_argument(
        "--std",
        type=float,
        default=None,
        help="input normalisation std (default: checkpoint config, else 0.5)",
    )
    p.add_argument("--folds", type=int, default=10, help="folds of the accuracy protocol")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def options_from(args: argparse.Namespace, config: dict | None) -> EvalOptions:
    """The evaluation options of the arguments; normalisation and input size not given fall
    back to the checkpoint's training config, then to the defaults."""
    given = {
        "mean": args.mean,
        "std": args.std,
        "image_size": args.image_size,
        "center_crop": args.center_crop,
    }
    inputs = {**normalisation_from(config), **input_from(config)}
    inputs.update({k: v for k, v in given.items() if v is not None})
    return EvalOptions(
        batch_size=args.batch_size,
        flip=not args.no_flip,
        low_light=args.low_light,
        amp=args.amp,
        n_folds=args.folds,
        **inputs,
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    extract_ijb: Callable[..., np.ndarray] = extract_ijb_features,
) -> dict[str, TargetResult]:
    """Runs an evaluation; returns the results (on every rank; an IJB target's on rank 0).

    ``extract_ijb`` is the IJB feature extractor (``eval.runner.extract_ijb_features``;
    tests pass a counting wrapper to see whether the cache was used).
    """
    args = build_parser().parse_args(argv)
    targets, tests = _split(args.targets), _split(args.test_list)
    if args.bin_dir:
        targets = [t for t in known_bins(args.bin_dir) if t not in targets] + targets
    if not targets and not tests and not args.ijb:
        raise SystemExit("error: give --targets, --bin-dir, --test-list and/or --ijb")
    if tests and not args.out:
        raise SystemExit("error: --test-list needs --out (where the scores files go)")
    # The process group is torn down by the caller: launch/eval.py runs this under
    # dist_train.failures.run_guarded (a failing rank leaves without a collective).
    dist = init_distributed()
    # Load every list before the model so a bad file fails fast, naming itself.
    loaded = [load_target(t, args.images_root) for t in targets + tests]
    for t in loaded[len(targets) :]:
        if t.labelled:
            raise TargetError(f"{t.path}: --test-list expects unlabelled 'path1,path2' lines")
    meta = ijb.read_meta(args.ijb, args.ijb_target) if args.ijb else None
    model, config = load_model(args.weights, args.network, args.embedding_size)
    model = model.to(dist.device)
    options = options_from(args, config)
    start = time.perf_counter()
    results = evaluate_targets_full(model, loaded, options, device=dist.device) if loaded else {}
    if meta is not None:
        raw, source = _ijb_features(args, meta, model, config, options, dist, extract_ijb)
        if dist.is_main:
            switches = ijb.IJBSwitches(
                flip=options.flip,
                norm_score=not args.ijb_no_norm_score,
                detector_score=not args.ijb_no_detector_score,
            )
            result = score_ijb(meta, raw, switches)
            result.details["ijb"]["features"] = source
            results[result.name] = result
    seconds = time.perf_counter() - start
    if dist.is_main:
        _write_outputs(args, options, results, seconds, dist.world_size)
    return results


def _ijb_features(args, meta, model, config, options, dist, extract) -> tuple[np.ndarray, str]:
    """The raw ``[N, 2D]`` features of the IJB images and where they came from (``cache`` or
    ``extracted``). The cache in ``--out`` is used only when every rank finds it valid under
    the key of the weights, network, image list and input preparation."""
    bcfg = (config or {}).get("backbone") or {}
    parts = {
        "weights_sha256": ijb.file_digest(args.weights),
        "network": args.network or bcfg.get("name"),
        "embedding_size": args.embedding_size or bcfg.get("embedding_size"),
        "images_sha256": ijb.file_digest(meta.files["landmarks"]),
        "mean": options.mean,
        "std": options.std,
        "image_size": options.image_size,
        "center_crop": options.center_crop,
        "low_light": options.low_light,
        "amp": options.amp,
    }
    key = ijb.cache_key(parts)
    raw = None
    if args.out:
        raw = ijb.load_cached_features(args.out, meta.target, key, meta.num_images)
    # every rank takes the same road (extraction is collective)
    if all(all_gather_object(raw is not None)):
        if dist.is_main:
            print(f"{meta.target}: features from {ijb.cache_paths(args.out, meta.target)[0]}")
        return raw, "cache"
    raw = extract(model, meta, options, device=dist.device)
    if args.out and dist.is_main:
        path = ijb.save_cached_features(args.out, meta.target, key, raw, parts)
        print(f"{meta.target}: features cached in {path}")
    return raw, "extracted"


def _write_outputs(
    args, options: EvalOptions, results: dict[str, TargetResult], seconds: float, world: int
) -> None:
    labelled = {n: r for n, r in results.items() if r.issame is not None}
    if labelled:
        print(report.format_table({n: r.metrics for n, r in labelled.items()}))
    ijb_results = {n: r for n, r in results.items() if "ijb" in r.details}
    if ijb_results:
        print(report.format_ijb_table({n: r.metrics for n, r in ijb_results.items()}))
    print(f"evaluated {len(results)} target(s) in {seconds:.1f} s on {world} process(es)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, r in results.items():
            if r.issame is None:
                path = os.path.join(args.out, f"{name}_scores.csv")
                write_scores(path, r.target, r.scores)
                print(f"scores: {path}")
        for name, r in ijb_results.items():
            path = os.path.join(args.out, f"{name.lower()}_scores.npy")
            np.save(path, r.scores)
            r.details["ijb"]["scores_file"] = path
            print(f"pair scores: {path}")
        if not args.no_plots and labelled:
            print(f"plots: {len(report.write_figures(args.out, labelled))} PNG files in {args.out}")
    json_path = args.json or (os.path.join(args.out, "report.json") if args.out else None)
    if json_path:
        meta = {
            "weights": args.weights,
            "network": args.network,
            "flip": options.flip,
            "low_light": options.low_light,
            "image_size": options.image_size,
            "center_crop": options.center_crop,
            "amp": options.amp,
            "folds": options.n_folds,
            "ijb": args.ijb,
            "ijb_target": args.ijb_target.upper() if args.ijb else None,
            "world_size": world,
            "seconds": seconds,
        }
        report.write_json(json_path, results, meta)
        print(f"report: {json_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
