"""Print parameters and multiply-accumulates of registered backbones.

    python launch/model_info.py --list
    python launch/model_info.py iresnet50 [--input-size 112 112] [--embedding-size 512]
    python launch/model_info.py --list --markdown   # the table of docs/backbones.md
    python launch/model_info.py iresnet18 --param width_mult=0.25   # builder keywords

What is counted is described in ``backbones/info.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

import backbones  # noqa: E402
from backbones.info import human, markdown_table, model_info  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="registered backbone name")
    parser.add_argument("--list", action="store_true", help="every registered backbone")
    parser.add_argument("--input-size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="extra builder keyword (value parsed as YAML), repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--param expects KEY=VALUE, got {item!r}")
        params[key] = yaml.safe_load(value)
    if not args.list and not args.name:
        parser.error("give a backbone NAME or --list")
    names = backbones.names() if args.list else [args.name]
    size = tuple(args.input_size)
    try:
        infos = [model_info(n, size, args.embedding_size, **params) for n in names]
    except (KeyError, ValueError, TypeError) as exc:
        parser.error(str(exc).strip('"'))
    if args.markdown:
        print(markdown_table(infos))
        return
    print(f"{'network':<18} {'input':>9} {'D':>5} {'params':>13} {'MACs':>9} {'MACs(all)':>10}")
    for i in infos:
        print(
            f"{i.name:<18} {i.input_size[0]:>4}x{i.input_size[1]:<4} {i.embedding_size:>5} "
            f"{i.params:>13,} {human(i.macs):>9} {human(i.macs_all):>10}"
        )
    if len(infos) == 1:
        for kind, macs in infos[0].by_kind.items():
            print(f"  {kind:<11} {macs:>15,} MACs")
        print(f"  trainable   {infos[0].trainable_params:>15,} params")


if __name__ == "__main__":
    main()
