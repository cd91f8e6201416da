"""Command-line tools: ``python -m trainkit convert SRC DST``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .checkpoint import CheckpointError
from .dcp import convert_checkpoint


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"anon\": true}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainkit", description="trainkit command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "convert",
        help="a sharded checkpoint directory to one single-file checkpoint, or back",
        description=(
            "Convert a sharded (DCP) checkpoint directory into one single-file checkpoint that loads with "
            "torch.load(weights_only=True), or a trainkit single-file checkpoint into a sharded directory. "
            "SRC and DST are local paths or fsspec URLs (s3://...); DST must not exist."
        ),
    )
    convert.add_argument("src", metavar="SRC", help="a sharded checkpoint directory or a .ckpt file")
    convert.add_argument("dst", metavar="DST", help="where to write the other form (must not exist)")
    convert.add_argument(
        "--storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='fsspec storage options for SRC and DST, e.g. \'{"client_kwargs": {"endpoint_url": "..."}}\'',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert":
        try:
            location = convert_checkpoint(args.src, args.dst, storage_options=args.storage_options)
        except (CheckpointError, FileExistsError, ValueError, TypeError, ImportError) as exc:
            print(f"{parser.prog} convert: error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
