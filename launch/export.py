"""Export trained backbone weights to ONNX, safetensors or TorchScript.

    python launch/export.py --weights runs/x/model.pt --network iresnet50 \
        --format onnx --out iresnet50.onnx [--embedding-size 512] [--input-size 112 112]

The written file is checked against PyTorch (onnxruntime for ONNX) unless --no-check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.export import FORMATS, export  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="state dict, checkpoint or .safetensors")
    parser.add_argument("--network", required=True, help="registered backbone name")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--input-size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    parser.add_argument("--no-check", action="store_true", help="skip the round-trip check")
    args = parser.parse_args(argv)
    result = export(
        args.weights,
        args.network,
        args.format,
        args.out,
        embedding_size=args.embedding_size,
        input_size=tuple(args.input_size),
        check=not args.no_check,
    )
    print(f"wrote {result['path']} ({args.format}, {args.network}, D={args.embedding_size})")
    if result["max_abs_diff"] is not None:
        print(f"max |PyTorch - exported| on random inputs: {result['max_abs_diff']:.3g}")
    return result


if __name__ == "__main__":
    main()
