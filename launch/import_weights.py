"""Import pretrained weights (ONNX, arcface_torch iResNet, torchvision ResNet) into a backbone.

    python launch/import_weights.py --source mobilefacenet_512.onnx --network mobilefacenet \
        --out mfn.safetensors [--embedding-size 512] [--kind onnx|arcface_torch|torchvision]

ONNX files are mapped by graph structure (see backbones/importers.py); state dicts are taken
as arcface_torch's layout for iresnet* and torchvision's for resnet*. OUT (.pt: plain state
dict, .safetensors) is what ``backbone.init_weights`` and ``launch/eval.py --weights`` read.
Exit status: 0 written, 2 the source does not fit (one line naming the first tensor that does not
fit, or the missing file / unknown network).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.importers import SOURCES, import_weights, write_weights  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help=".onnx file or a state dict (.pth/.pt)")
    parser.add_argument("--network", required=True, help="registered backbone name")
    parser.add_argument("--out", required=True, help="OUT.pt or OUT.safetensors")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    parser.add_argument("--kind", choices=SOURCES, default=None, help="default: from the file")
    args = parser.parse_args(argv)
    try:
        result = import_weights(
            args.source,
            args.network,
            embedding_size=args.embedding_size,
            kind=args.kind,
            input_size=tuple(args.input_size),
        )
    except (ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"import_weights: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    meta = {"network": args.network, "embedding_size": str(args.embedding_size)}
    out = write_weights(result.model, args.out, metadata=meta)
    print(
        f"wrote {out} ({args.network}, D={args.embedding_size}) from {result.source}: "
        f"{result.mapped} tensors mapped, {len(result.restored_bn)} folded BatchNorms restored, "
        f"{result.seconds:.2f} s"
    )
    if result.not_imported:
        print(f"not in the source, left initialised: {', '.join(result.not_imported)}")
    return {"path": out, "result": result}


if __name__ == "__main__":
    main()
